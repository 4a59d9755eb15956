"""How a model is served: one configuration, and one context-length policy, for generate, chat and serve.

The context bound `max_len` limits how long a sequence may grow (prompt and generated tokens); it defaults
to the model's `max_position_embeddings`. It is a bound, not an allocation: the cache is a pool of blocks
handed out as tokens arrive, so a short prompt on a 163,840-token model costs a few blocks. `cache_tokens`
caps the pool; a request is admitted when the pool can promise it its prompt plus max_new_tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsv3.config import ModelConfig
from dsv3.errors import InvalidValue
from dsv3.model.cache import CACHE_DTYPES

DRAFT_TOKENS = (1, 2)  # MTP module 1 applied once, or twice on its own output (see `speculative.py`)


@dataclass
class ServingConfig:
    max_batch: int = 1  # sequences decoded together (cache rows)
    max_len: int | None = None  # the context bound of a sequence; None: the model's max_position_embeddings
    cache_dtype: str = "bf16"  # latent cache storage: bf16, fp32 or fp8
    speculative: bool = False  # draft with MTP module 1, verify with the model
    draft_policy: str = "adaptive"  # "adaptive": each sequence drafts while it pays; "always"
    draft_tokens: int = 1  # tokens drafted per step (MTP module 1 applied that many times), verified together
    block_size: int = 64  # positions per block of the paged cache
    cache_tokens: int | None = None  # the pool's size in tokens; None: max_batch sequences of max_len each
    prefill_chunk: int | None = None  # prompt tokens prefilled per step at most; None: whole prompts
    prefix_cache: bool = True  # reuse the cached blocks of a prompt's leading tokens

    def context_bound(self, cfg: ModelConfig) -> int:
        """The longest sequence this configuration allows on a model with `cfg` (values checked first)."""
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or self.max_batch < 1:
            raise InvalidValue("max_batch", self.max_batch, "must be at least 1")
        if self.cache_dtype not in CACHE_DTYPES:
            raise InvalidValue("cache_dtype", self.cache_dtype, f"is not one of {', '.join(CACHE_DTYPES)}")
        if self.draft_policy not in ("adaptive", "always"):
            raise InvalidValue("draft_policy", self.draft_policy, "is not one of adaptive, always")
        if not isinstance(self.draft_tokens, int) or isinstance(self.draft_tokens, bool) or \
                self.draft_tokens not in DRAFT_TOKENS:
            raise InvalidValue("draft_tokens", self.draft_tokens, "must be 1 or 2, the tokens MTP module 1 drafts "
                               "per step")
        for name, low in (("block_size", 1), ("cache_tokens", 1), ("prefill_chunk", 1)):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < low):
                raise InvalidValue(name, value, f"must be an integer of at least {low}")
        if self.max_len is None:
            return cfg.max_position_embeddings
        if isinstance(self.max_len, bool) or not isinstance(self.max_len, int) or self.max_len < 2:
            raise InvalidValue("max_len", self.max_len, "must be an integer of at least 2 tokens")
        if self.max_len > cfg.max_position_embeddings:
            raise InvalidValue("max_len", self.max_len, f"exceeds the model's max_position_embeddings="
                               f"{cfg.max_position_embeddings}")
        return self.max_len
