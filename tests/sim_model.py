"""The simulated model of the simulation harness: what KV every position must hold, and a forward
pass that reads exactly what attention would read.

* The KV of position ``p`` of a request is a function of its whole input prefix ``[0..p]``: a BLAKE2b
  chain over the inputs (a token id, or the digest of a prompt-embedding row), whose 16-byte digest
  fills the position's bytes in every layer, XOR a salt per (rank, layer) — so a block of the wrong
  layer, rank, request or prefix never looks right.
* The forward of a request scheduled over ``[c, c+n)`` first reads every position ``[0, c)`` of its
  blocks, on every rank. If all of them hold their expected KV it writes the correct KV of
  ``[c, c+n)``; otherwise it writes *poisoned* KV derived from what it read (wrong, deterministic,
  and recognisable), as attention over wrong KV would.
* Writes of one forward are visible to every request of the same forward (vLLM writes a layer's KV
  of the whole batch before that layer's attention), so the forward is evaluated to a fixpoint.
* Every digest the harness ever wrote is remembered, so a wrong position can be described: "holds
  the KV of request r2 position 40", "holds KV poisoned by the forward of r5", "was never written".
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field

import numpy as np

DIGEST = 16
VOCAB = 1000


def _digest(*parts: bytes) -> bytes:
    h = hashlib.blake2b(digest_size=DIGEST)
    for part in parts:
        h.update(part)
    return h.digest()


def token_from_digest(digest: bytes) -> int:
    """The token the model samples after a prefix whose last KV digest is ``digest``."""
    return 4 + int.from_bytes(digest[:4], "little") % (VOCAB - 4)


@dataclass
class Trace:
    """One request's inputs and the KV digest of each position (grows as tokens are sampled)."""

    req_id: str
    inputs: list[bytes]  # one identity per position
    prompt_len: int
    digests: list[bytes] = field(default_factory=list)

    def __post_init__(self) -> None:
        self._extend_digests()

    def _extend_digests(self) -> None:
        prev = self.digests[-1] if self.digests else b"root"
        for ident in self.inputs[len(self.digests) :]:
            prev = _digest(prev, ident)
            self.digests.append(prev)

    def append_token(self, token: int) -> None:
        self.inputs.append(b"t" + token.to_bytes(4, "little"))
        self._extend_digests()

    def next_token(self) -> int:
        return token_from_digest(self.digests[-1])

    def __len__(self) -> int:
        return len(self.inputs)


def token_inputs(tokens: list[int]) -> list[bytes]:
    return [b"t" + t.to_bytes(4, "little") for t in tokens]


def embedding_input(row: bytes) -> bytes:
    return b"e" + _digest(row)


@dataclass
class Wrong:
    """The first wrong position a request attended to."""

    rank: int
    layer: int
    position: int
    block: int
    found: str
    last_writer: str
    written_at: int
    read_summary: bytes


class KVModel:
    """Expected and poisoned bytes, and who wrote what (shared by all ranks)."""

    def __init__(self, num_layers: int, token_bytes: int, num_ranks: int):
        if token_bytes % DIGEST:
            raise ValueError(f"a position's bytes per layer ({token_bytes}) must be a multiple of {DIGEST}")
        self.num_layers = num_layers
        self.token_bytes = token_bytes
        self.reps = token_bytes // DIGEST
        self.salts = [
            np.stack([np.frombuffer(_digest(f"salt {r}/{layer}".encode()), np.uint8) for layer in range(num_layers)])
            for r in range(num_ranks)
        ]  # [rank] -> [L, 16]
        self.origin: dict[bytes, str] = {}  # digest -> what it is the KV of

    def remember(self, trace: Trace, start: int = 0) -> None:
        for p in range(start, len(trace.digests)):
            self.origin.setdefault(trace.digests[p], f"the KV of request {trace.req_id} position {p}")

    def fill(self, digests: list[bytes], rank: int) -> np.ndarray:
        """``[L, len(digests), token_bytes]`` bytes of these positions on ``rank``."""
        d = np.frombuffer(b"".join(digests), np.uint8).reshape(len(digests), DIGEST)
        salted = d[None, :, :] ^ self.salts[rank][:, None, :]
        return np.tile(salted, (1, 1, self.reps))

    def describe(self, got: np.ndarray, rank: int, layer: int) -> str:
        """What the bytes of one position of one layer are."""
        if not got.any():
            return "zeros (never written)"
        digest = (got[:DIGEST] ^ self.salts[rank][layer]).tobytes()
        if np.array_equal(got, np.tile(got[:DIGEST], self.reps)):
            known = self.origin.get(digest)
            if known:
                return known
        for other in range(self.num_layers):
            alt = (got[:DIGEST] ^ self.salts[rank][other]).tobytes()
            if other != layer and alt in self.origin:
                return f"{self.origin[alt]} of layer {other}"
        return "bytes no forward ever wrote"

    def poison(self, trace: Trace, start: int, stop: int, read_summary: bytes, step: int) -> list[bytes]:
        out = []
        for p in range(start, stop):
            d = _digest(b"poison", trace.digests[p], read_summary)
            what = f"KV poisoned by the forward of request {trace.req_id} (position {p}, step {step})"
            self.origin.setdefault(d, what)
            out.append(d)
        return out


