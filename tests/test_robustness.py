"""Nothing lost, nobody harmed: one test per class of bad input, kill and hostile request.

1 a request's bad numbers fail that request only    6 client mistakes are 4xx, never 5xx
2 convert never touches its source                  7 one sentence and exit 2, never a traceback
3 a model folder needs its tokenizer                8 absurd sizes are refused with the figure
4 prepare --out does not clobber                    9 no value silently replaced
5 request size, prompt length, slow clients         10 hygiene: keys, docs, index paths, leftovers
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import server_helpers
import torch
from infer_models import assert_same_or_near_tie, one_thread, trained_tiny
from server_helpers import KEY, NAME, call, free_port, live_server, wait_idle

from dsv3 import preset
from dsv3.cli import main
from dsv3.data.prepare import prepare
from dsv3.infer import Engine, SamplingParams
from dsv3.infer import engine as engine_module

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_thread():
        yield


def one_sentence(capsys, verb: str) -> str:
    """The error a CLI run printed: one line, named after the verb, no traceback."""
    err = capsys.readouterr().err
    assert err.startswith(f"dsv3 {verb}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def tree_hash(folder: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        h.update(str(path.relative_to(folder)).encode())
        if path.is_file():
            h.update(path.read_bytes())
    return h.hexdigest()


# ----- 1. a request's bad numbers fail that request only -------------------------------------------------
HOSTILE = [  # (what is sent, the status it gets)
    ({"temperature": 1e-300}, 200),  # once: overflow to inf, NaN probabilities, the whole batch failed; now greedy
    ({"temperature": 1e-45}, 200),
    ({"temperature": 2.0, "top_p": 1e-300}, 200),  # keeps the likeliest token, as top_p always does
    ({"top_k": 10**12}, 200),  # more than the vocabulary: no filter
    ({"seed": 2**64}, 400),
    ({"seed": -(2**63) - 1}, 400),
    ({"max_tokens": 2**62}, 400),
    ({"stop": ["\ud800"]}, 400),
    ({"temperature": "nan"}, 400),
]


def test_hostile_requests_beside_six_streams_leave_them_whole():
    model, tok, _ = trained_tiny()
    prompts = ["the latent cache", "multi token", "experts are chosen", "a server", "the model checks", "the load"]
    kw = {"model": NAME, "max_tokens": 48, "temperature": 0}
    with live_server() as (port, _):
        alone = [call(port, "POST", "/v1/completions", {**kw, "prompt": p})[1]["choices"][0]["text"]
                 for p in prompts]

        def stream(prompt):
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            conn.request("POST", "/v1/completions", json.dumps({**kw, "prompt": prompt, "stream": True}),
                         {"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
            text = ""
            for line in conn.getresponse().read().decode().splitlines():
                if line.startswith("data: {"):
                    text += json.loads(line[6:])["choices"][0]["text"]
            return text

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            streams = [pool.submit(stream, p) for p in prompts]
            time.sleep(0.3)  # the six are decoding now
            answers = []
            for extra, _ in HOSTILE:
                body = {"model": NAME, "prompt": "a server", "max_tokens": 4, **extra}
                raw = json.dumps(body).replace('"nan"', "NaN")  # JSON as Python writes it: NaN is accepted
                answers.append(call(port, "POST", "/v1/completions", raw=raw)[0])
            together = [f.result(timeout=120) for f in streams]
        assert answers == [status for _, status in HOSTILE]
        for prompt, solo, got in zip(prompts, alone, together):
            assert_same_or_near_tie(model, tok.encode(prompt, bos=True), tok.encode(solo), tok.encode(got))
        wait_idle(port)


def test_a_failure_in_one_sequence_ends_that_sequence_alone(monkeypatch):
    model, tok, _ = trained_tiny()
    real = engine_module.sample

    def fails_for_one(logits, params, generator):
        if params.seed == 13:
            raise RuntimeError("this request's sampling broke")
        return real(logits, params, generator)

    monkeypatch.setattr(engine_module, "sample", fails_for_one)
    engine = Engine(model, tok, max_batch=3, cache_dtype="fp32")
    prompts = [tok.encode(p) for p in ("the latent cache", "a server", "multi token")]
    seeds = [None, 13, None]
    seqs = [engine.add(p, SamplingParams(max_new_tokens=12, seed=s)) for p, s in zip(prompts, seeds)]
    while engine.has_work():
        engine.step()
    assert [s.finish_reason for s in seqs] == ["length", "error", "length"]
    assert "sampling broke" in seqs[1].error
    for s in (seqs[0], seqs[2]):
        alone = Engine(model, tok, cache_dtype="fp32").generate([s.prompt], SamplingParams(max_new_tokens=12))[0]
        assert s.tokens == alone.tokens
    assert engine.free_slots == 3 and engine.pool.in_use == 0


def test_cli_sampling_values_are_checked(capsys):
    for flag, value, message in (("--temperature", "nan", "--temperature nan must be a finite number"),
                                 ("--temperature", "inf", "--temperature inf must be a finite number"),
                                 ("--seed", str(2**64), "--seed 18446744073709551616 must be an integer in")):
        assert main(["generate", "--preset", "tiny", flag, value, "hi"]) == 2
        assert message in one_sentence(capsys, "generate")
    assert main(["generate", "--preset", "tiny", "--temperature", "1e-300", "--max-new-tokens", "3", "hi"]) == 0


# ----- 2. convert never touches its source; a killed convert leaves no destination or a whole one --------
@pytest.fixture
def model_dir(tmp_path):
    _, tok, directory = trained_tiny()
    shutil.copytree(directory, tmp_path / "model")
    return tmp_path / "model"


def test_convert_refuses_destinations_that_reach_the_source(model_dir, tmp_path, capsys):
    before = tree_hash(model_dir)
    (tmp_path / "link").symlink_to(model_dir)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("keep me")
    (tmp_path / "afile").write_text("x")
    cases = [(tmp_path / "link", "is, holds or lies inside the source"),
             (model_dir / "sub", "is, holds or lies inside the source"),
             (tmp_path, "is, holds or lies inside the source"),
             (tmp_path / "busy", "already holds files; pass --overwrite"),
             (tmp_path / "afile", "is a file")]
    for dst, message in cases:
        assert main(["convert", str(model_dir), str(dst), "--dtype", "bf16"]) == 2
        assert message in one_sentence(capsys, "convert")
    assert tree_hash(model_dir) == before and (tmp_path / "busy" / "notes.txt").read_text() == "keep me"
    assert main(["convert", str(model_dir), str(tmp_path / "busy"), "--dtype", "bf16", "--overwrite"]) == 0
    assert not (tmp_path / "busy" / "notes.txt").exists() and (tmp_path / "busy" / "model.safetensors").exists()
    assert tree_hash(model_dir) == before


KILLER = """
import os, signal, sys
import safetensors.torch
from dsv3 import utils
n, calls = int(sys.argv[1]), [0]
def killing(real):
    def wrapped(*args, **kwargs):
        calls[0] += 1
        if calls[0] == n:
            os.kill(os.getpid(), signal.SIGKILL)
        return real(*args, **kwargs)
    return wrapped
