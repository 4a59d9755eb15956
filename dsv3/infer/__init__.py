"""Inference: the latent-cache engine, sampling, MTP speculative decoding, chat templates."""

from dsv3.infer.config import ServingConfig
from dsv3.infer.engine import Engine, Sequence, Stats
from dsv3.infer.sampling import SamplingParams

__all__ = ["Engine", "SamplingParams", "Sequence", "ServingConfig", "Stats"]
