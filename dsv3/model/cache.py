"""The MLA latent cache: per layer and token, the normalised latent c_kv and the rotated shared key k_pe.

That is `kv_lora_rank + qk_rope_head_dim` numbers per token per layer (576 for V3) instead of the
`H * (nope + rope + v)` a per-head K/V cache holds (40,960 for V3). Tokens are written at their absolute
positions, one row per sequence, so sequences of different lengths share a batch, and rolling back
rejected speculative tokens is simply writing over them.

Two storage formats share one interface (`update`, the only call the attention layer makes):
- `LatentCache`: c_kv and k_pe in one dtype (bf16 or fp32);
- `FP8LatentCache`: c_kv in float8 e4m3 with one fp32 scale per 128 values, k_pe in bf16 (the rotated key
  is small and precision-sensitive). At V3's dims that is 512 + 4 * 4 + 64 * 2 = 656 bytes per token per
  layer, against 1,152 in bf16: the layout FlashMLA reads.

`cache.rows(index)` views a subset of the rows as a cache of its own, so a server can decode the sequences
it has in flight, whichever rows they occupy, in one batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dsv3.config import ModelConfig

FP8_BLOCK = 128  # values of c_kv that share one scale
E4M3_MAX = 448.0  # largest finite float8_e4m3fn
CACHE_DTYPES = ("bf16", "fp32", "fp8")


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
        self.n_layers = cfg.num_hidden_layers + cfg.num_nextn_predict_layers if n_layers is None else n_layers
        self.batch_size, self.max_len = batch_size, max_len
        self.kv_lora_rank, self.rope_dim = cfg.kv_lora_rank, cfg.qk_rope_head_dim
        self._allocate(dtype, torch.device(device))

    def _allocate(self, dtype: torch.dtype, device: torch.device) -> None:
        shape = (self.n_layers, self.batch_size, self.max_len)
        self.c_kv = torch.zeros(*shape, self.kv_lora_rank, dtype=dtype, device=device)  # [L, B, S, c]
        self.k_pe = torch.zeros(*shape, self.rope_dim, dtype=dtype, device=device)  # [L, B, S, r]

    def _tensors(self) -> list[torch.Tensor]:
        """Every storage tensor, each [L, B, S, ...]: what byte accounting counts."""
        return [self.c_kv, self.k_pe]

    # ----- the attention layer's interface -----------------------------------------------------------
    def update(
        self, layer: int, positions: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write c_kv [B, T, c] and k_pe [B, T, r] at positions [B, T]; return the cache up to the last
        written position, [B, S, c] and [B, S, r], in the dtype of the inputs."""
        return self._update(slice(None), layer, positions, c_kv, k_pe)

    def rows(self, index: list[int] | torch.Tensor) -> CacheRows:
        """A view of rows `index` (in that order) that the model can use as a cache of len(index) rows."""
        return CacheRows(self, index)

    def _update(self, rows, layer, positions, c_kv, k_pe):
        if int(positions.max()) >= self.max_len:
            raise ValueError(f"position {int(positions.max())} is past the cache's max_len={self.max_len}")
        write_rows = _row_index(rows, positions.shape[0], positions.device)  # [B, 1]
        self._write(layer, write_rows, positions, c_kv, k_pe)
        S = int(positions.max()) + 1
        return self._read(layer, rows, S, c_kv.dtype)

    def _write(self, layer, rows, positions, c_kv, k_pe) -> None:
        self.c_kv[layer][rows, positions] = c_kv.to(self.c_kv.dtype)
        self.k_pe[layer][rows, positions] = k_pe.to(self.k_pe.dtype)

    def _read(self, layer, rows, S, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # a slice of rows is a view (no copy when the dtypes agree); a list of rows gathers
        return self.c_kv[layer][rows, :S].to(dtype), self.k_pe[layer][rows, :S].to(dtype)

    # ----- byte accounting ---------------------------------------------------------------------------
    def nbytes_per_token(self) -> int:
        """Bytes one token occupies across all layers: (c + r) x layers x dtype bytes in the plain format."""
        return sum(t[0, 0, 0].numel() * t.element_size() for t in self._tensors()) * self.n_layers

    @property
    def nbytes(self) -> int:
        """Bytes the whole cache holds (every row, every slot)."""
        return sum(t.numel() * t.element_size() for t in self._tensors())


class FP8LatentCache(LatentCache):
    """The latent cache with c_kv in e4m3 (one fp32 scale per 128 values of a token) and k_pe in bf16.

    Scales follow the FP8 recipe: scale = amax / 448 over each block of 128, so every block uses the whole
    e4m3 range; a last block narrower than 128 (small test models) gets a scale of its own.
    """

    def _allocate(self, dtype: torch.dtype, device: torch.device) -> None:
        shape = (self.n_layers, self.batch_size, self.max_len)
        n_blocks = -(-self.kv_lora_rank // FP8_BLOCK)
        self.c_kv = torch.zeros(*shape, self.kv_lora_rank, dtype=torch.float8_e4m3fn, device=device)  # [L, B, S, c]
        self.c_scale = torch.ones(*shape, n_blocks, dtype=torch.float32, device=device)  # [L, B, S, c/128]
        self.k_pe = torch.zeros(*shape, self.rope_dim, dtype=torch.bfloat16, device=device)  # [L, B, S, r]

    def _tensors(self) -> list[torch.Tensor]:
        return [self.c_kv, self.c_scale, self.k_pe]

    def _write(self, layer, rows, positions, c_kv, k_pe) -> None:
        q, scale = quantize_tiles(c_kv)
        self.c_kv[layer][rows, positions] = q
        self.c_scale[layer][rows, positions] = scale
        self.k_pe[layer][rows, positions] = k_pe.to(self.k_pe.dtype)

    def _read(self, layer, rows, S, dtype) -> tuple[torch.Tensor, torch.Tensor]:
        c_kv = dequantize_tiles(self.c_kv[layer][rows, :S], self.c_scale[layer][rows, :S], dtype)
        return c_kv, self.k_pe[layer][rows, :S].to(dtype)


class CacheRows:
    """Rows `index` of a cache, seen as a cache with len(index) rows. Row i of the batch the model runs is
    row index[i] of the underlying cache; a contiguous ascending index is read as a view, without a copy."""

    def __init__(self, cache: LatentCache, index: list[int] | torch.Tensor):
        self.cache = cache
        index = torch.as_tensor(index, dtype=torch.long)
        n = index.numel()
        contiguous = n > 0 and bool((index == torch.arange(int(index[0]), int(index[0]) + n)).all())
        self.index = slice(int(index[0]), int(index[0]) + n) if contiguous else index

    def update(self, layer, positions, c_kv, k_pe):
        return self.cache._update(self.index, layer, positions, c_kv, k_pe)


def new_cache(
    cfg: ModelConfig,
    batch_size: int,
    max_len: int,
    dtype: str = "bf16",
    device: torch.device | str = "cpu",
    n_layers: int | None = None,
) -> LatentCache:
    """A cache in one of CACHE_DTYPES: "bf16", "fp32" or "fp8" (e4m3 latent + fp32 scales, bf16 rope key).
    n_layers defaults to the main model's layers plus the MTP modules'."""
    if dtype == "fp8":
        return FP8LatentCache(cfg, batch_size, max_len, device=device, n_layers=n_layers)
    if dtype not in CACHE_DTYPES:
        raise ValueError(f"cache dtype {dtype!r} is not one of {CACHE_DTYPES}")
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    return LatentCache(cfg, batch_size, max_len, dtype=torch_dtype, device=device, n_layers=n_layers)


def quantize_tiles(x: torch.Tensor, block: int = FP8_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., c] -> (e4m3 [..., c], fp32 scales [..., ceil(c/block)]), scale = amax / 448 per block."""
    c = x.shape[-1]
    tiles = F.pad(x.float(), (0, -c % block)).unflatten(-1, (-1, block))  # [..., nb, block]
    scale = (tiles.abs().amax(dim=-1) / E4M3_MAX).clamp(min=torch.finfo(torch.float32).tiny)  # [..., nb]
    q = (tiles / scale[..., None]).flatten(-2)[..., :c].to(torch.float8_e4m3fn)  # the cast saturates at +-448
    return q, scale


def dequantize_tiles(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype, block: int = FP8_BLOCK) -> torch.Tensor:
    """Inverse of quantize_tiles: e4m3 [..., c] and scales [..., nb] -> [..., c] in `dtype`."""
    c = q.shape[-1]
    tiles = F.pad(q.float(), (0, -c % block)).unflatten(-1, (-1, block))  # [..., nb, block]
    return (tiles * scale[..., None]).flatten(-2)[..., :c].to(dtype)


def _row_index(rows, n: int, device) -> torch.Tensor:
    """The [B, 1] row numbers that advanced indexing needs to write into `rows` (a slice or an index)."""
    if isinstance(rows, slice):
        start = rows.start or 0
        return torch.arange(start, start + n, device=device)[:, None]
    return rows.to(device)[:, None]
