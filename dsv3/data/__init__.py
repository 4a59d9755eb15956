"""Data for pre-training: corpora, tokenizers, packed token shards and the loader that reads them.

    from dsv3.data.prepare import prepare
    info = prepare(["docs/", "more.jsonl"], out="data")        # or prepare() for the built-in corpus
    tok = info.tokenizer()
    loader = TokenLoader("data", "train", batch_size=8, seq_len=512, seed=0)
    x, y = next(loader)                                          # [8, 512] each, y = x shifted by one

(`prepare` is imported from its module: exporting it here would hide the module `dsv3.data.prepare`.)
"""

from dsv3.data.dataset import DatasetInfo
from dsv3.data.loader import TokenLoader, eval_batches
from dsv3.tokenizer import Tokenizer, check_vocab

__all__ = ["DatasetInfo", "TokenLoader", "Tokenizer", "check_vocab", "eval_batches"]