os.replace, os.rename = killing(os.replace), killing(os.rename)
safetensors.torch.save_file = killing(safetensors.torch.save_file)
utils._exchange = killing(utils._exchange)
from dsv3.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.slow
def test_convert_killed_at_every_write_leaves_no_destination_or_a_whole_one(model_dir, tmp_path):
    """SIGKILL before the 1st, 2nd, ... file write, rename or folder exchange of a conversion into an existing
    destination: the destination is the old conversion or the new one, loadable, and the source unchanged."""
    from dsv3 import load_pretrained

    source = tree_hash(model_dir)
    dst = tmp_path / "dst"
    args = ["convert", str(model_dir), str(dst), "--dtype", "fp8", "--max-shard-size", "60KB", "--overwrite"]
    assert main(["convert", str(model_dir), str(dst), "--dtype", "bf16"]) == 0  # a whole bf16 one to start from
    outcomes = set()
    for n in range(1, 30):
        proc = subprocess.run([sys.executable, "-c", KILLER, str(n), *args], env=ENV, capture_output=True, text=True,
                              timeout=120)
        assert proc.returncode in (0, -signal.SIGKILL), proc.stderr
        model = load_pretrained(dst, torch.float32)  # whatever is there loads: the old one or the new one
        outcomes.add(json.loads((dst / "config.json").read_text()).get("quantization_config") is not None)
        assert tree_hash(model_dir) == source and len(model.layers) == 2
        assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] in ([], [p.name for p in
                tmp_path.iterdir() if p.name.startswith(".convert-")])  # at most the killed run's staging
        if proc.returncode == 0:
            break
    assert proc.returncode == 0 and outcomes == {False, True}  # killed before and after the exchange, then done
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # a finished run cleaned up the rest


