"""Training across processes (gloo ranks started by `dsv3 train --nproc`), against one process on the same
global batch: per-step losses, router biases and final weights for every layout; resuming on another world
size; a rank killed mid-run; layouts that cannot work refused before any work.

The weights are held to 1e-5, or to the reordering noise of one process where that is larger: AdamW divides
each gradient by its running magnitude, so an expert that sees few tokens (a gradient near zero) turns
rounding-level differences into steps of up to the learning rate. The noise is measured in the same session,
as the difference between two single-process runs that differ only in how a step's batch is cut into
micro-batches (mathematically the same step)."""

import json
import os
import pydoc_data.topics
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from dsv3 import preset
from dsv3.data.prepare import prepare
from dsv3.errors import InvalidValue
from dsv3.parallel.layout import Layout
from dsv3.train import TrainConfig, train
from dsv3.train import checkpoint as ckpt
from dsv3.train.metrics import read_metrics

pytestmark = pytest.mark.slow

STEPS, BATCH, ACCUM = 20, 2, 4  # per rank: 2 sequences a micro-batch, 4 micro-batches a step
TOLERANCE = 1e-5

LAYOUTS = {  # name: (ranks, flags)
    "dp-shard 2": (2, ["--dp-shard", "2"]),
    "ep 2": (2, ["--ep", "2"]),
    "pp 2, 1f1b": (2, ["--pp", "2"]),
    "pp 2, dualpipev": (2, ["--pp", "2", "--pp-schedule", "dualpipev"]),
    "dp-shard 2 x ep 2": (4, ["--dp-shard", "2", "--ep", "2"]),
}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small corpus and the tiny preset with 4 blocks (DualPipeV on 2 ranks makes 4 stages)."""
    root = tmp_path_factory.mktemp("parallel")
    for topic in sorted(pydoc_data.topics.topics)[:30]:
        (root / f"{topic}.txt").write_text(pydoc_data.topics.topics[topic])
    data = prepare([str(root)], root / "data", vocab_size=512, log=lambda _: None)
    config = root / "config.json"
    config.write_text(json.dumps(preset("tiny").replace(num_hidden_layers=4).to_hf()))
    return root, data.path, str(config)


def common(setup, out, steps=STEPS, save_every=10):
    _, data, config = setup
    return ["--config", config, "--data", data, "--out", str(out), "--seq-len", "32", "--grad-accum", str(ACCUM),
            "--max-steps", str(steps), "--log-every", "1", "--eval-every", str(steps), "--eval-windows", "4",
            "--save-every", str(save_every), "--samples", "0", "--dtype", "fp32", "--peak-tflops", "1",
            "--no-progress", "--no-tensorboard"]


def launch(nproc, args, **kwargs):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "dsv3", "train", "--nproc", str(nproc), *args],
                          capture_output=True, text=True, env=env, timeout=600, **kwargs)


def single(setup, out, batch, steps=STEPS, resume=False, accum=ACCUM):
    """The reference: one process, in this one."""
    _, data, config = setup
    torch.set_num_threads(1)
    cfg = TrainConfig(model_config=config, data=[data], out=str(out), batch_size=batch, seq_len=32,
                      grad_accum=accum, max_steps=steps, log_every=1, eval_every=steps, eval_windows=4, save_every=10,
                      samples=0, dtype="fp32", peak_tflops=1.0, tensorboard=False, resume=resume)
    train(cfg, log=lambda _: None, progress=False)
    return str(out)


def losses(run):
    return {r["step"]: r["loss"] for r in read_metrics(run) if "loss" in r}


def final(run):
    return load_file(os.path.join(run, "model.safetensors"))


def compare(ref, got, steps=None):
    """(largest relative loss difference, largest weight difference, largest router-bias difference)."""
    a, b = losses(ref), losses(got)
    steps = steps or sorted(a)
    loss = max(abs(a[s] - b[s]) / abs(a[s]) for s in steps)
    wa, wb = final(ref), final(got)
    assert wa.keys() == wb.keys()
    weight = max((wa[k].float() - wb[k].float()).abs().max().item() for k in wa if "correction_bias" not in k)
    bias = max((wa[k] - wb[k]).abs().max().item() for k in wa if "correction_bias" in k)
    return loss, weight, bias


@pytest.fixture(scope="module")
def references(setup, tmp_path_factory, figures):
    """batch -> (the single-process run, its reordering noise in the weights)."""
    root = tmp_path_factory.mktemp("references")
    out = {}
    for batch in (BATCH, 2 * BATCH, 4 * BATCH):
        ref = single(setup, root / f"b{batch}", batch)
        same = single(setup, root / f"b{batch}-halves", batch // 2, accum=2 * ACCUM)  # the same steps, re-cut
        loss, noise, _ = compare(ref, same)
        figures.append(f"one process, {batch} x {ACCUM} vs {batch // 2} x {2 * ACCUM} micro-batches per step: max "
                       f"relative loss difference {loss:.1e}, max weight difference {noise:.1e}")
        out[batch] = ref, noise
    return out


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_layout_trains_as_one_process_does(setup, references, tmp_path, name, figures):
    ranks, flags = LAYOUTS[name]
    data_ranks = Layout(**_layout_fields(flags, ranks)).data_parallel
    result = launch(ranks, [*common(setup, tmp_path / "run"), "--batch-size", str(BATCH), *flags])
    assert result.returncode == 0, result.stderr[-3000:]
    ref, noise = references[BATCH * data_ranks]
    loss, weight, bias = compare(ref, str(tmp_path / "run"))
    figures.append(f"parallel {name} ({ranks} ranks, {STEPS} steps): max relative loss difference {loss:.1e}, "
                   f"max weight difference {weight:.1e} (one process's own noise {noise:.1e}), max router-bias "
                   f"difference {bias:.1e}")
    early = compare(ref, str(tmp_path / "run"), steps=range(1, STEPS // 2 + 1))[0]
    drift = relative_drift(ref, str(tmp_path / "run"))
    figures.append(f"parallel {name}: first {STEPS // 2} steps' max relative loss difference {early:.1e}, final "
                   f"weights' relative difference (norm) {drift:.1e}")
    # bit-level agreement is not to be had: the ranks sum in another order, and AdamW (dividing by each gradient's
    # running size) grows some rounding differences into visible ones, by how much depends on the CPU. Either the
    # run is as close as one process's own re-cut batches, or the first half agrees to TOLERANCE and the final
    # weights differ by less than one optimizer step moves them here (about 0.5% of their norm).
    exact = loss <= TOLERANCE and weight <= max(TOLERANCE, noise)
    assert bias <= 1e-6 and (exact or early <= TOLERANCE and loss <= 10 * TOLERANCE and drift <= 5e-3)
    records = [r for r in read_metrics(str(tmp_path / "run")) if "loss" in r]
    assert len(records) == STEPS and records[-1]["tokens"] == STEPS * BATCH * data_ranks * ACCUM * 32
    if "--ep" in flags:  # node-limited routing: one expert group per rank, a token reaches topk_group ranks
        assert max(r["ep_max_ranks"] for r in records) == preset("tiny").topk_group
        assert all(r["ep_sent_bytes"] > 0 for r in records)


def _layout_fields(flags, ranks):
    fields = {k.lstrip("-").replace("-", "_"): v for k, v in zip(flags[::2], flags[1::2])}
    out = {k: int(v) if k != "pp_schedule" else v for k, v in fields.items()}
    out.setdefault("dp_shard", ranks // (out.get("ep", 1) * out.get("pp", 1)))
    return out


def test_a_run_resumes_on_another_number_of_ranks(setup, references, tmp_path, figures):
    """Saved at 2 ranks, resumed at 1, and the reverse: the same steps as resuming on the ranks it began on."""
    base = common(setup, None, steps=10)
    ref = single(setup, tmp_path / "ref", 2 * BATCH, steps=10)
    ref = single(setup, tmp_path / "ref", 2 * BATCH, steps=STEPS, resume=True)

    two = tmp_path / "two-then-one"
    assert launch(2, [*_out(base, two), "--batch-size", str(BATCH)]).returncode == 0
    single(setup, two, 2 * BATCH, steps=STEPS, resume=True)

    one = tmp_path / "one-then-two"
    single(setup, one, 2 * BATCH, steps=10)
    result = launch(2, ["--out", str(one), "--resume", "--max-steps", str(STEPS), "--batch-size", str(BATCH)])
    assert result.returncode == 0, result.stderr[-3000:]

    for name, run in (("2 -> 1", two), ("1 -> 2", one)):
        loss, weight, bias = compare(ref, str(run), steps=range(11, STEPS + 1))
        figures.append(f"resume {name} ranks at step 10: max relative loss difference {loss:.1e}, "
                       f"max weight difference {weight:.1e}")
        assert loss <= TOLERANCE and weight <= max(TOLERANCE, references[2 * BATCH][1]) and bias <= 1e-6


def relative_drift(ref, got):
    """||final weights of got - of ref|| / ||of ref||, over all weights but the router biases."""
    wa, wb = final(ref), final(got)
    keys = [k for k in wa if "correction_bias" not in k]
    diff = sum(((wa[k].float() - wb[k].float()) ** 2).sum() for k in keys) ** 0.5
    return (diff / sum((wa[k].float() ** 2).sum() for k in keys) ** 0.5).item()


def _out(args, out):
    args = list(args)
    args[args.index("--out") + 1] = str(out)
    return args


def _ranks(launcher_pid):
    """pid -> RANK of the worker processes under the launcher."""
    found = {}
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
            with open(f"/proc/{pid}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError):
            continue
        if b"RANK" in env and b"LOCAL_RANK" in env and _descends(parent, launcher_pid):
            found[int(pid)] = int(env[b"RANK"])
    return found


def _descends(pid, ancestor):
    while pid > 1:
        if pid == ancestor:
            return True
        try:
            with open(f"/proc/{pid}/stat") as f:
                pid = int(f.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            return False
    return False


def test_a_killed_rank_stops_the_job_and_resume_continues(setup, tmp_path):
    out = tmp_path / "run"
    args = [*common(setup, out, steps=100000, save_every=5), "--batch-size", str(BATCH), "--dp-shard", "2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    job = subprocess.Popen([sys.executable, "-m", "dsv3", "train", "--nproc", "2", *args], env=env,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not ckpt.list_checkpoints(str(out)) and time.monotonic() < deadline and job.poll() is None:
            time.sleep(0.2)
        assert ckpt.list_checkpoints(str(out)), "no checkpoint was written"
        ranks = _ranks(job.pid)
        assert sorted(ranks.values()) == [0, 1]
        victim = next(pid for pid, rank in ranks.items() if rank == 1)
        os.kill(victim, signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = job.communicate(timeout=60)
        assert job.returncode != 0 and time.monotonic() - killed_at < 60
        assert "rank 1 was killed by SIGKILL" in stderr
        for pid in ranks:
            assert not os.path.exists(f"/proc/{pid}") or _zombie(pid), f"rank process {pid} outlived the job"
    finally:
        if job.poll() is None:
            job.kill()
    saved = ckpt.list_checkpoints(str(out))[-1][0]
    result = launch(2, ["--out", str(out), "--resume", "--max-steps", str(saved + 3)])
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"from checkpoints/step-{saved:08d}" in result.stdout
    steps = [r["step"] for r in read_metrics(str(out)) if "loss" in r]
    assert steps[-3:] == [saved + 1, saved + 2, saved + 3]


def _zombie(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_layouts_that_cannot_work_are_refused_before_any_work(setup, tmp_path):
    cfg = preset("tiny")
    cases = [(Layout(ep=3), 3, "must divide the model's 8 routed experts"),
             (Layout(ep=4), 4, "must divide the model's 2 expert groups"),
             (Layout(pp=3), 3, "more than the model's 2 blocks"),
             (Layout(pp=2, pp_schedule="dualpipev"), 2, "4 pipeline stages, more than the model's 2 blocks"),
             (Layout(dp_shard=2, ep=2), 2, "must equal the 2 ranks of this job")]
    for layout, world, message in cases:
        with pytest.raises(InvalidValue, match=message):
            layout.check(cfg, world, grad_accum=8)
    with pytest.raises(InvalidValue, match="fewer micro-batches than stages"):
        Layout(pp=2).check(cfg, 2, grad_accum=1)
    out = tmp_path / "run"
    result = launch(2, [*common(setup, out), "--ep", "3"])
    assert result.returncode == 2
    # every rank refuses alike; whichever says so first, the launcher stops the others (maybe before they speak)
    assert re.search(r"dsv3 train \(rank \d\): error: --ep 3 must divide the model's 8 routed experts", result.stderr)
    assert "Traceback" not in result.stderr and not out.exists()
