"""Moving a chunk's blocks between the paged KV cache and a memory-pool slot, with completion tracking.

* ``prepare_stores(count, nbytes)`` is a hint, once per step before its stores: ``count`` stores of
  at most ``nbytes`` each follow (the CUDA mover makes room for them in its staging ring).
* ``store`` starts copying blocks into a slot and remembers a caller-chosen id; ``poll_stores``
  returns the ids whose copy has finished (only then may the slot be read or reported stored).
* ``load`` copies a slot into blocks and returns when the bytes are in place: loads are synchronous,
  so the forward pass that follows reads finished KV.
* ``store`` and ``load`` take the pool slot's number as ``slot=`` (optional): the CUDA mover then
  orders a load after the stores into that slot only, not after every store.

On CPU tensors both copies run synchronously through :mod:`lmcache_connector.ops` (the hint and the
slot numbers change nothing); the store is still reported through ``poll_stores`` so the caller's
bookkeeping is the same on every device.
"""

from __future__ import annotations

import torch

from lmcache_connector import ops
from lmcache_connector.ops import PagedKV


class BlockMover:
    """Synchronous block copies for KV caches in CPU memory."""

    def __init__(self, paged: PagedKV):
        self.paged = paged
        self._done: list[int] = []

    def prepare_stores(self, count: int, nbytes: int) -> None:
        """Step hint (``count`` stores of at most ``nbytes`` follow): nothing to prepare on CPU."""

    def store(self, block_ids: list[int], dst: torch.Tensor, store_id: int, slot: int | None = None) -> None:
        """Copy ``block_ids`` into ``dst`` (a ``[R, n, row]`` slot view); report ``store_id`` when done."""
        ops.gather_blocks(self.paged, block_ids, dst)
        self._done.append(store_id)

    def poll_stores(self) -> list[int]:
        """Ids of stores whose bytes are complete since the last call."""
        done, self._done = self._done, []
        return done

    def wait_stores(self) -> list[int]:
        """Block until every started store is complete; return their ids."""
        return self.poll_stores()

    def load(self, src: torch.Tensor, block_ids: list[int], slot: int | None = None) -> None:
        """Copy ``src`` (``[R, n, row]``) into ``block_ids``; returns once the blocks hold the bytes."""
        ops.scatter_blocks(src, self.paged, block_ids)


def make_block_mover(paged: PagedKV) -> BlockMover:
    """The mover for the device the paged KV cache lives on."""
    if paged.device.type == "cuda":
        from lmcache_connector.ops.cuda_mover import CudaBlockMover

        return CudaBlockMover(paged)
    return BlockMover(paged)