# ----- 3. a model folder needs its tokenizer; 4. prepare --out does not clobber --------------------------
def test_a_model_folder_without_its_tokenizer_is_an_error(model_dir, capsys):
    os.remove(model_dir / "tokenizer.json")
    assert main(["generate", "--model", str(model_dir), "hello"]) == 2
    assert "has no tokenizer.json" in one_sentence(capsys, "generate")


def test_prepare_out_refuses_a_folder_holding_other_files(model_dir, tmp_path, capsys):
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("a small corpus of text. " * 400)
    before = tree_hash(model_dir)
    assert main(["prepare", str(corpus), "--out", str(model_dir), "--vocab-size", "300"]) == 2
    assert "already holds files; pass --overwrite" in one_sentence(capsys, "prepare")
    assert tree_hash(model_dir) == before  # the model's tokenizer is still its own
    data = tmp_path / "data"
    assert main(["prepare", str(corpus), "--out", str(data), "--vocab-size", "300"]) == 0
    assert main(["prepare", str(corpus), "--out", str(data), "--vocab-size", "310"]) == 0  # its own: replaced
    assert json.loads((data / "manifest.json").read_text())["settings"]["vocab_size"] == 310
    assert main(["prepare", str(corpus), "--out", str(model_dir), "--vocab-size", "300", "--overwrite"]) == 0
    assert not (model_dir / "model.safetensors").exists() and (model_dir / "manifest.json").exists()


# ----- 5. request size, prompt length, slow clients; 6. client mistakes are 4xx --------------------------
def raw_request(port, data: bytes, timeout=30) -> bytes:
    """Send raw bytes, return what the server answers until it closes. A server that refuses a body closes
    without reading the rest, which may reset the connection: what arrived before the reset is the answer."""
    chunks = []
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        try:
            s.sendall(data)
            while chunk := s.recv(65536):
                chunks.append(chunk)
        except (ConnectionResetError, BrokenPipeError):
            pass
    return b"".join(chunks)


