"""The MLA latent cache: per layer and token, the normalised latent c_kv and the rotated shared key k_pe.

That is `kv_lora_rank + qk_rope_head_dim` numbers per token per layer (576 for V3) instead of the
`H * (nope + rope + v)` a per-head K/V cache holds (40,960 for V3). Tokens are written at their absolute
positions, one row per sequence, so sequences of different lengths share a batch, and rolling back
rejected speculative tokens is simply writing over them.

With sparse attention (V3.2) every token also keeps its index key (`update_index`): the lightning indexer
scores all cached tokens from these, and attention then reads only the latent rows it selected.

Two storage formats share one interface (`update` and `update_index`, the attention layer's only calls):
- `LatentCache`: c_kv and k_pe in one dtype (bf16 or fp32);
- `FP8LatentCache`: c_kv in float8 e4m3 with one fp32 scale per 128 values, k_pe in bf16 (the rotated key
  is small and precision-sensitive). At V3's dims that is 512 + 4 * 4 + 64 * 2 = 656 bytes per token per
  layer, against 1,152 in bf16: the layout FlashMLA reads.

`cache.rows(index)` views a subset of the rows as a cache of its own, so a server can decode the sequences
it has in flight, whichever rows they occupy, in one batch. `cache.resize(max_len)` grows (or shrinks) every
row, keeping what is cached: an engine sizes the cache to what its requests need, not to the longest
context the model allows.

`latent_layout` describes the storage once; allocation and every byte figure (`bytes_per_token`, what
`dsv3 info` and `dsv3 plan` report) are read from it.
"""

from __future__ import annotations

import math

import torch

from dsv3.config import ModelConfig
from dsv3.fp8 import BLOCK, dequantize_tiles, quantize_tiles

CACHE_DTYPES = ("bf16", "fp32", "fp8")
_TORCH = {"bf16": torch.bfloat16, "fp32": torch.float32}
# in FP8, a field stored in e4m3 and the field holding its fp32 scales (one per 128 values)
_SCALES = {"c_kv": "c_scale", "k_index": "k_index_scale"}


def latent_layout(cfg: ModelConfig, dtype: str) -> dict[str, tuple[int, torch.dtype]]:
    """What one token occupies in one layer: storage name -> (numbers, dtype). In FP8 the latent is e4m3 with
    an fp32 scale per 128 values, and the rotated key stays bf16 (small, and precision-sensitive). With sparse
    attention (V3.2) each token also keeps its index key k_index (index_head_dim numbers; FP8 like the latent)."""
    c, r = cfg.kv_lora_rank, cfg.qk_rope_head_dim
    if dtype == "fp8":
        layout = {"c_kv": (c, torch.float8_e4m3fn), "c_scale": (math.ceil(c / BLOCK), torch.float32),
                  "k_pe": (r, torch.bfloat16)}
        if cfg.uses_dsa:
            layout |= {"k_index": (cfg.index_head_dim, torch.float8_e4m3fn),
                       "k_index_scale": (math.ceil(cfg.index_head_dim / BLOCK), torch.float32)}
        return layout
    if dtype not in _TORCH:
        raise ValueError(f"cache dtype {dtype!r} is not one of {', '.join(CACHE_DTYPES)}")
    layout = {"c_kv": (c, _TORCH[dtype]), "k_pe": (r, _TORCH[dtype])}
    if cfg.uses_dsa:
        layout["k_index"] = (cfg.index_head_dim, _TORCH[dtype])
    return layout


def bytes_per_token(cfg: ModelConfig, dtype: str = "bf16", n_layers: int | None = None) -> int:
    """Cache bytes one token occupies over `n_layers` layers (default: the main model's)."""
    layers = cfg.num_hidden_layers if n_layers is None else n_layers
    return layers * sum(n * t.itemsize for n, t in latent_layout(cfg, dtype).values())


class _Storage:
    """Per-field tensors [L, ..., n] with one write and one read that quantise and dequantise FP8 fields."""

    layout: dict[str, tuple[int, torch.dtype]]

    def _store(self, layer: int, index, **fields: torch.Tensor) -> None:
        """Write each field's values [..., n] at `index` (whatever indexes dims 1.. of the storage)."""
        for name, value in fields.items():
            dst = getattr(self, name)[layer]
            if dst.dtype == torch.float8_e4m3fn:
                value, getattr(self, _SCALES[name])[layer][index] = quantize_tiles(value)
            dst[index] = value.to(dst.dtype)

    def _load(self, layer: int, index, dtype: torch.dtype, *names: str) -> tuple[torch.Tensor, ...]:
        """The named fields at `index`, in `dtype` (a basic index without conversion is a view)."""
        out = []
        for name in names:
            src = getattr(self, name)[layer][index]
            if src.dtype == torch.float8_e4m3fn:
                src = dequantize_tiles(src, getattr(self, _SCALES[name])[layer][index], dtype)
            out.append(src.to(dtype))
        return tuple(out)

    @property
    def nbytes(self) -> int:
        """Bytes the whole cache holds (every row or block, every slot), counted from its tensors."""
        return sum(getattr(self, name).nbytes for name in self.layout)


