"""dsv3: DeepSeek-V3 in plain PyTorch."""

from dsv3.checkpoint import load_pretrained, save_pretrained
from dsv3.config import ModelConfig, preset
from dsv3.model import DeepSeekV3, LatentCache

__all__ = ["DeepSeekV3", "LatentCache", "ModelConfig", "load_pretrained", "preset", "save_pretrained"]
