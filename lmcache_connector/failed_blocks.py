"""Blocks of vLLM's KV cache known to hold wrong bytes until something rewrites them.

A block whose load failed (and every later block of a request that attended to it) is wrong
until a forward rewrites it. vLLM handles the request that loaded it: it rewinds and recomputes.
But a block shared by several requests is marked for recomputation by the first of them only;
the others keep it as computed and count on that first request rewriting it in the next step. If
it is preempted or aborted first, they would attend to the wrong bytes.

So the scheduler keeps the set, and each step checks every scheduled request: a block it reads
(one its computed prefix covers) that is still wrong and that no request rewrites from its start
in this same step is reported again as a load error, which makes vLLM rewind that request too.
Within one forward, a block written by one request is visible to the others (vLLM writes each
layer's KV before that layer's attention), so a block rewritten in the step counts as good —
unless the request rewriting it is itself flagged, which is why the check runs to a fixpoint.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class StepAccess:
    """One scheduled request in a step: it reads tokens ``[0, read_end)`` and writes ``[read_end, write_end)``."""

    req_id: str
    block_ids: list[int]
    read_end: int
    write_end: int


class FailedBlocks:
    def __init__(self, block_size: int):
        self.block_size = block_size
        self.blocks: set[int] = set()

    def add(self, blocks: set[int]) -> None:
        self.blocks |= blocks

    def check_step(self, accesses: list[StepAccess]) -> dict[str, list[int]]:
        """Wrong blocks each request would read in this step (request id -> blocks to report)."""
        if not self.blocks:
            return {}
        bs = self.block_size
        flagged: dict[str, list[int]] = {}
        while True:
            rewritten = self._rewritten(a for a in accesses if a.req_id not in flagged)
            found = {}
            for access in accesses:
                if access.req_id in flagged:
                    continue
                read = access.block_ids[: -(-access.read_end // bs)]
                wrong = [b for b in read if b in self.blocks and b not in rewritten]
                if wrong:
                    found[access.req_id] = wrong
            if not found:
                break
            flagged.update(found)
        self.blocks -= self._rewritten(a for a in accesses if a.req_id not in flagged)
        return flagged

    def _rewritten(self, accesses) -> set[int]:
        """Blocks some request writes from their first position on, in this step."""
        bs = self.block_size
        out: set[int] = set()
        for access in accesses:
            out.update(access.block_ids[-(-access.read_end // bs) : -(-access.write_end // bs)])
        return out
