"""The DeepSeek-V3 model: one file per mechanism."""

from dsv3.model.cache import LatentCache
from dsv3.model.moe import Routing
from dsv3.model.transformer import DeepSeekV3, Output

__all__ = ["DeepSeekV3", "LatentCache", "Output", "Routing"]
