"""Exact resume after SIGKILL: a 30-step fp32 run saving every 5 steps, killed twice at random moments (in a
step, in an evaluation, in the middle of a save) and resumed each time, ends with bit-identical weights and
the same loss sequence as the same run uninterrupted."""

import os
import pydoc_data.topics
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from dsv3.data.prepare import prepare
from dsv3.train.metrics import read_metrics

ARGS = ["--preset", "tiny", "--max-steps", "30", "--save-every", "5", "--dtype", "fp32", "--batch-size", "4",
        "--seq-len", "32", "--log-every", "1", "--eval-every", "10", "--eval-windows", "4", "--samples", "0",
        "--peak-tflops", "1", "--no-progress", "--no-tensorboard"]
# one thread: the same arithmetic in every process, and the tiny model's fastest setting
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def start(data: str, out: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "dsv3.cli", "train", *ARGS, "--data", data, "--out", out, *extra]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc: subprocess.Popen) -> str:
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, output
    return output


def steps_logged(out: str) -> int:
    if not os.path.isfile(os.path.join(out, "metrics.jsonl")):  # the run has not started logging yet
        return 0
    return sum(1 for r in read_metrics(out, strict=False) if "loss" in r)


def kill_after(proc: subprocess.Popen, out: str, at_least: int, extra_s: float) -> None:
    """SIGKILL once `at_least` steps are logged, plus up to extra_s seconds: any instant of the run."""
    while steps_logged(out) < at_least and proc.poll() is None:
        time.sleep(0.005)
    time.sleep(extra_s)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


@pytest.mark.slow
def test_sigkill_at_random_moments_then_resume_is_bit_identical(tmp_path):
    root = tmp_path / "corpus"
    root.mkdir()
    for topic in sorted(pydoc_data.topics.topics)[:30]:
        (root / f"{topic}.txt").write_text(pydoc_data.topics.topics[topic])
    data = prepare([str(root)], tmp_path / "data", vocab_size=512, log=lambda _: None).path

    ref = str(tmp_path / "ref")
    finish(start(data, ref))

    seed = random.SystemRandom().randrange(2**32)
    rng = random.Random(seed)
    out = str(tmp_path / "killed")
    first, second = sorted(rng.sample(range(1, 29), 2))
    kill_after(start(data, out), out, first, rng.uniform(0, 0.05))
    kill_after(start(data, out, "--resume"), out, second, rng.uniform(0, 0.05))
    log = finish(start(data, out, "--resume"))

    where = f"(kills after steps {first} and {second}, seed {seed}; last resume: {log.splitlines()[1]})"
    a, b = load_file(os.path.join(ref, "model.safetensors")), load_file(os.path.join(out, "model.safetensors"))
    assert a.keys() == b.keys()
    assert all(a[k].equal(b[k]) for k in a), f"weights differ {where}"
    losses = [[r["loss"] for r in read_metrics(d) if "loss" in r] for d in (ref, out)]
    assert len(losses[0]) == 30 and losses[0] == losses[1], where
