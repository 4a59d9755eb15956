"""The paged cache's bookkeeping: a pool of fixed-size blocks, reference-counted, and a prefix index that
lets a prompt reuse the blocks an earlier sequence computed for the same leading tokens.

A block holds `block_size` consecutive positions of one sequence in every layer; a sequence's block table
lists its blocks in order. Block 0 is never handed out: a batch pads shorter tables with it, and what a row
reads from it is masked.

Prefix sharing. Once every slot of a block is written, the block is registered under a key chained from its
predecessor's key and its tokens: the key of block i names tokens 0..(i+1)*block_size - 1 exactly. With MTP
drafting the key also holds the token after the block, which the MTP layer's last slot of the block was
computed from. A new prompt hashes its leading full blocks the same way and takes every block found: their
prefill is skipped. At least one prompt token is always left to compute, since its logits start decoding.

References and eviction. A block's reference count is the number of sequences using it. When a count drops
to zero, a registered block stays cached (in least-recently-used order) until the space is needed; an
unregistered one is free at once. `available` counts both: cached blocks are reclaimed on demand. Free ids
are handed out lowest first, so the pool's used part stays compact and the storage can grow with it.
"""

from __future__ import annotations

import hashlib
import heapq
from array import array
from collections import OrderedDict
from collections.abc import Sequence

ROOT = b"dsv3-prefix"  # the key before a sequence's first block


class PoolFull(Exception):
    """No free or evictable block is left."""


def block_keys(tokens: Sequence[int], block_size: int, lookahead: bool, start: bytes = ROOT) -> list[bytes]:
    """The keys of the full blocks of `tokens` (with `lookahead`, only of blocks whose next token is known)."""
    keys, key = [], start
    n_full = (len(tokens) - (1 if lookahead else 0)) // block_size
    for i in range(n_full):
        end = (i + 1) * block_size
        held = tokens[i * block_size : end + (1 if lookahead else 0)]
        key = hashlib.blake2b(key + array("q", held).tobytes(), digest_size=16).digest()
        keys.append(key)
    return keys


class BlockPool:
    def __init__(self, n_blocks: int, block_size: int):
        if n_blocks < 2:
            raise ValueError(f"a block pool needs at least 2 blocks (block 0 is padding), got {n_blocks}")
        self.n_blocks, self.block_size = n_blocks, block_size
        self._free = list(range(1, n_blocks))  # a heap: lowest id first
        self.refs = [0] * n_blocks
        self._key_of: dict[int, bytes] = {}
        self._block_of: dict[bytes, int] = {}
        self._cached: OrderedDict[int, None] = OrderedDict()  # registered, unreferenced; oldest first
        self.peak = 0  # the most blocks held at once

    @property
    def available(self) -> int:
        """Blocks that can be handed out now: free ones and cached ones no sequence uses."""
        return len(self._free) + len(self._cached)

    @property
    def in_use(self) -> int:
        """Blocks some sequence holds."""
        return self.n_blocks - 1 - len(self._free) - len(self._cached)

    def allocate(self) -> int:
        if self._free:
            block = heapq.heappop(self._free)
        elif self._cached:
            block, _ = self._cached.popitem(last=False)
            del self._block_of[self._key_of.pop(block)]
        else:
            raise PoolFull(f"all {self.n_blocks - 1} blocks are in use")
        self.refs[block] = 1
        self.peak = max(self.peak, self.in_use)
        return block

    def release(self, blocks: Sequence[int]) -> None:
        for block in blocks:
            self.refs[block] -= 1
            if self.refs[block] == 0:
                if block in self._key_of:
                    self._cached[block] = None
                else:
                    heapq.heappush(self._free, block)

    def lookup(self, keys: Sequence[bytes]) -> list[int]:
        """The cached blocks for the leading `keys` (stopping at the first miss); nothing is referenced yet."""
        found = []
        for key in keys:
            block = self._block_of.get(key)
            if block is None:
                break
            found.append(block)
        return found

    def reclaimable(self, blocks: Sequence[int]) -> int:
        """How many of `blocks` are cached without users: counted in `available`, gone from it once taken."""
        return sum(1 for b in blocks if self.refs[b] == 0)

    def take(self, blocks: Sequence[int]) -> None:
        """Reference blocks found by `lookup` for one more sequence."""
        for block in blocks:
            if self.refs[block] == 0:
                del self._cached[block]
            self.refs[block] += 1
        self.peak = max(self.peak, self.in_use)

    def register(self, block: int, key: bytes) -> None:
        """Record that `block` holds exactly what `key` names (first come, first kept)."""
        if key not in self._block_of and block not in self._key_of:
            self._block_of[key], self._key_of[block] = block, key
