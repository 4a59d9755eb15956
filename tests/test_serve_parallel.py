"""One model split over two processes (gloo, tensor and expert parallel) against one process, fp32: the logits,
the greedy tokens of generate, chat and the served API with and without MTP speculation, each rank's memory,
and a rank killed mid-service."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest
import torch
from infer_models import one_thread, trained_tiny
from server_helpers import call, free_port, wait_up

from dsv3 import DeepSeekV3, preset, save_pretrained
from dsv3.checkpoint import load_pretrained
from dsv3.infer import Engine, SamplingParams
from dsv3.model.cache import new_cache
from dsv3.parallel.inference import local_bytes

pytestmark = pytest.mark.slow
HERE = os.path.dirname(__file__)
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(HERE)}


def torchrun(*args: str, timeout: float = 300, stdin: str | None = None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", *args]
    run = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=timeout, input=stdin)
    assert run.returncode == 0, run.stderr[-3000:]
    return run


def dsv3(*args: str, stdin: str | None = None) -> str:
    run = subprocess.run([sys.executable, "-m", "dsv3", *args], env=ENV, capture_output=True, text=True,
                         timeout=300, input=stdin)
    assert run.returncode == 0, run.stderr[-3000:]
    return run.stdout


def _random_model_dir(tmp_path_factory, name: str) -> str:
    torch.manual_seed(0)
    model = DeepSeekV3(preset(name))
    model.init_weights(std=0.05)  # larger than training's, so that logits are far from uniform
    directory = tmp_path_factory.mktemp(name)
    save_pretrained(model, str(directory))
    return str(directory)


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    return _random_model_dir(tmp_path_factory, "small")


@pytest.fixture(scope="module")
def dsa_dir(tmp_path_factory):
    """Sparse attention keeping 8 keys: the 24-token sequences below are sparse (each rank runs every indexer)."""
    return _random_model_dir(tmp_path_factory, "tiny-dsa")


@pytest.mark.parametrize("which", ["tiny", "small", "tiny-dsa"])
def test_two_ranks_compute_the_logits_of_one_process(which, small_dir, dsa_dir, tmp_path, figures):
    directory = {"tiny": trained_tiny()[2], "small": small_dir, "tiny-dsa": dsa_dir}[which]
    out = tmp_path / "split.json"
    torchrun(os.path.join(HERE, "parallel_infer_check.py"), directory, str(out))
    split = json.loads(out.read_text())
    model = load_pretrained(directory, "fp32")
    torch.manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    with one_thread(), torch.inference_mode():
        full = model.run(ids, mtp=True)
        cache = new_cache(model.config, 2, 32, "fp32")
        model.run(ids[:, :16], cache=cache)
        step = model.run(ids[:, 16:], torch.arange(16, 24).expand(2, 8), cache, attn="absorb").logits
    worst = 0.0
    for name, want in (("logits", full.logits), ("mtp", full.mtp_logits[0]), ("decode", step)):
        got = torch.tensor(split[name])
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        worst = max(worst, float((got - want).abs().max()))
    whole = local_bytes(model)
    shares = [b / whole for b in split["bytes"]]
    assert all(0.45 < s < 0.62 for s in shares), shares  # half of what is split, all of what is replicated
    figures.append(f"2 ranks vs 1 process, {which}: max |logit diff| {worst:.1e}; each rank holds "
                   f"{shares[0]:.1%} of the weights")


@pytest.mark.parametrize("speculative", [[], ["--speculative", "mtp"]], ids=["plain", "mtp"])
def test_generate_and_chat_across_two_ranks_give_one_process_tokens(speculative):
    _, _, directory = trained_tiny()
    args = ["--model", directory, "--max-new-tokens", "24", "--cache-dtype", "fp32", *speculative]
    prompt = "the latent cache"
    assert dsv3("generate", *args, "--nproc", "2", prompt) == dsv3("generate", *args, prompt)
    turns = "multi token\na server\n"
    chat = ["chat", *args, "--temperature", "0", "--max-new-tokens", "12"]
    assert dsv3(*chat, "--nproc", "2", stdin=turns) == dsv3(*chat, stdin=turns)


def test_serve_across_two_ranks_answers_as_one_process_and_dies_with_a_rank():
    model, tok, directory = trained_tiny()
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "dsv3", "serve", "--model", directory, "--port", str(port),
                             "--name", "split", "--cache-dtype", "fp32", "--speculative", "mtp", "--nproc", "2"],
                            env=ENV, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
    try:
        wait_up(proc, port, timeout=90)
        engine = Engine(model, tok, max_batch=4, cache_dtype="fp32", speculative=True)
        prompts = ["the latent cache", "experts are chosen", "a server batches"]
        params = SamplingParams(max_new_tokens=16, stop_token_ids=(tok.eos_id,))
        with one_thread():
            want = [s.text for s in engine.generate([tok.encode(p, bos=True) for p in prompts], params)]
        status, out = call(port, "POST", "/v1/completions", {"model": "split", "prompt": prompts, "max_tokens": 16,
                                                             "temperature": 0}, key=None)
        assert status == 200 and [c["text"] for c in out["choices"]] == want
        status, out = call(port, "POST", "/v1/chat/completions", {
            "model": "split", "messages": [{"role": "user", "content": "multi token"}], "max_tokens": 12,
            "temperature": 0}, key=None)
        assert status == 200 and out["choices"][0]["message"]["content"]

        # SIGKILL one rank: the job stops and says so, well within a minute
        ranks = subprocess.run(["pgrep", "-f", f"dsv3 serve --model {directory} --port {port}"], capture_output=True,
                               text=True).stdout.split()
        follower = next(p for p in map(int, ranks) if _rank_of(p) == 1)
        os.kill(follower, signal.SIGKILL)
        start = time.monotonic()
        code = proc.wait(timeout=60)
        assert code != 0 and time.monotonic() - start < 60
        assert "rank 1 was killed by SIGKILL" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _rank_of(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            env = dict(v.split(b"=", 1) for v in f.read().split(b"\0") if b"=" in v)
    except OSError:
        return None
    return int(env[b"RANK"]) if b"RANK" in env else None


def test_ranks_stop_drafting_together(tmp_path):
    """With a useless MTP module every sequence stops drafting after a few steps, on the leader's timings; the
    other ranks are told, so the job neither hangs nor diverges and its tokens are one process's."""
    import shutil

    model, tok, directory = trained_tiny()
    useless = tmp_path / "useless-mtp"
    shutil.copytree(directory, useless)
    broken = load_pretrained(directory, "fp32")
    torch.manual_seed(1)
    for p in broken.mtp.parameters():
        p.data.normal_(0, 0.5)
    save_pretrained(broken, str(useless))
    args = ["--model", str(useless), "--max-new-tokens", "40", "--cache-dtype", "fp32", "--speculative", "mtp",
            "--stats"]
    split = subprocess.run([sys.executable, "-m", "dsv3", "generate", *args, "--nproc", "2", "the latent cache"],
                           env=ENV, capture_output=True, text=True, timeout=300)
    assert split.returncode == 0, split.stderr[-3000:]
    assert split.stdout == dsv3("generate", *args, "the latent cache")
    acceptance = re.search(r"MTP acceptance ([\d.]+)% \((\d+)/(\d+)\)", split.stderr)
    assert acceptance and int(acceptance[3]) < 39  # it stopped drafting before the end
