"""`dsv3 report`: PNG plots from a run's metrics.jsonl, and clear errors without one or without matplotlib."""

import builtins
import json

import pytest

from dsv3.cli import main
from dsv3.errors import Dsv3Error
from dsv3.train.report import make_report

PNG = b"\x89PNG\r\n\x1a\n"


def fake_run(path, steps=6, routers=2, experts=4):
    """A metrics.jsonl as a run with one MoE layer and one MTP module writes it."""
    records = []
    for s in range(1, steps + 1):
        records.append({"step": s, "tokens": 64 * s, "loss": 6 - 0.1 * s, "mtp_loss": 6.1 - 0.1 * s,
                        "mtp_acc": 0.01 * s, "lr": 1e-3, "grad_norm": 1.0, "tokens_per_s": 1000.0 + s, "mfu": 0.3,
                        "maxvio": 1 / s, "maxvio_max": 2 / s, "load": [[1 + 0.1 * e for e in range(experts)]] * routers,
                        "bias": [[0.001 * s * (e - 1.5) for e in range(experts)]] * routers})
        if s % 3 == 0:
            records.append({"step": s, "val_loss": 5.5, "val_ppl": 245.0, "val_mtp_loss": 5.6, "val_mtp_acc": 0.1,
                            "val_maxvio": 0.2, "val_maxvio_max": 0.3})
    records.append({"step": steps, "summary": {"tokens": 64 * steps}})
    path.mkdir(exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_report_draws_every_plot(tmp_path):
    run = fake_run(tmp_path / "run")
    written = make_report(run)
    names = sorted(p.rsplit("/", 1)[1] for p in written)
    assert names == ["expert_load.png", "loss.png", "lr.png", "maxvio.png", "router_bias.png", "throughput.png"]
    for p in written:
        with open(p, "rb") as f:
            assert f.read(8) == PNG


def test_report_compares_the_losses_of_several_runs(tmp_path, capsys):
    runs = [fake_run(tmp_path / name) for name in ("bf16", "fp8")]
    assert main(["report", str(runs[0]), "--compare", str(runs[1]), "--out", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out.split()
    assert printed[-1] == str(tmp_path / "plots" / "compare_loss.png")
    with open(printed[-1], "rb") as f:
        assert f.read(8) == PNG


def test_report_cli_prints_the_files_and_takes_an_output_folder(tmp_path, capsys):
    run = fake_run(tmp_path / "run")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 5.')  # the last line of a run killed while writing it
    assert main(["report", str(run), "--out", str(tmp_path / "plots")]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == 6 and all(p.startswith(str(tmp_path / "plots")) for p in printed)


def test_report_errors_name_the_problem(tmp_path, capsys):
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no metrics.jsonl in" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "metrics.jsonl").write_text("")
    with pytest.raises(Dsv3Error, match="no training records yet"):
        make_report(tmp_path / "empty")


def test_report_without_matplotlib_says_how_to_install_it(tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    with pytest.raises(Dsv3Error, match=r"needs matplotlib; install it with `pip install 'dsv3\[plots\]'`"):
        make_report(fake_run(tmp_path / "run"))
