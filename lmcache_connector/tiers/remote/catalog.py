"""Scheduler side of the remote tier: which chunks the remote store holds, learned in the background.

The scheduler never waits on the network. :meth:`RemoteCatalog.best_piece` answers from what the
catalog knows; what it does not know yet is asked by a background thread, and until the answer
arrives the answer is :data:`~lmcache_connector.tiers.base.PENDING` (the connector tells vLLM to
ask again later). :meth:`RemoteCatalog.prefetch` asks for a whole prompt at once, so a long prompt
costs one question, not one per chunk.

One question, for any number of chunks, is two round trips: the block entries of the boundaries
asked about (``MGET`` on Redis, where every block boundary has one; concurrent GETs of each chunk's
first-block entry on S3 and lmcache_server: :func:`~.client.entry_fingerprints`), each naming a
stored chunk and all of its block fingerprints, so a prompt that shares only part of a chunk still
finds it; then ``EXISTS`` on every rank's value of every chunk named. A chunk counts only when
every tensor-parallel rank's value exists; an entry whose chunk is gone, or that is not a valid
entry, is a miss.

Promises (the lookup machinery is :class:`~lmcache_connector.tiers.lookup_cache.LookupCache`'s):

* **never blocking**: a question is given at most ``LMCACHE_REMOTE_LOOKUP_TIMEOUT_MS``; past that
  it is a miss (counted; one warning), not an outage: a store busy taking writes answers late. A
  call of the background thread that fails (the store refuses, drops the connection, or does not
  answer within the client's socket timeout) marks the tier *down*: while down, every lookup is an
  immediate miss and no write is planned, until a background ``PING`` succeeds (tried after 0.5 s,
  then at doubling intervals up to 30 s). One warning when the tier goes down, one when it is
  back; never a permanent disable. A freshly asked question may be waited for a few milliseconds,
  which a store on the same machine or network answers within, so a remote hit usually costs no
  extra scheduler step;
* **listing, where asked for** (``LMCACHE_S3_LIST_INTERVAL_SECS``, S3 only): every so many
  seconds the background thread lists this namespace's values (ListObjectsV2); a chunk every rank's
  value is listed for is answered at once, without asking. Each listing replaces the last, so an
  object a bucket lifecycle rule deleted drops out; a listed chunk gone at read time is a miss
  (:meth:`RemoteCatalog.forget`), as any stale answer;
* **allowed to be stale**: answers are kept until they were used and are ``answer_ttl_s`` (5 s)
  old, then asked again (so chunks other engines store become visible); a chunk the store evicted
  meanwhile is a miss at read time, which the planner reports back through ``forget``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import Any

from lmcache_connector.tiers.base import Catalog, StoredChunk, _Pending
from lmcache_connector.tiers.lookup_cache import LookupCache, Question
from lmcache_connector.tiers.remote.client import (
    SIDE_KEY_MARK,
    RemoteClient,
    entry_fingerprints,
    side_key,
    value_key,
)
from lmcache_connector.tiers.remote.value import decode_block_entry

logger = logging.getLogger("lmcache_connector")

ENTRY_RANK = "tp0pp0"  # the rank whose writer adds the block entries (one set per chunk is enough)
USAGE_INTERVAL_S = 5.0
MAX_LISTED = 200_000  # chunks a listing keeps (16-byte keys: a few MB); the rest are asked about


class RemoteCatalog(LookupCache[StoredChunk], Catalog):
    name = "remote"
    hit_source = "external_unspecified"
    asynchronous = True  # every fill is a network read
    learns_by_asking = True
    order = 30
    answer_ttl_s = 5.0  # a chunk another engine stored becomes visible within this long of a used answer
    answer_max_age_s = 60.0
    thread_name = "lmcache-remote-catalog"

    def __init__(
        self,
        client: RemoteClient,
        namespace_hex: str,
        rank_tags: Sequence[str],
        lookup_timeout_s: float,
        ttl_secs: int | None = None,
        start_up: bool = True,
        list_interval_s: float | None = None,
    ):
        self.client = client
        self.namespace_hex = namespace_hex
        self.rank_tags = list(rank_tags)
        self.ttl_secs = ttl_secs
        self._prefix = client.key_prefix
        self.list_interval_s = list_interval_s
        self._listed: frozenset[bytes] = frozenset()  # chunks every rank's value was listed for
        self._chunks: dict[bytes, StoredChunk] = {}  # chunks known to be held, by key
        self._used_bytes = 0
        self._max_bytes = 0
        self._warned_listing = False
        self._warned_slow = False
        self._next_usage = 0.0  # background thread
        self._next_listing = 0.0
        super().__init__(lookup_timeout_s, start_up)  # last: starts the background thread

    @property
    def service(self) -> str:
        return f"the remote tier {self.client.url}"

    # ------------------------------------------------------------ scheduler-thread API

    def best_piece(self, block_fps: Sequence[bytes]) -> tuple[StoredChunk, int] | _Pending | None:
        if not self._up or not block_fps:
            return None
        self._known_without_asking(block_fps)
        whole = self._answers.get(block_fps[-1])
        if whole is not None and whole.held is not None:
            whole.used = True
            return whole.held, len(block_fps)
        return self._longest(block_fps)

    @property
    def listed(self) -> frozenset[bytes]:
        """The chunks the last listing found (empty without ``list_interval_s``)."""
        return self._listed

    def __contains__(self, key: bytes) -> bool:
        return key in self._chunks

    def __len__(self) -> int:
        return len(self._chunks)

    def touch(self, key: bytes) -> None:
        # Reads refresh the values' TTL (GETEX); the block entries need theirs refreshed too.
        chunk = self._chunks.get(key)
        if self.ttl_secs and chunk is not None:
            entry_fps = entry_fingerprints(chunk.block_fps, self.client.entry_every_block)
            self._work.put(("expire", [self._entry_key(fp) for fp in entry_fps]))

    def accepts_writes(self) -> bool:
        return self._up

    def stored(self, key: bytes, block_fps: tuple[bytes, ...], nbytes: int) -> None:
        chunk = StoredChunk(key, tuple(block_fps))
        self._chunks[key] = chunk
        self._apply(dict.fromkeys(chunk.block_fps, chunk))

    def forget(self, key: bytes) -> None:
        if key in self._listed:
            self._listed = self._listed - {key}  # gone since the listing: not found there again
        chunk = self._chunks.pop(key, None)
        if chunk is None:
            return
        gone = []
        for fp in chunk.block_fps:
            answer = self._answers.get(fp)
            if answer is not None and answer.held is not None and answer.held.key == key:
                gone.append(fp)
        self._apply(dict.fromkeys(gone))  # gone: not asked again until these answers expire

    def discard(self, key: bytes) -> None:
        self.forget(key)
        self._work.put(("delete", [self._value_key(tag, key) for tag in self.rank_tags]))

    def clear(self, in_flight: Sequence[bytes] = ()) -> None:
        self._listed = frozenset()
        self._chunks.clear()
        self._answers.clear()
        self._asked.clear()
        ns16 = self.namespace_hex[:16]
        self._work.put(("clear", [f"{self._prefix}{ns16}-*", f"{self._prefix}{SIDE_KEY_MARK}{ns16}-*"]))

    def usage(self) -> int:
        return self._used_bytes

    def capacity(self) -> int:
        return self._max_bytes

    def close(self) -> None:
        super().close()
        self.client.close()

    # ------------------------------------------------------------ scheduler-thread pieces

    def _late(self) -> None:
        # A miss for this lookup, counted; not an outage: a store busy taking writes answers late,
        # and marking it down would drop those writes. A store that does not answer at all fails
        # the catalog's call within its socket timeout, and that marks it down.
        self._count("remote_failures")
        if not self._warned_slow:
            self._warned_slow = True
            logger.warning(
                "lmcache_connector: the remote tier %s did not answer a lookup within %.0f ms "
                "(LMCACHE_REMOTE_LOOKUP_TIMEOUT_MS): a miss; late lookups are counted in remote_failures",
                self.client.url,
                self.lookup_timeout_s * 1000,
            )

    def _known_without_asking(self, question: Sequence[bytes]) -> bool:
        """Whether the last listing holds the chunk ``question`` makes (the prompt's whole chunk, or
        its partial last one); if so it becomes the answer, without asking the store."""
        key = question[-1]
        if key not in self._listed:
            return False
        answer = self._answers.get(key)
        if answer is None or answer.held is None or answer.held.key != key:
            self._apply({key: StoredChunk(key, tuple(question))})
        return True

    def _keep(self, chunk: StoredChunk | None) -> StoredChunk | None:
        return None if chunk is None else self._chunks.setdefault(chunk.key, chunk)

    def _expired(self) -> None:
        held = {a.held.key for a in self._answers.values() if a.held is not None}
        for key in [k for k in self._chunks if k not in held]:
            del self._chunks[key]

    def _on_result(self, kind: str, payload: Any) -> None:
        if kind == "usage":
            self._used_bytes, self._max_bytes = payload
        elif kind == "listed":
            self._listed = payload

    def _value_key(self, tag: str, key: bytes) -> str:
        return value_key(self._prefix, self.namespace_hex, tag, key.hex())

    def _entry_key(self, fp: bytes) -> str:
        return side_key(self._prefix, self.namespace_hex, ENTRY_RANK, fp.hex())

    # ------------------------------------------------------------ background thread

    def _ping(self) -> None:
        self.client.ping()

    def _tick(self) -> None:
        if time.monotonic() >= self._next_usage:
            self._next_usage = time.monotonic() + USAGE_INTERVAL_S
            self._results.put(("usage", self.client.memory()))
        if self.list_interval_s is not None and time.monotonic() >= self._next_listing:
            self._next_listing = time.monotonic() + self.list_interval_s
            self._results.put(("listed", self._list_chunks()))

    def _handle_other(self, kind: str, payload: Any) -> None:
        if kind == "expire":
            self.client.expire_many(payload, self.ttl_secs)
        elif kind == "delete":
            self.client.delete_many(payload)
        elif kind == "clear":
            for pattern in payload:
                self.client.delete_matching(pattern)

    def _list_chunks(self) -> frozenset[bytes]:
        """The chunks of this namespace whose every rank's value the store lists (a listing replaces
        the last one, so an object a lifecycle rule deleted drops out of it)."""
        prefix = f"{self._prefix}{self.namespace_hex[:16]}-"
        ranks: dict[bytes, set[str]] = {}
        names = self.client.list_keys(prefix, MAX_LISTED * len(self.rank_tags))
        if len(names) >= MAX_LISTED * len(self.rank_tags) and not self._warned_listing:
            self._warned_listing = True
            logger.warning(
                "lmcache_connector: the remote tier %s lists over %d chunks of this model; the catalog "
                "keeps the first %d and asks about the others",
                self.client.url,
                MAX_LISTED,
                MAX_LISTED,
            )
        for name in names:
            rank, _, key_hex = name[len(prefix) :].partition("-")
            if rank in self.rank_tags and len(key_hex) == 32:
                try:
                    ranks.setdefault(bytes.fromhex(key_hex), set()).add(rank)
                except ValueError:  # not a name this library wrote
                    continue
        return frozenset(key for key, held in ranks.items() if len(held) == len(self.rank_tags))

    def _resolve(self, questions: list[Question]) -> dict[bytes, StoredChunk | None]:
        """The chunk holding each asked block boundary (every rank's value present), or None.

        A question is one chunk's worth of a prompt's block fingerprints, from a chunk boundary.
        The candidates for it: the chunks named by the entries under its boundaries (all of them,
        or the first: the client's ``entry_every_block``), and the chunk the question itself would
        be (its value is asked for directly, so an exact repeat is found even where another
        continuation of the same first block overwrote that entry). Boundary *i* is held by a
        candidate whose *i*-th fingerprint is the asked one (fingerprints chain, so every earlier
        block agrees too) and whose every rank's value exists."""
        every_block = self.client.entry_every_block
        entry_fps = list(dict.fromkeys(fp for q in questions for fp in entry_fingerprints(q, every_block)))
        raws = self.client.resolve_side_keys([self._entry_key(fp) for fp in entry_fps])
        entries: dict[bytes, StoredChunk] = {}
        for fp, raw in zip(entry_fps, raws, strict=True):
            decoded = decode_block_entry(raw) if raw is not None else None
            if decoded is not None:  # anything else (absent, planted, truncated) names nothing
                key, block_fps = decoded
                entries[fp] = StoredChunk(bytes.fromhex(key), tuple(bytes.fromhex(b) for b in block_fps))
        # Per question, its candidates: the entry under a boundary before those under earlier ones
        # (a later boundary's chunk covers more of the question), the question's own chunk last.
        found = [
            _distinct([entries[fp] for fp in reversed(q) if fp in entries] + [StoredChunk(q[-1], q)]) for q in questions
        ]
        candidates = list({chunk.key: chunk for chunks in found for chunk in chunks}.values())
        keys = [self._value_key(tag, chunk.key) for chunk in candidates for tag in self.rank_tags]
        exists = self.client.exists_many(keys)
        ranks = len(self.rank_tags)
        held = {
            chunk.key: chunk
            for i, chunk in enumerate(candidates)
            if all(exists[i * ranks : (i + 1) * ranks])  # a hit needs every rank's shard
        }
        answers: dict[bytes, StoredChunk | None] = {}
        for question, chunks in zip(questions, found, strict=True):
            live = [held[chunk.key] for chunk in chunks if chunk.key in held]
            for i, fp in enumerate(question):
                if answers.get(fp) is None:
                    answers[fp] = next((c for c in live if len(c.block_fps) > i and c.block_fps[i] == fp), None)
        return answers


def _distinct(chunks: list[StoredChunk]) -> list[StoredChunk]:
    """Each chunk once (every block entry of a chunk names it), in first-seen order."""
    seen: dict[bytes, StoredChunk] = {}
    for chunk in chunks:
        seen.setdefault(chunk.key, chunk)
    return list(seen.values())
