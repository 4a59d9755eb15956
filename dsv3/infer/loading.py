"""Models and tokenizers for inference: from a Hugging Face model directory, or built from a preset.

A preset model is randomly initialised (seeded) and comes with the byte-level stand-in tokenizer: its
text is garbage, but every stage (prefill, latent-cache decoding, sampling, streaming) really runs. A model
directory must hold its own tokenizer.json: a stand-in would turn its ids into garbage silently.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

from dsv3.checkpoint import load_pretrained
from dsv3.checkpoint.pretrained import DTYPES
from dsv3.config import preset
from dsv3.errors import Dsv3Error, InvalidValue
from dsv3.hardware import check_memory
from dsv3.model import DeepSeekV3
from dsv3.tokenizer import TOKENIZER_FILE, ByteTokenizer, Tokenizer, check_vocab


@dataclass
class Loaded:
    model: DeepSeekV3
    tokenizer: Tokenizer | ByteTokenizer
    name: str  # what the server calls the model
    directory: str | None  # None for a preset model


def load(model_dir: str | None = None, preset_name: str | None = None, dtype: str | None = None,
         seed: int = 0, shard=None) -> Loaded:
    """Exactly one of model_dir and preset_name. dtype: "bf16", "fp16" or "fp32" (default: the checkpoint's
    own dtype; fp32 for a preset model). `shard`: cut the model to this process's part as it loads (see
    `load_pretrained`); a model directory only."""
    if shard is not None and model_dir is None:
        raise Dsv3Error("a model split over processes loads its slices from a model directory; give --model DIR")
    if (model_dir is None) == (preset_name is None):
        raise Dsv3Error("give either --model DIR or --preset NAME")
    if dtype is not None and dtype not in DTYPES:
        raise InvalidValue("dtype", dtype, f"is not one of {', '.join(DTYPES)}")
    if preset_name is not None:
        cfg = preset(preset_name)
        if cfg.vocab_size < 256:
            raise Dsv3Error(f"preset {preset_name!r} has {cfg.vocab_size} tokens, fewer than the 256 bytes the "
                            "stand-in tokenizer needs; use --model DIR with a tokenizer")
        torch.manual_seed(seed)
        with torch.device("meta"):
            model = DeepSeekV3(cfg)
        needed = sum(t.numel() * 4 for t in model.state_dict().values())  # initialised in fp32, then cast
        check_memory(needed, f"the {preset_name} preset", hint="use a smaller preset; a preset is a random "
                     "model for trying the code paths")
        model = model.to_empty(device="cpu")
        model.init_weights()
        return Loaded(model.to(DTYPES[dtype or "fp32"]).eval(), ByteTokenizer(), preset_name, None)

    if not os.path.isdir(model_dir):
        raise Dsv3Error(f"model directory {model_dir} does not exist; give a folder holding config.json and "
                        "safetensors")
    if not os.path.isfile(os.path.join(model_dir, TOKENIZER_FILE)):  # checked before the weights are read
        raise Dsv3Error(f"{model_dir} has no {TOKENIZER_FILE}; copy in the tokenizer the model was trained with "
                        "(a model directory needs one; only --preset models use the byte-level stand-in)")
    tokenizer = Tokenizer.from_dir(model_dir)
    model = load_pretrained(model_dir, dtype, shard=shard).eval()
    check_vocab(tokenizer, model.config)
    name = os.path.basename(os.path.normpath(os.path.abspath(model_dir)))
    return Loaded(model, tokenizer, name, model_dir)
