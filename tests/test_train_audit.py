import pytest

from dsv3.errors import Dsv3Error
from dsv3.train import TrainConfig
from dsv3.train.loop import train


def test_train_refuses_a_corpus_the_audit_flags(tmp_path):
    corpus = tmp_path / "c.txt"
    corpus.write_text("Hello. I am ChatGPT, a language model trained by OpenAI.\n" * 200)
    cfg = TrainConfig(preset="tiny", data=[str(corpus)], data_dir=str(tmp_path / "data"), out=str(tmp_path / "run"),
                      max_steps=1, audit="refuse")  # fmt: skip
    with pytest.raises(Dsv3Error, match="audit flagged 1 of 1 documents"):
        train(cfg, log=lambda line: None)