def test_oversized_bodies_huge_prompts_and_slow_clients(capsys):
    with live_server(request_timeout=1.0, max_body_bytes=20_000) as (port, _):
        big = json.dumps({"model": NAME, "prompt": "x" * 30_000}).encode()
        head = (f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                "Content-Type: application/json\r\n")
        answer = raw_request(port, f"{head}Content-Length: {len(big)}\r\n\r\n".encode())  # refused on its length
        assert answer.startswith(b"HTTP/1.1 413") and b"request_too_large" in answer
        chunked = b"".join(b"%x\r\n%s\r\n" % (len(big[i:i + 8_000]), big[i:i + 8_000])
                           for i in range(0, len(big), 8_000)) + b"0\r\n\r\n"
        answer = raw_request(port, f"{head}Transfer-Encoding: chunked\r\n\r\n".encode() + chunked)
        assert answer.startswith(b"HTTP/1.1 413")
        # a prompt that cannot fit the context is refused from its length, fast, beside a running stream
        t0 = time.perf_counter()
        status, out = call(port, "POST", "/v1/completions", {"model": NAME, "prompt": "word " * 3_500})
        assert status == 400 and out["error"]["code"] == "context_length_exceeded"
        assert time.perf_counter() - t0 < 5
        # idle and slow-sending connections are closed after the request timeout (1 s here)
        idle = [socket.create_connection(("127.0.0.1", port)) for _ in range(5)]
        slow = socket.create_connection(("127.0.0.1", port))
        slow.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
        for s in [*idle, slow]:
            s.settimeout(10)
            assert s.recv(100) == b""  # closed by the server
            s.close()
        assert call(port, "GET", "/health")[0] == 200  # and it serves on


def test_client_mistakes_get_4xx_with_openai_errors():
    template = ("{% for m in messages %}{% if m['content'] == 'boom' %}{{ m.missing.attr }}{% endif %}"
                "{% if m['content'] != 'empty' %}{{ m['content'] }}{% endif %}{% endfor %}")
    with live_server(api_key="clé-secrète", template=template) as (port, _):
        key = "clé-secrète"
        auth = {"Authorization": b"Bearer " + key.encode("utf-8")}
        ok = {"model": NAME, "messages": [{"role": "user", "content": "a server"}], "max_tokens": 2}
        cases = [
            (dict(body=ok, key=None, headers=auth), 200),  # a non-ASCII key works, sent as UTF-8 bytes
            (dict(body=ok, key=None, headers={"Authorization": b"Bearer \xff\xfe"}), 401),
            (dict(body={**ok, "messages": [{"role": "user", "content": "\ud800"}]}, key=key), 400),
            (dict(body={**ok, "seed": 2**64}, key=key), 400),
            (dict(body={**ok, "messages": [{"role": "user", "content": "empty"}]}, key=key), 400),
            (dict(body={**ok, "messages": [{"role": "user", "content": "boom"}]}, key=key), 400),
        ]
        for kwargs, status in cases:
            got, answer = call(port, "POST", "/v1/chat/completions", **kwargs)
            assert got == status, (kwargs, answer)
            if status != 200:
                assert answer["error"]["message"] and answer["error"]["type"]


# ----- 10. hygiene -----------------------------------------------------------------------------------------
def test_every_route_but_health_wants_the_key():
    with live_server() as (port, _):
        for path in ("/docs", "/redoc", "/openapi.json", "/v1/models"):
            assert call(port, "GET", path, key=None)[0] == 401, path
        assert call(port, "GET", "/openapi.json")[0] == 200
        assert call(port, "GET", "/health", key=None)[0] == 200


def start_serve(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "dsv3.cli", "serve", *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env=env or ENV)


def wait_up(proc, port, key, timeout=60):
    server_helpers.wait_up(proc, port, key, timeout, path="/v1/models")  # the key is checked on the way


@pytest.mark.slow
def test_serve_key_from_the_environment_or_a_file_and_a_port_in_use(model_dir, tmp_path):
    port = free_port()
    proc = start_serve("--model", str(model_dir), "--port", str(port), env={**ENV, "DSV3_API_KEY": "from-env"})
    try:
        wait_up(proc, port, "from-env")
        assert call(port, "GET", "/v1/models", key="wrong")[0] == 401
        # a second server on the same port: refused before it announces anything
        second = subprocess.run([sys.executable, "-m", "dsv3.cli", "serve", "--preset", "tiny", "--port", str(port)],
                                capture_output=True, text=True, env=ENV, timeout=60)
        assert second.returncode == 2 and "cannot listen on 127.0.0.1" in second.stderr
        assert "serving" not in second.stderr and second.stderr.count("\n") == 1
    finally:
        proc.terminate()
        proc.wait(30)
    (tmp_path / "key").write_text("from-file\n")
    port = free_port()
    proc = start_serve("--model", str(model_dir), "--port", str(port), "--api-key-file", str(tmp_path / "key"),
                       "--host", "0.0.0.0")
    try:
        wait_up(proc, port, "from-file")
    finally:
        proc.terminate()
        proc.wait(30)
    assert "warning" not in proc.stderr.read()  # keyed: no warning
    proc = start_serve("--preset", "tiny", "--port", str(free_port()), "--host", "0.0.0.0")
    try:
        lines = [proc.stderr.readline() for _ in range(2)]  # the warning, then "serving ..."
    finally:
        proc.terminate()
        proc.wait(30)
    assert "without an API key" in lines[0] and lines[1].startswith("serving")