class RankKV:
    """One rank's paged KV cache as ``[L, num_blocks, block_size, token_bytes]`` bytes (``LBNHC``),
    and who last wrote each block."""

    def __init__(self, rank: int, storage: np.ndarray, model: KVModel, block_size: int):
        self.rank = rank
        self.model = model
        self.block_size = block_size
        self.kv = storage.reshape(model.num_layers, -1, block_size, model.token_bytes)
        self.last_writer: dict[int, tuple[int, str]] = {}  # block -> (step, who)

    def _index(self, block_ids: list[int], start: int, stop: int) -> tuple[np.ndarray, np.ndarray]:
        pos = np.arange(start, stop)
        return np.asarray(block_ids, dtype=np.int64)[pos // self.block_size], pos % self.block_size

    def check_reads(self, trace: Trace, block_ids: list[int], upto: int) -> Wrong | None:
        if upto == 0:
            return None
        blocks, offsets = self._index(block_ids, 0, upto)
        got = self.kv[:, blocks, offsets, :]
        expected = self.model.fill(trace.digests[:upto], self.rank)
        bad = np.nonzero((got != expected).any(axis=2))
        if not len(bad[0]):
            return None
        layer, pos = int(bad[0][np.argmin(bad[1])]), int(bad[1].min())
        block = int(blocks[pos])
        return Wrong(
            rank=self.rank,
            layer=layer,
            position=pos,
            block=block,
            found=self.model.describe(got[layer, pos], self.rank, layer),
            last_writer=self.last_writer.get(block, (0, "nobody since the start"))[1],
            written_at=self.last_writer.get(block, (0, ""))[0],
            read_summary=_digest(got.tobytes()),
        )

    def write(self, block_ids: list[int], start: int, digests: list[bytes], step: int, who: str) -> None:
        blocks, offsets = self._index(block_ids, start, start + len(digests))
        self.kv[:, blocks, offsets, :] = self.model.fill(digests, self.rank)
        for b in set(blocks.tolist()):
            self.last_writer[b] = (step, who)


@dataclass
class Scheduled:
    """One request of a forward: attends to ``[0, start)`` and computes ``[start, start + num)``."""

    trace: Trace
    block_ids: list[int]
    start: int
    num: int


def forward(ranks: list[RankKV], batch: list[Scheduled], step: int) -> dict[str, Wrong | None]:
    """Run the batch on every rank; return, per request, the first wrong position it read (or None)."""
    status: dict[str, Wrong | None] = {}
    for _ in range(len(batch) + 1):
        changed = False
        for item in batch:
            req_id = item.trace.req_id
            wrong = None
            for rank in ranks:
                wrong = rank.check_reads(item.trace, item.block_ids, item.start)
                if wrong is not None:
                    break
            if req_id in status and (status[req_id] is None) == (wrong is None):
                continue
            status[req_id] = wrong
            changed = True
            stop = item.start + item.num
            if wrong is None:
                digests = item.trace.digests[item.start : stop]
                who = f"the forward of request {req_id} at step {step}"
            else:
                digests = rank_model(ranks).poison(item.trace, item.start, stop, wrong.read_summary, step)
                who = f"the (poisoned) forward of request {req_id} at step {step}"
            for rank in ranks:
                rank.write(item.block_ids, item.start, digests, step, who)
        if not changed:
            return status
    raise AssertionError("the simulated forward did not converge (a cycle between requests' reads and writes)")


def rank_model(ranks: list[RankKV]) -> KVModel:
    return ranks[0].model
