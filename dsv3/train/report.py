"""`dsv3 report RUN_DIR`: PNG plots of a training run, drawn from its metrics.jsonl.

    loss.png          training and validation loss, main head and MTP
    lr.png            learning rate
    throughput.png    tokens/s and MFU
    expert_load.png   heat map per MoE layer: each expert's load (multiple of the mean) over the steps
    router_bias.png   each expert's selection bias over the steps, per MoE layer
    maxvio.png        MaxVio of the training batch (mean and max over layers) and of the validation set

With `--compare RUN ...`, also compare_loss.png: the training loss of every run (smoothed) and their
validation losses on one plot, labelled by run directory (ablations: bf16 against fp8, MTP on and off).
"""

from __future__ import annotations

import os
from typing import Any

from dsv3.config import ModelConfig
from dsv3.errors import Dsv3Error
from dsv3.train.metrics import read_metrics

PLOTS = "plots"


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise Dsv3Error("dsv3 report needs matplotlib; install it with `pip install 'dsv3[plots]'`") from None
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _series(records: list[dict[str, Any]], key: str) -> tuple[list[int], list[Any]]:
    picked = [r for r in records if r.get(key) is not None]
    return [r["step"] for r in picked], [r[key] for r in picked]


def _router_names(n: int, n_mtp: int) -> list[str]:
    """Routers are listed main MoE layers first, then MTP modules."""
    return [f"MoE layer {i + 1}" for i in range(n - n_mtp)] + [f"MTP {k + 1}" for k in range(n_mtp)]


