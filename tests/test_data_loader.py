"""The token loader: window layout, determinism, exact resume from a JSON state, reshuffled passes,
fixed validation windows, and its errors."""

import json
import pydoc_data.topics

import numpy as np
import pytest
import torch

from dsv3.data import DatasetInfo, TokenLoader, eval_batches
from dsv3.data.prepare import prepare
from dsv3.errors import Dsv3Error

T = 32


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("loader")
    for topic in sorted(pydoc_data.topics.topics)[:30]:
        (root / f"{topic}.txt").write_text(pydoc_data.topics.topics[topic])
    return prepare([str(root / "*.txt")], root / "data", vocab_size=400, shard_tokens=5000, log=lambda _: None)


def shards(info, split="train"):
    return [np.fromfile(p, dtype=info.dtype) for p in info.shard_files(split)]


def take(loader, n):
    return [next(loader) for _ in range(n)]


def test_batches_are_windows_of_t_plus_one_tokens_from_one_shard(data):
    assert len(data.shard_files("train")) > 3  # several shards, so windows meet shard ends
    stream = shards(data)
    x, y = next(TokenLoader(data.path, "train", batch_size=4, seq_len=T, seed=0))
    assert x.shape == y.shape == (4, T) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    for row, label in zip(x.numpy(), y.numpy()):
        window = np.concatenate([row, label[-1:]])
        hits = [s for s in stream for o in range(0, len(s) - T, T) if np.array_equal(s[o:o + T + 1], window)]
        assert len(hits) >= 1


def test_first_pass_visits_every_window_once_then_reshuffles_with_a_new_grid(data):
    loader = TokenLoader(data, "train", batch_size=1, seq_len=T, seed=3)
    n = sum((len(s) - 1) // T for s in shards(data))
    assert len(loader.windows) == n
    first = [tuple(x[0].tolist()) for x, _ in take(loader, n)]
    expected = [tuple(s[o:o + T].tolist()) for s in shards(data) for o in range(0, len(s) - T, T)]
    assert sorted(first) == sorted(expected)
    assert loader.epoch == 0 and loader.index == n
    next(loader)
    assert loader.epoch == 1 and loader.windows.offset > 0 and loader.order.tolist() != list(range(len(loader.order)))


def test_same_seed_same_batches_other_seed_other_batches(data):
    a = take(TokenLoader(data.path, batch_size=4, seq_len=T, seed=1), 5)
    b = take(TokenLoader(data.path, batch_size=4, seq_len=T, seed=1), 5)
    c = take(TokenLoader(data.path, batch_size=4, seq_len=T, seed=2), 5)
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert not all(torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, c))


@pytest.mark.parametrize("stop", [1, 7, 40])  # a pass is ~29 batches: the last one resumes in the second
def test_resume_from_json_state_continues_exactly(data, stop):
    whole = TokenLoader(data.path, batch_size=5, seq_len=500, seed=9)
    expected = take(whole, stop + 30)
    first = TokenLoader(data.path, batch_size=5, seq_len=500, seed=9)
    take(first, stop)
    state = json.loads(json.dumps(first.state_dict()))
    assert state["epoch"] == (stop > 29)
    resumed = TokenLoader(data.path, batch_size=5, seq_len=500, seed=0)
    resumed.load_state_dict(state)
    for (x, y), (ex, ey) in zip(take(resumed, 30), expected[stop:]):
        assert torch.equal(x, ex) and torch.equal(y, ey)


def test_state_from_other_data_or_window_size_is_refused(data):
    state = TokenLoader(data, seq_len=T).state_dict()
    with pytest.raises(Dsv3Error, match="saved with seq_len=32 but the data now has seq_len=16"):
        TokenLoader(data, seq_len=16).load_state_dict(state)


def test_validation_windows_are_fixed_and_in_order(data):
    expected = [s[o:o + T] for s in shards(data, "val") for o in range(0, len(s) - T, T)]
    batches = list(eval_batches(data.path, batch_size=4, seq_len=T))
    rows = torch.cat([x for x, _ in batches])
    assert np.array_equal(rows.numpy(), np.stack(expected)) and len(batches[-1][0]) <= 4
    again = torch.cat([x for x, _ in eval_batches(data, batch_size=3, seq_len=T)])
    assert torch.equal(rows, again)
    spread = torch.cat([x for x, _ in eval_batches(data, batch_size=4, seq_len=T, max_windows=5)])
    assert len(spread) == 5 and torch.equal(spread[0], rows[0]) and torch.equal(spread[-1], rows[-1])


def test_a_split_shorter_than_one_window_is_refused(data):
    too_long = data.splits["val"]["tokens"]
    with pytest.raises(Dsv3Error, match=f"the validation split of .* has {too_long} tokens, fewer than one window"):
        next(eval_batches(data, batch_size=1, seq_len=too_long))
    with pytest.raises(Dsv3Error, match="the training split of .* fewer than one window"):
        TokenLoader(data, seq_len=10**6)


def test_a_folder_without_a_dataset_is_refused(tmp_path):
    with pytest.raises(Dsv3Error, match="holds no prepared dataset .*run `dsv3 prepare"):
        TokenLoader(tmp_path)
    with pytest.raises(Dsv3Error, match="holds no prepared dataset"):
        DatasetInfo.load(tmp_path)