def test_a_shard_index_cannot_reach_outside_the_model_folder(model_dir, tmp_path, capsys):
    shutil.copy(model_dir / "model.safetensors", tmp_path / "outside.safetensors")
    from safetensors import safe_open

    with safe_open(model_dir / "model.safetensors", "pt") as f:
        names = list(f.keys())
    index = {"metadata": {}, "weight_map": dict.fromkeys(names, "../outside.safetensors")}
    (model_dir / "model.safetensors.index.json").write_text(json.dumps(index))
    assert main(["generate", "--model", str(model_dir), "hello"]) == 2
    assert "names the shard '../outside.safetensors'" in one_sentence(capsys, "generate")


def test_leftovers_of_killed_writers_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".tmp-{dead}-abc-config.json").write_text("half")
    (tmp_path / f".tmp-{os.getpid()}-live-config.json").write_text("mine, still being written")
    (tmp_path / f".convert-{dead}-xyz-out").mkdir()
    from dsv3.utils import atomic_write_text, staged_directory

    atomic_write_text(tmp_path / "config.json", "{}")
    with staged_directory(tmp_path / "out", "convert") as staging:
        Path(staging, "f").write_text("x")
    left = sorted(p.name for p in tmp_path.iterdir())
    assert left == [f".tmp-{os.getpid()}-live-config.json", "config.json", "out"]


# ----- 7. one sentence and exit 2; 8. absurd sizes; 9. no value silently replaced ------------------------
def test_absurd_sizes_are_refused_with_the_figure(tmp_path, capsys):
    huge_vocab = preset("tiny").replace(vocab_size=10**9)
    huge_experts = preset("tiny").replace(n_routed_experts=10**12, n_group=1, topk_group=1)
    for name, cfg in (("vocab", huge_vocab), ("experts", huge_experts)):
        cfg.save(tmp_path / f"{name}.json")
        assert main(["train", "--config", str(tmp_path / f"{name}.json"), "--out", str(tmp_path / name)]) == 2
        assert "GiB but cpu memory has" in one_sentence(capsys, "train")
        assert not (tmp_path / name).exists()  # refused before anything was written
    assert main(["train", "--preset", "tiny", "--batch-size", "1000000", "--out", str(tmp_path / "b")]) == 2
    assert "batches of 1000000 x 256 tokens needs about" in one_sentence(capsys, "train")
    assert main(["generate", "--preset", "v3", "hello"]) == 2
    assert "the v3 preset needs about" in one_sentence(capsys, "generate")
    (tmp_path / "c.txt").write_text("a few words")
    assert main(["prepare", str(tmp_path / "c.txt"), "--out", str(tmp_path / "d"), "--vocab-size", str(10**9)]) == 2
    assert "training a 1,000,000,000-token tokenizer needs about" in one_sentence(capsys, "prepare")


