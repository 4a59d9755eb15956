"""Hugging Face checkpoints: the name table, the FP8 block format, sharded safetensors I/O."""

from dsv3.checkpoint.pretrained import load_pretrained, save_pretrained

__all__ = ["load_pretrained", "save_pretrained"]
