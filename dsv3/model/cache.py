"""The MLA latent cache: per layer and token, the normalised latent c_kv and the rotated shared key k_pe.

That is `kv_lora_rank + qk_rope_head_dim` numbers per token per layer (576 for V3) instead of the
`H * (nope + rope + v)` a per-head K/V cache holds (40,960 for V3). Tokens are written at their absolute
positions, one row per sequence, so sequences of different lengths share a batch, and rolling back
rejected speculative tokens is simply writing over them.
"""

from __future__ import annotations

import torch

from dsv3.config import ModelConfig


class LatentCache:
    """A fixed-size latent cache for `batch_size` sequences of up to `max_len` tokens.

    Layers 0..L-1 are the main model's; layers L..L+D-1 belong to the MTP modules (MTP module k uses layer
    L + k - 1, its index in the checkpoint).
    """

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        n_layers: int | None = None,
    ):
        n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers if n_layers is None else n_layers
        self.max_len = max_len
        self.c_kv = torch.zeros(n_layers, batch_size, max_len, cfg.kv_lora_rank, dtype=dtype, device=device)
        self.k_pe = torch.zeros(n_layers, batch_size, max_len, cfg.qk_rope_head_dim, dtype=dtype, device=device)

    def update(
        self, layer: int, positions: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write c_kv [B, T, c] and k_pe [B, T, r] at positions [B, T]; return the cache up to the last
        written position, [B, S, c] and [B, S, r], in the dtype of the inputs."""
        if int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} is past the cache's max_len={self.max_len}")
        rows = torch.arange(positions.shape[0], device=positions.device)[:, None]  # [B, 1]
        self.c_kv[layer][rows, positions] = c_kv.to(self.c_kv.dtype)
        self.k_pe[layer][rows, positions] = k_pe.to(self.k_pe.dtype)
        S = int(positions.max()) + 1
        return self.c_kv[layer, :, :S].to(c_kv.dtype), self.k_pe[layer, :, :S].to(k_pe.dtype)

    def nbytes_per_token(self) -> int:
        """Bytes one token occupies across all layers."""
        n_layers = self.c_kv.shape[0]
        per_layer = self.c_kv.shape[-1] * self.c_kv.element_size() + self.k_pe.shape[-1] * self.k_pe.element_size()
        return n_layers * per_layer