def test_no_value_is_silently_replaced(model_dir, tmp_path, capsys, monkeypatch):
    corpus = tmp_path / "c.txt"
    corpus.write_text("text " * 100)
    cases = [
        ("prepare", [str(corpus), "--out", str(tmp_path / "d"), "--vocab-size", "0"], "--vocab-size 0 is too small"),
        ("generate", ["--preset", "tiny", "--threads", "0", "hi"], "--threads 0 must be at least 1"),
        ("generate", ["--preset", "tiny", "--max-len", "0", "hi"], "--max-len 0 must be an integer of at least 2"),
        ("generate", ["--preset", "tiny", "--max-len", "100000", "hi"], "exceeds the model's max_position_emb"),
        ("train", ["--preset", "tiny", "--out", str(tmp_path / "nowhere"), "--resume"], "no training run in"),
        ("train", ["--preset", "tiny", "--out", str(tmp_path / "r"), "--resume", "--overwrite"], "give one of them"),
        ("chat", ["--model", str(model_dir), "--max-len", "40", "--system", "word " * 100], "--system prompt alone"),
    ]
    monkeypatch.setattr(sys, "stdin", open(os.devnull))  # noqa: SIM115 - chat reads nothing before it fails
    for verb, args, message in cases:
        assert main([verb, *args]) == 2, (verb, args)
        assert message in one_sentence(capsys, verb), (verb, args)
    assert not (tmp_path / "nowhere").exists()


