"""Small models for the inference and server tests, built once per test process.

`trained_tiny()` is the `tiny` preset trained for a few seconds on a handful of sentences, main head and
MTP head together: its greedy continuations follow the sentences with clear margins, and its MTP module
agrees with the main model often enough to exercise both outcomes of speculative verification. A random
model would give near-uniform logits, where every token is a near-tie.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import os
import shutil
import tempfile

import torch
import torch.nn.functional as F

from dsv3 import DeepSeekV3, preset, save_pretrained
from dsv3.tokenizer import Tokenizer

SENTENCES = [
    "the latent cache keeps five hundred and seventy six numbers per token. ",
    "multi token prediction drafts the next token and the model checks it. ",
    "experts are chosen by a sigmoid router with a bias that balances the load. ",
    "a server batches many requests into one decode step. ",
]
TEXT = "".join(SENTENCES) * 4


@contextlib.contextmanager
def one_thread():
    """Run torch on one thread: tiny models are all overhead, and a second thread that has to wait for a
    busy core makes every op dozens of times slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@functools.cache
def trained_tiny() -> tuple[DeepSeekV3, Tokenizer, str]:
    """(model in fp32, tokenizer, model directory with both saved)."""
    torch.manual_seed(0)
    tokenizer = Tokenizer.train([TEXT] * 8, vocab_size=300)
    cfg = preset("tiny")
    model = DeepSeekV3(cfg)
    model.init_weights(std=0.02)
    ids = torch.tensor(tokenizer.encode(TEXT * 2))
    T, B = 64, 8
    with one_thread():
        _train(model, ids, T, B)
    model.eval()
    directory = tempfile.mkdtemp(prefix="dsv3-tiny-")
    atexit.register(shutil.rmtree, directory, ignore_errors=True)
    save_pretrained(model, directory)
    tokenizer.save(directory)
    return model, tokenizer, directory


def _train(model: DeepSeekV3, ids: torch.Tensor, T: int, B: int) -> None:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    for _ in range(120):
        starts = torch.randint(0, len(ids) - T - 1, (B,))
        x = torch.stack([ids[s : s + T] for s in starts])
        y = torch.stack([ids[s + 1 : s + T + 1] for s in starts])
        out = model.run(x, mtp=True)
        loss = F.cross_entropy(out.logits.flatten(0, 1), y.flatten())
        loss = loss + F.cross_entropy(out.mtp_logits[0].flatten(0, 1), y[:, 1:].flatten())  # predicts t_{i+2}
        opt.zero_grad()
        loss.backward()
        opt.step()


def random_tiny(seed: int = 0, std: float = 0.1) -> DeepSeekV3:
    """The tiny preset with random weights, large enough that logits are far from uniform."""
    torch.manual_seed(seed)
    model = DeepSeekV3(preset("tiny"))
    model.init_weights(std=std)
    return model.eval()


def top2_gap(model: DeepSeekV3, ids: list[int]) -> float:
    """The gap between the two largest next-token logits after `ids` (fp32, no cache): how near a tie is."""
    with torch.no_grad():
        logits = model(torch.tensor([ids]))[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def assert_same_or_near_tie(model: DeepSeekV3, prompt: list[int], expected: list[int], got: list[int],
                            tol: float = 1e-3) -> None:
    """got == expected, or they part where the reference logits are a genuine near-tie (gap < tol)."""
    if got == expected:
        return
    i = next((k for k, (a, b) in enumerate(zip(expected, got)) if a != b), min(len(expected), len(got)))
    gap = top2_gap(model, prompt + expected[:i])
    assert gap < tol, f"outputs part at token {i} ({expected[i:i + 3]} vs {got[i:i + 3]}) where the top-2 gap is {gap}"


if __name__ == "__main__":
    import time

    t = time.perf_counter()
    model, tok, d = trained_tiny()
    print(f"trained in {time.perf_counter() - t:.1f}s into {d}")
    os.system(f"ls -la {d}")