class LatentCache(_Storage):
    """A latent cache for `batch_size` sequences of up to `max_len` tokens, in "bf16" or "fp32".

    Layers 0..L-1 are the main model's; MTP module k uses layer `cfg.mtp_layer_index(k)` = L + k - 1, its
    index in the checkpoint (n_layers defaults to both).
    """

    format = "bf16"

    def __init__(
        self,
        cfg: ModelConfig,
        batch_size: int,
        max_len: int,
        *,
        dtype: torch.dtype | str | None = None,
        device: torch.device | str = "cpu",
        n_layers: int | None = None,
    ):
        if dtype is not None:
            self.format = dtype if isinstance(dtype, str) else {v: k for k, v in _TORCH.items()}[dtype]
        if (self.format == "fp8") != isinstance(self, FP8LatentCache):
            raise ValueError("an FP8 cache is an FP8LatentCache; make caches with new_cache(cfg, ..., dtype)")
        self.cfg = cfg
        self.n_layers = cfg.n_layers_with_mtp if n_layers is None else n_layers
        self.batch_size, self.max_len = batch_size, 0
        self.device = torch.device(device)
        self.layout = latent_layout(cfg, self.format)
        self.resize(max_len)

    def resize(self, max_len: int) -> None:
        """Make room for max_len tokens per row, keeping the slots already written (up to max_len)."""
        keep = min(self.max_len, max_len)
        for name, (n, dtype) in self.layout.items():
            new = torch.zeros(self.n_layers, self.batch_size, max_len, n, dtype=dtype, device=self.device)
            if keep:
                new[:, :, :keep] = getattr(self, name)[:, :, :keep]
            setattr(self, name, new)  # [L, B, S, n]
        self.max_len = max_len

    # ----- the attention layer's interface -----------------------------------------------------------
    def update(
        self, layer: int, positions: torch.Tensor, c_kv: torch.Tensor, k_pe: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write c_kv [B, T, c] and k_pe [B, T, r] at positions [B, T]; return the cache up to the last
        written position, [B, S, c] and [B, S, r], in the dtype of the inputs."""
        return self._update(slice(None), layer, positions, c_kv=c_kv, k_pe=k_pe)

    def update_index(self, layer: int, positions: torch.Tensor, k_index: torch.Tensor) -> torch.Tensor:
        """Sparse attention's index keys: write k_index [B, T, D] at positions [B, T]; return [B, S, D]."""
        return self._update(slice(None), layer, positions, k_index=k_index)[0]

    def rows(self, index: list[int] | torch.Tensor) -> CacheRows:
        """A view of rows `index` (in that order) that the model can use as a cache of len(index) rows."""
        return CacheRows(self, index)

    def _update(self, rows, layer, positions, **fields):
        S = int(positions.max()) + 1
        if self.max_len < S:
            raise ValueError(f"position {S - 1} is past the cache's max_len={self.max_len}")
        write_rows = _row_index(rows, positions.shape[0], positions.device)  # [B, 1]
        self._store(layer, (write_rows, positions), **fields)
        # a slice of rows is a view (no copy when the dtypes agree); a list of rows gathers
        dtype = next(iter(fields.values())).dtype
        return self._load(layer, (rows, slice(0, S)), dtype, *fields)

    # ----- byte accounting ---------------------------------------------------------------------------
    def nbytes_per_token(self) -> int:
        """Bytes one token occupies across all of this cache's layers."""
        return bytes_per_token(self.cfg, self.format, self.n_layers)


class FP8LatentCache(LatentCache):
    """The latent cache with c_kv in e4m3 (one fp32 scale per 128 values of a token, `dsv3.fp8` tiles) and k_pe
    in bf16. At V3's dims that is 512 + 4 * 4 + 64 * 2 = 656 bytes per token per layer, against 1,152 in bf16:
    the layout FlashMLA reads."""

    format = "fp8"


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
        return self.cache._update(self.index, layer, positions, c_kv=c_kv, k_pe=k_pe)

    def update_index(self, layer, positions, k_index):
        return self.cache._update(self.index, layer, positions, k_index=k_index)[0]


class PagedLatentCache(_Storage):
    """The latent cache as a pool of blocks of `block_size` positions each, in any of CACHE_DTYPES. Which
    blocks a sequence owns is its block table (`dsv3.infer.blocks` keeps them); `rows(tables)` gives the model
    a cache over a batch of tables. Storage is [L, blocks * block_size, n] per field of the layout and grows
    with `reserve`, keeping its contents, so memory follows the blocks actually handed out."""

    def __init__(self, cfg: ModelConfig, block_size: int, dtype: str = "bf16", device: torch.device | str = "cpu",
                 n_layers: int | None = None, n_blocks: int = 1):
        self.cfg, self.format, self.block_size = cfg, dtype, block_size
        self.layout = latent_layout(cfg, dtype)
        self.n_layers = cfg.n_layers_with_mtp if n_layers is None else n_layers
        self.device = torch.device(device)
        self.n_blocks = 0
        self.reserve(n_blocks)

    def reserve(self, n_blocks: int) -> None:
        """Make room for blocks 0..n_blocks-1 (never shrinks)."""
        if n_blocks <= self.n_blocks:
            return
        for name, (n, dtype) in self.layout.items():
            new = torch.zeros(self.n_layers, n_blocks * self.block_size, n, dtype=dtype, device=self.device)
            if self.n_blocks:
                new[:, : self.n_blocks * self.block_size] = getattr(self, name)
            setattr(self, name, new)  # [L, slots, n]
        self.n_blocks = n_blocks

    def rows(self, tables: list[list[int]], width: int = 0) -> PagedRows:
        """A cache for a batch whose row i owns blocks tables[i], every table padded with block 0 to the longest
        or to `width` blocks."""
        width = max(width, *(len(t) for t in tables), 1)
        table = torch.zeros(len(tables), width, dtype=torch.long)
        for i, t in enumerate(tables):
            table[i, : len(t)] = torch.tensor(t, dtype=torch.long)
        return PagedRows(self, table.to(self.device))

    def nbytes_per_token(self) -> int:
        return bytes_per_token(self.cfg, self.format, self.n_layers)


class PagedRows:
    """A batch's view of a PagedLatentCache: position p of row b lives in slot table[b, p // size] * size +
    p % size. Writes go to those slots; reads gather a row's slots 0..S-1 in position order."""

    def __init__(self, cache: PagedLatentCache, table: torch.Tensor):
        self.cache, self.table = cache, table  # table [B, blocks]
        # one row whose blocks follow each other in the pool (the common case: ids are handed out lowest
        # first) is read as a view of the storage, without gathering; `first` is its first slot
        self.first = None
        if table.shape[0] == 1:
            held = table[0][table[0] > 0]  # block 0 is padding, never a sequence's
            if held.numel() and bool((held == torch.arange(int(held[0]), int(held[0]) + held.numel(),
                                                           device=held.device)).all()):
                self.first, self.held = int(held[0]) * cache.block_size, held.numel() * cache.block_size

    def update(self, layer, positions, c_kv, k_pe):
        return self._update(layer, positions, c_kv=c_kv, k_pe=k_pe)

    def update_index(self, layer, positions, k_index):
        return self._update(layer, positions, k_index=k_index)[0]

    def _update(self, layer, positions, **fields):
        size = self.cache.block_size
        last, held = int(positions.max()), self.table.shape[1] * size
        if last >= held:
            raise ValueError(f"position {last} is past the {held} slots of this batch's block tables")
        slots = self.table.gather(1, positions // size) * size + positions % size  # [B, T]
        self.cache._store(layer, slots, **fields)
        dtype = next(iter(fields.values())).dtype
        if self.first is not None and last < self.held:  # slots lo..hi-1 as one row [1, S, n]: views
            return tuple(t[None] for t in self.cache._load(layer, slice(self.first, self.first + last + 1), dtype,
                                                           *fields))
        blocks = last // size + 1
        offsets = torch.arange(size, device=self.table.device)
        read = (self.table[:, :blocks, None] * size + offsets).flatten(1)[:, : last + 1]  # [B, S]
        return self.cache._load(layer, read, dtype, *fields)


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
    latent_layout(cfg, dtype)  # rejects an unknown dtype, naming it
    cls = FP8LatentCache if dtype == "fp8" else LatentCache
    return cls(cfg, batch_size, max_len, dtype=dtype, device=device, n_layers=n_layers)


def _row_index(rows, n: int, device) -> torch.Tensor:
    """The [B, 1] row numbers that advanced indexing needs to write into `rows` (a slice or an index)."""
    if isinstance(rows, slice):
        start = rows.start or 0
        return torch.arange(start, start + n, device=device)[:, None]
    return rows.to(device)[:, None]