def test_bad_flags_and_inputs_are_one_sentence(model_dir, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    deep = tmp_path / "deep.jsonl"
    deep.write_text('{"text": ' + "[" * 100_000 + "]" * 100_000 + "}\n")
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00binary\xff\xfe\n{}")
    mc = tmp_path / "mc.jsonl"
    mc.write_text(json.dumps({"question": "which?", "choices": ["a", "b"], "answer": 2}) + "\n")
    ppl = tmp_path / "ppl.jsonl"
    ppl.write_text(json.dumps({"text": "a document"}) + "\n")
    (model_dir / "tokenizer_config.json").write_text("[1, 2, 3]")
    cases = [
        ("serve", ["--preset", "tiny", "--port", "-1"], "--port -1 must be a port number"),
        ("generate", ["--preset", "tiny", "--max-len", "-5", "hi"], "--max-len -5"),
        ("generate", ["--preset", "tiny", "--threads", "-1", "hi"], "--threads -1 must be at least 1"),
        ("train", ["--preset", "tiny", "--device", "bogus", "--out", str(tmp_path / "t")], "--device 'bogus'"),
        ("train", ["--preset", "tiny", "--device", "meta", "--out", str(tmp_path / "t")], "--device 'meta'"),
        ("train", ["--preset", "tiny", "--out", str(tmp_path / "afile")], "is a file"),
        ("train", ["--preset", "tiny", "--data-dir", str(tmp_path / "afile"), "--out", str(tmp_path / "t2")],
         "is a file"),
        ("prepare", [str(deep), "--out", str(tmp_path / "d")], "nested too deeply"),
        ("audit", [str(deep)], "nested too deeply"),
        ("cost", ["--from-run", str(run)], "line 1 is not JSON"),
        ("report", [str(run)], "line 1 is not a metrics record"),
        ("generate", ["--model", str(model_dir), "hi"], "must hold a JSON object"),
        ("eval", ["--model", str(model_dir), str(tmp_path / "nowhere.jsonl")], "does not exist"),
        ("eval", ["--model", str(model_dir), str(deep)], "nested too deeply"),
        ("eval", ["--model", str(model_dir), str(mc)], "\"answer\" must be the index of the right choice"),
        ("eval", ["--model", str(model_dir), str(ppl), "--max-len", "2"], "--max-len 2 must be from 3"),
    ]
    for verb, args, message in cases:
        assert main([verb, *args]) == 2, (verb, args)
        assert message in one_sentence(capsys, verb), (verb, args)
    assert not (tmp_path / "t").exists()


@pytest.mark.slow
def test_text_that_is_not_utf8_is_one_sentence(model_dir):
    """Bytes that are not UTF-8 in a prompt (argv) and in chat input (stdin)."""
    gen = subprocess.run([sys.executable.encode(), b"-m", b"dsv3.cli", b"generate", b"--preset", b"tiny",
                          b"caf\xe9"], capture_output=True, env=ENV, timeout=60)
    assert gen.returncode == 2 and b"the prompt is not valid UTF-8" in gen.stderr and b"Traceback" not in gen.stderr
    chat = subprocess.run([sys.executable, "-m", "dsv3.cli", "chat", "--model", str(model_dir)], input=b"caf\xe9\n",
                          capture_output=True, env=ENV, timeout=60)
    assert chat.returncode == 2 and b"that line is not valid UTF-8" in chat.stderr and b"Traceback" not in chat.stderr


# ----- the fuzz: every verb's file inputs, damaged ---------------------------------------------------------
def damaged(data: bytes, seed: int) -> list[tuple[str, bytes]]:
    """Truncated, bit-flipped and (for JSON) type-swapped variants of a valid file."""
    rng = random.Random(seed)
    out = [("empty", b""), ("half", data[: len(data) // 2]), ("one byte short", data[:-1])]
    for _ in range(4):
        pos = rng.randrange(len(data))
        out.append((f"bit {pos}", data[:pos] + bytes([data[pos] ^ (1 << rng.randrange(8))]) + data[pos + 1 :]))
    try:
        obj = json.loads(data)
    except ValueError:
        return out
    if isinstance(obj, dict):
        for key in sorted(obj)[:8]:
            for swap in ([], "x", None, {"a": [1]}, True, -1):
                out.append((f"{key}={swap!r}", json.dumps({**obj, key: swap}).encode()))
    out.append(("a list", json.dumps([obj]).encode()))
    return out


def damaged_safetensors(data: bytes, seed: int) -> list[tuple[str, bytes]]:
    """damaged() plus headers whose entries have the wrong fields and types, over intact tensor bytes."""
    n = int.from_bytes(data[:8], "little")
    header, body = json.loads(data[8 : 8 + n]), data[8 + n :]
    name = next(k for k in header if k != "__metadata__")
    out = damaged(data, seed)[:7]
    for field, value in (("dtype", 5), ("dtype", "F99"), ("shape", "x"), ("shape", [10**6]), ("data_offsets", [1]),
                         ("data_offsets", [0, 10**12]), ("data_offsets", None)):
        h = json.dumps({**header, name: {**header[name], field: value}}).encode()
        out.append((f"{name}.{field}={value!r}", len(h).to_bytes(8, "little") + h + body))
    return out


def check_exit(capsys, verb: str, args: list[str], what: str) -> int:
    code = main([verb, *args])
    err = capsys.readouterr().err
    if code != 0:
        assert code == 2 and err.startswith(f"dsv3 {verb}: error: ") and err.count("\n") == 1, (what, code, err)
    return code


@pytest.mark.slow
def test_damaged_files_give_exit_0_or_one_sentence(model_dir, tmp_path, capsys, figures):
    """Every file a verb reads, truncated, bit-flipped and type-swapped: exit 0, or exit 2 with one sentence."""
    cfg_file = tmp_path / "config.json"
    shutil.copy(model_dir / "config.json", cfg_file)
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"text": f"document {i} about the latent cache. " * 20}) + "\n"
                              for i in range(30)))
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(json.dumps({"step": i, "loss": 5.0 - i / 10, "mfu": 0.1,
                                                           "lr": 1e-3, "tokens_per_s": 100.0}) + "\n"
                                               for i in range(1, 4)))
    chats = tmp_path / "chats.jsonl"
    chats.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"question {i}?"},
                                                      {"role": "assistant", "content": f"answer {i}."}]}) + "\n"
                             for i in range(12)))
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": p, "language": lang}) + "\n"
                               for p, lang in (("Who are you?", "en"), ("你是谁？", "zh"))))
    choices = tmp_path / "choices.jsonl"
    choices.write_text("".join(json.dumps({"question": f"Question {i}:", "choices": ["yes", "no"], "answer": i % 2})
                               + "\n" for i in range(3)))
    verbs = {
        choices: [("eval", ["--model", str(model_dir), str(choices), "--max-len", "32", "--max-batch", "4"])],
        chats: [("sft", ["--preset", "tiny", "--data", str(chats), "--out", str(tmp_path / "sft"), "--overwrite",
                         "--max-steps", "1", "--seq-len", "32", "--batch-size", "2", "--eval-windows", "1",
                         "--peak-tflops", "1", "--no-tensorboard", "--no-progress"])],
        prompts: [("eval", ["identity", "--model", str(model_dir), "--prompts", str(prompts), "--samples", "1",
                            "--max-new-tokens", "2"])],
        cfg_file: [("info", ["--config", str(cfg_file)]), ("cost", ["--config", str(cfg_file), "--tokens", "1B"]),
                   ("plan", ["serve", "--config", str(cfg_file)])],
        corpus: [("prepare", [str(corpus), "--out", str(tmp_path / "data"), "--vocab-size", "300", "--overwrite"]),
                 ("audit", [str(corpus)])],
        run / "metrics.jsonl": [("cost", ["--from-run", str(run), "--preset", "tiny"]), ("report", [str(run)])],
    }
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"):
        verbs[model_dir / name] = [
            ("generate", ["--model", str(model_dir), "--max-new-tokens", "2", "the"]),
            ("convert", [str(model_dir), str(tmp_path / "converted"), "--overwrite"]),
        ]
    codes = []
    for seed, (path, runs) in enumerate(verbs.items()):
        original = path.read_bytes()
        make = damaged_safetensors if path.suffix == ".safetensors" else damaged
        for what, data in make(original, seed):
            path.write_bytes(data)
            codes += [check_exit(capsys, verb, args, f"{path.name}: {what}") for verb, args in runs]
        path.write_bytes(original)
    figures.append(f"fuzz: {len(codes)} runs on damaged files, {codes.count(2)} refused in one sentence, "
                   f"{codes.count(0)} ran (the damage left them valid)")
    assert codes.count(2) > len(codes) / 2  # most damage is refused, not silently accepted