def make_report(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None,
                compare: list[str] | None = None) -> list[str]:
    """Draw the plots of a run into `out_dir` (default RUN/plots), and with `compare` the loss curves of this
    run and those beside each other; returns the files written."""
    plt = _pyplot()
    run_dir = os.fspath(run_dir)
    records = [r for r in read_metrics(run_dir) if "summary" not in r]
    train = [r for r in records if "loss" in r]
    if not train:
        raise Dsv3Error(f"{run_dir}/metrics.jsonl has no training records yet; train for at least one log interval")
    out_dir = os.fspath(out_dir or os.path.join(run_dir, PLOTS))
    os.makedirs(out_dir, exist_ok=True)
    n_mtp = _mtp_routers(run_dir)
    written = []
    for name, draw in (("loss.png", _loss), ("lr.png", _lr), ("throughput.png", _throughput),
                       ("expert_load.png", _expert_load), ("router_bias.png", _router_bias), ("maxvio.png", _maxvio)):
        fig = draw(plt, records, train, n_mtp)
        if fig is None:  # the run recorded nothing to draw (a model without MoE layers)
            continue
        path = os.path.join(out_dir, name)
        if name != "expert_load.png":  # its colour bar spans the subplots, which tight_layout cannot place
            fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if compare:
        path = os.path.join(out_dir, "compare_loss.png")
        fig = _compare(plt, [run_dir, *compare])
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def _compare(plt, runs: list[str]):
    """Training loss (a moving mean over 10 logged steps) and validation loss of several runs."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for i, run in enumerate(runs):
        records = [r for r in read_metrics(run) if "summary" not in r]
        steps, loss = _series(records, "loss")
        smooth = [sum(loss[max(0, j - 9): j + 1]) / len(loss[max(0, j - 9): j + 1]) for j in range(len(loss))]
        color = f"C{i}"
        name = os.path.basename(os.path.normpath(run))
        ax.plot(steps, smooth, "-", color=color, label=f"{name} (train)")
        vsteps, vloss = _series(records, "val_loss")
        if vsteps:
            ax.plot(vsteps, vloss, "o--", color=color, label=f"{name} (validation)", markersize=4)
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title="loss, run by run")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _loss(plt, records, train, n_mtp):
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for key, label, style in (("loss", "train", "-"), ("mtp_loss", "train MTP", "-"),
                              ("val_loss", "validation", "o-"), ("val_mtp_loss", "validation MTP", "s--")):
        steps, values = _series(records, key)
        if steps:
            ax.plot(steps, values, style, label=label, markersize=4)
    ax.set(xlabel="step", ylabel="cross-entropy (nats)", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _lr(plt, records, train, n_mtp):
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.plot(*_series(train, "lr"))
    ax.set(xlabel="step", ylabel="learning rate", title="learning-rate schedule")
    ax.grid(alpha=0.3)
    return fig


def _throughput(plt, records, train, n_mtp):
    fig, ax = plt.subplots(figsize=(8, 3.5))
    steps, tps = _series(train, "tokens_per_s")
    ax.plot(steps, tps, color="tab:blue")
    ax.set(xlabel="step", ylabel="tokens/s", title="throughput")
    ax.grid(alpha=0.3)
    mfu = ax.twinx()
    mfu.plot(*_series(train, "mfu"), color="tab:orange", alpha=0.6)
    mfu.set_ylabel("MFU", color="tab:orange")
    mfu.yaxis.set_major_formatter(lambda v, _: f"{v:.0%}")
    return fig


def _per_router(train, key: str, n_mtp: int):
    """(steps, per-router lists, router names) of a per-router record key; None when the run has no routers."""
    steps, values = _series(train, key)
    return (steps, values, _router_names(len(values[0]), n_mtp)) if values else None


def _expert_load(plt, records, train, n_mtp):
    if (found := _per_router(train, "load", n_mtp)) is None:
        return None
    steps, loads, names = found
    fig, axes = plt.subplots(len(names), 1, figsize=(9, 1.6 * len(names) + 1), sharex=True, squeeze=False)
    for i, (ax, name) in enumerate(zip(axes[:, 0], names)):
        grid = [[row[i][e] for row in loads] for e in range(len(loads[0][i]))]  # [E, steps]
        image = ax.imshow(grid, aspect="auto", cmap="coolwarm", vmin=0, vmax=2, interpolation="nearest",
                          extent=(steps[0], steps[-1], len(grid) - 0.5, -0.5))
        ax.set_ylabel(f"{name}\nexpert", fontsize=8)
    axes[-1, 0].set_xlabel("step")
    fig.colorbar(image, ax=axes[:, 0], label="load / mean load", shrink=0.8)
    fig.suptitle("expert load per layer (1 = balanced)")
    return fig


def _router_bias(plt, records, train, n_mtp):
    if (found := _per_router(train, "bias", n_mtp)) is None:
        return None
    steps, biases, names = found
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 2.8 * rows), squeeze=False, sharex=True)
    for i, name in enumerate(names):
        ax = axes[i // cols, i % cols]
        for e in range(len(biases[0][i])):
            ax.plot(steps, [b[i][e] for b in biases], linewidth=0.8)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    for j in range(len(names), rows * cols):
        axes[j // cols, j % cols].axis("off")
    fig.suptitle("router selection bias per expert")
    fig.supxlabel("step")
    return fig


def _maxvio(plt, records, train, n_mtp):
    steps, vio = _series(train, "maxvio")
    if not vio:
        return None
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.plot(steps, vio, label="batch, mean over layers")
    ax.plot(*_series(train, "maxvio_max"), alpha=0.6, label="batch, worst layer")
    val_steps, val = _series(records, "val_maxvio")
    if val_steps:
        ax.plot(val_steps, val, "o-", label="validation, mean over layers")
        ax.plot(*_series(records, "val_maxvio_max"), "s--", label="validation, worst layer")
    ax.set(xlabel="step", ylabel="MaxVio", title="load imbalance: (max load - mean) / mean")
    ax.grid(alpha=0.3)
    ax.legend()
    return fig


def _mtp_routers(run_dir: str) -> int:
    """MTP modules of the run's model (0 when its config.json is not there yet)."""
    try:
        return ModelConfig.from_hf(run_dir).num_nextn_predict_layers
    except Dsv3Error:
        return 0
