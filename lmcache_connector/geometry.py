"""The sizes both halves of the cache agree on: blocks, chunks, slots, the key namespace, the ranks.

Each half computes its :class:`Geometry` independently (from vLLM's configuration in
:mod:`lmcache_connector.connector.vllm_config`, or from a custom engine's model shape), in
different processes, so it must come out the same everywhere: the scheduler hands out slot numbers
that every worker's pool must hold, and names chunks every rank stores.
"""

from __future__ import annotations

from dataclasses import dataclass

from lmcache_connector.keys import Namespace


@dataclass(frozen=True)
class Geometry:
    block_size: int
    blocks_per_chunk: int
    block_bytes: int  # one block of every layer, as vLLM sizes pages
    num_slots: int
    namespace: Namespace
    world_size: int  # workers that each hold a shard of every chunk

    @property
    def slot_bytes(self) -> int:
        return self.blocks_per_chunk * self.block_bytes

    def summary(self) -> str:
        """The start-up log's account of the memory tier and the namespace (connector and engine API)."""
        ns = self.namespace
        return (
            f"memory tier {self.num_slots} chunk slots of {self.slot_bytes / 2**20:.1f} MiB; namespace "
            f"{ns.digest().hex()[:12]} (model {ns.model}, {ns.kv_dtype}, {ns.kv_layout})"
        )