@pytest.mark.slow
def test_damaged_training_files_give_exit_0_or_one_sentence(tmp_path, capsys, figures):
    """train --data on a damaged dataset manifest, and train --resume on a damaged training state."""
    corpus = tmp_path / "corpus.txt"
    corpus.write_text(" ".join(f"word{i % 97} and more text" for i in range(4000)))
    data = tmp_path / "data"
    prepare([str(corpus)], data, vocab_size=300, log=lambda _: None)
    run = tmp_path / "run"
    common = ["--preset", "tiny", "--data", str(data), "--max-steps", "1", "--samples", "0", "--eval-windows", "1",
              "--peak-tflops", "1", "--no-tensorboard", "--no-progress", "--seq-len", "32", "--batch-size", "2"]
    assert main(["train", *common, "--out", str(run)]) == 0
    resumed = tmp_path / "resumed"
    state = resumed / "checkpoints" / next((run / "checkpoints").iterdir()).name / "train_state.json"
    codes = []
    for path, args in ((data / "manifest.json", [*common, "--out", str(tmp_path / "r2"), "--overwrite"]),
                       (state, [*common, "--out", str(resumed), "--resume", "--max-steps", "2"])):
        shutil.copytree(run, resumed, dirs_exist_ok=True)
        original = path.read_bytes()
        for what, bad in damaged(original, 7)[::3]:
            shutil.rmtree(resumed)  # every variant resumes the same step-1 run, damaged
            shutil.copytree(run, resumed)
            path.write_bytes(bad)
            codes.append(check_exit(capsys, "train", args, f"{path.name}: {what}"))
            if path.parent == data:
                path.write_bytes(original)
    figures.append(f"fuzz (train): {len(codes)} runs on damaged files, {codes.count(2)} refused in one sentence, "
                   f"{codes.count(0)} ran (fields training does not read, or damage that left them valid)")
