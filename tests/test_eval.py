"""Scoring with the tools people use: lm-evaluation-harness, unmodified, runs the example tasks of every kind
against a live `dsv3 serve`, and what it reports is checked item by item against a direct forward pass and
against `dsv3 eval` on the same files.

References are computed here from `model(ids)` alone, with the token layouts lm-eval documents: a
multiple-choice pair is the question's tokens then the rest of (question + " " + choice); a perplexity
document is cut by lm-eval's own `get_rolling_token_windows` after its prefix token (through the server, the
end-of-text token: lm-eval's remote tokenizer reads BOS id 0 as missing).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from infer_models import one_thread, trained_tiny
from server_helpers import KEY, call, free_port, wait_up

from dsv3.cli import main
from dsv3.infer import Engine, SamplingParams

lm_eval_utils = pytest.importorskip("lm_eval.utils", reason="lm-eval[api] is a test dependency: make setup")

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples" / "eval"
NAME = "tiny-eval"
WINDOW = 64  # lm-eval's max_length for the token-id runs: every example document spans several windows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def served():
    model, tok, directory = trained_tiny()
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DSV3_API_KEY": KEY}
    proc = subprocess.Popen([sys.executable, "-m", "dsv3", "serve", "--model", directory, "--port", str(port),
                             "--name", NAME, "--cache-dtype", "fp32", "--max-batch", "8"],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        wait_up(proc, port)
        yield port, model, tok, directory
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    """The example task YAMLs, with their data files at absolute paths (lm-eval reads them from the cwd)."""
    out = tmp_path_factory.mktemp("tasks")
    for yaml in EXAMPLES.glob("*.yaml"):
        (out / yaml.name).write_text(yaml.read_text().replace("examples/eval/", f"{EXAMPLES}/"))
    return out


def lm_eval(port: int, task_dir: Path, tmp: Path, model: str, tasks: list[str], *extra: str, **args) -> dict:
    """Run the lm_eval command; returns {"results": ..., task: [samples by doc_id]}."""
    kind = "chat/completions" if model == "local-chat-completions" else "completions"
    model_args = {"model": NAME, "base_url": f"http://127.0.0.1:{port}/v1/{kind}", "auth_token": KEY, **args}
    out = tmp / f"lm-eval-{time.monotonic_ns()}"
    env = {**os.environ, "OPENAI_API_KEY": KEY, "HF_HOME": str(tmp / "hf"), "HF_HUB_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [sys.executable, "-m", "lm_eval", "--model", model, "--model_args",
           ",".join(f"{k}={v}" for k, v in model_args.items()), "--tasks", ",".join(tasks),
           "--include_path", str(task_dir), "--log_samples", "--output_path", str(out), *extra]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-4000:]
    found = {"results": json.loads(next(out.rglob("results_*.json")).read_text())["results"]}
    for task in tasks:
        lines = next(out.rglob(f"samples_{task}_*.jsonl")).read_text().splitlines()
        found[task] = sorted((json.loads(line) for line in lines), key=lambda s: s["doc_id"])
    shutil.rmtree(out)
    return found


def records(name: str) -> list[dict]:
    return [json.loads(line) for line in (EXAMPLES / name).read_text().splitlines()]


@torch.inference_mode()
def reference(model, context: list[int], continuation: list[int]) -> tuple[float, bool]:
    """(sum of log p(continuation | context), greedy) from one plain forward pass."""
    with one_thread():
        logp = model(torch.tensor([context + continuation])).float().log_softmax(-1)[0]  # [T, V]
    rows = logp[len(context) - 1 : len(context) + len(continuation) - 1]
    target = torch.tensor(continuation)
    return float(rows.gather(-1, target[:, None]).double().sum()), bool((rows.argmax(-1) == target).all())


def choice_references(model, tok, max_length: int, bos: bool = False) -> list[list[tuple[float, bool]]]:
    """Each choice's score; a pair longer than max_length - 1 tokens loses context from the left (as lm-eval
    cuts it), and with `bos` the model reads BOS first (as the server puts it before a text prompt)."""
    out = []
    for r in records("multiple_choice.jsonl"):
        scores = []
        for c in r["choices"]:
            context = tok.encode(r["question"])
            continuation = tok.encode(r["question"] + " " + c)[len(context) :]
            context = context[max(0, len(context) + len(continuation) - (max_length - 1)) :]
            scores.append(reference(model, [tok.bos_id] * bos + context, continuation))
        out.append(scores)
    return out


def document_references(model, tok, max_length: int, first: list[int] = ()) -> list[float]:
    """Each example document's log-likelihood over lm-eval's rolling windows for `max_length`."""
    out = []
    for r in records("perplexity.jsonl"):
        windows = lm_eval_utils.get_rolling_token_windows(tok.encode(r["text"]), tok.eos_id, max_length - 2, 1)
        pairs = [lm_eval_utils.make_disjoint_window(w) for w in windows]
        out.append(sum(reference(model, [*first, *c], t)[0] for c, t in pairs))
    return out


def choice_scores(samples: list[dict]) -> list[list[tuple[float, bool]]]:
    return [[(float(ll), greedy == "True") for ll, greedy in (r[0] for r in s["resps"])] for s in samples]


def assert_choices(got, want, figures: list[str] | None = None, label: str = "", atol=1e-4):
    worst = 0.0
    for g_item, w_item in zip(got, want, strict=True):
        for (g, g_greedy), (w, w_greedy) in zip(g_item, w_item, strict=True):
            assert abs(g - w) < atol, (g, w)
            assert g_greedy == w_greedy
            worst = max(worst, abs(g - w))
    if figures is not None:
        figures.append(f"lm-eval {label}: {sum(map(len, got))} choice log-likelihoods, max |diff| {worst:.1e}")


def assert_documents(samples: list[dict], want: list[float], figures: list[str] | None = None, label: str = "",
                     atol=1e-4):
    got = [float(s["resps"][0][0]) for s in samples]
    assert len(got) == len(want) and all(abs(g - w) < atol for g, w in zip(got, want)), (got, want)
    if figures is not None:
        worst = max(abs(g - w) for g, w in zip(got, want))
        figures.append(f"lm-eval {label}: {len(got)} document log-likelihoods, max |diff| {worst:.1e}")


def test_rolling_windows_are_lm_evals(served):
    """`dsv3 eval`'s own windows equal lm-eval's for every length and window size around the edges."""
    from dsv3.eval.tasks import rolling_windows

    for n in (0, 1, 5, 61, 62, 63, 124, 125, 200):
        tokens = list(range(100, 100 + n))
        for max_length in (3, 4, 10, 64):
            want = [lm_eval_utils.make_disjoint_window(w)
                    for w in lm_eval_utils.get_rolling_token_windows(tokens, 7, max_length - 2, 1)]
            assert [(list(c), list(t)) for c, t in rolling_windows(tokens, 7, max_length)] == want


def test_lm_eval_token_requests_score_what_the_model_computes_and_dsv3_eval_agrees(served, task_dir, tmp_path,
                                                                                    capsys, figures):
    port, model, tok, directory = served
    found = lm_eval(port, task_dir, tmp_path, "local-completions", ["dsv3_mc", "dsv3_ppl", "dsv3_gen"],
                    max_length=WINDOW)
    assert_choices(choice_scores(found["dsv3_mc"]), choice_references(model, tok, WINDOW), figures,
                   "token ids vs forward")
    assert_documents(found["dsv3_ppl"], document_references(model, tok, WINDOW), figures, "token ids vs forward")

    # generate-until: the greedy text of the prompt's tokens, cut at the task's stop strings
    engine = Engine(model, tok, max_batch=8, cache_dtype="fp32")
    params = SamplingParams(max_new_tokens=8, stop_token_ids=(tok.eos_id,), stop=("\n", "."))
    prompts = [tok.encode(r["prompt"]) for r in records("generate.jsonl")]
    with one_thread():
        want = [s.text for s in engine.generate(prompts, params)]
    assert [s["resps"][0][0] for s in found["dsv3_gen"]] == want

    # `dsv3 eval` on the same files reports the same numbers, item by item and in total
    capsys.readouterr()
    with one_thread():
        assert main(["eval", "--model", directory, str(EXAMPLES / "multiple_choice.jsonl"),
                     str(EXAMPLES / "perplexity.jsonl"), "--max-len", str(WINDOW), "--max-batch", "4", "--json"]) == 0
    ours = json.loads(capsys.readouterr().out)["tasks"]
    mc, ppl = ours["multiple_choice.jsonl"], ours["perplexity.jsonl"]
    theirs = choice_scores(found["dsv3_mc"])
    assert_choices([[(ll, greedy) for ll, (_, greedy) in zip(item["loglikelihoods"], their)]
                    for item, their in zip(mc["items"], theirs, strict=True)], theirs, figures, "vs dsv3 eval")
    assert_documents(found["dsv3_ppl"], [item["loglikelihood"] for item in ppl["items"]], figures, "vs dsv3 eval")
    results = found["results"]
    assert mc["acc"] == results["dsv3_mc"]["acc,none"] and mc["acc_norm"] == results["dsv3_mc"]["acc_norm,none"]
    for metric in ("bits_per_byte", "byte_perplexity", "word_perplexity"):
        assert ppl[metric] == pytest.approx(results["dsv3_ppl"][f"{metric},none"], rel=1e-6)


def test_lm_eval_text_requests_and_batches(served, task_dir, tmp_path, figures):
    """With text prompts the server puts BOS first and echoes only the client's tokens, so lm-eval's split
    between context and continuation still lands right; batched requests score as single ones."""
    port, model, tok, _ = served
    text = lm_eval(port, task_dir, tmp_path, "local-completions", ["dsv3_mc", "dsv3_ppl"], max_length=512,
                   tokenized_requests=False)
    assert_choices(choice_scores(text["dsv3_mc"]), choice_references(model, tok, 512, bos=True), figures,
                   "text prompts vs forward")
    # one window per document, sent as text: "<eos>" + the document, read after BOS
    assert_documents(text["dsv3_ppl"], document_references(model, tok, 512, first=[tok.bos_id]), figures,
                     "text prompts vs forward")

    batched = lm_eval(port, task_dir, tmp_path, "local-completions", ["dsv3_mc", "dsv3_ppl"], "--batch_size", "4",
                      max_length=WINDOW)
    assert_choices(choice_scores(batched["dsv3_mc"]), choice_references(model, tok, WINDOW), figures,
                   "batch 4 vs forward")
    assert_documents(batched["dsv3_ppl"], document_references(model, tok, WINDOW), figures, "batch 4 vs forward")


def test_lm_eval_chat_completions_generate_what_the_chat_api_answers(served, task_dir, tmp_path):
    port, *_ = served
    found = lm_eval(port, task_dir, tmp_path, "local-chat-completions", ["dsv3_gen"], "--apply_chat_template")
    for r, sample in zip(records("generate.jsonl"), found["dsv3_gen"], strict=True):
        status, answer = call(port, "POST", "/v1/chat/completions", {
            "model": NAME, "messages": [{"role": "user", "content": r["prompt"]}], "max_tokens": 8,
            "temperature": 0, "stop": ["\n", "."]})
        assert status == 200
        assert sample["resps"][0][0] == answer["choices"][0]["message"]["content"]
