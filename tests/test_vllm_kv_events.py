"""KV-cache events on a real engine: vLLM publishes over ZMQ on loopback (``--kv-events-config``),
a subscriber here decodes them with vLLM's own event classes, as a router (llm-d's precise
prefix-cache scorer) would. The connector's ``CPU`` and ``STORAGE`` blocks must carry the hashes of
vLLM's own ``GPU`` events, go away when a tier evicts them, and come back after a restart."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable

import msgspec
import pytest
import zmq
from vllm.distributed.kv_events import BlockRemoved, BlockStored, KVEventBatch
from vllm_support import start_engine

from lmcache_connector.testing.tiny_model import TINY, random_prompt

CHUNK = {"chunk_size": 128}  # 4 blocks of 32 tokens
BLOCK = 32
PROMPT = 600  # 18 whole blocks: 4 chunks and a partial one of 2 blocks
SETTINGS = {
    "LMCACHE_MAX_LOCAL_CPU_SIZE": "0.0005",  # 8 chunk slots: a third prompt evicts the first
    "LMCACHE_MAX_LOCAL_DISK_SIZE": "0.1",
    "PYTHONHASHSEED": "1234",  # the same on every instance: vLLM's block hashes are reproducible
}


class Subscriber:
    """A router's end of vLLM's event stream: a ZMQ SUB socket the engine's publisher connects to,
    and a DEALER on the engine's replay socket. PUB/SUB drops what is published before the
    subscription reached the publisher, so, as a router does, it asks for a replay of every batch
    after the last one it has (batches are numbered) when it sees a gap or hears nothing."""

    def __init__(self):
        context = zmq.Context.instance()
        self.socket = context.socket(zmq.SUB)
        self.socket.setsockopt(zmq.SUBSCRIBE, b"")
        self.endpoint = f"tcp://127.0.0.1:{self.socket.bind_to_random_port('tcp://127.0.0.1')}"
        self.replay_endpoint = f"tcp://127.0.0.1:{_free_port()}"  # the engine binds it
        self.replay = context.socket(zmq.DEALER)
        self.replay.connect(self.replay_endpoint)
        self.decoder = msgspec.msgpack.Decoder(type=KVEventBatch)
        self.events: list = []
        self.next_seq = 0

    def receive(self, until: Callable[[list], bool], timeout: float = 30) -> list:
        deadline = time.monotonic() + timeout
        asked = 0.0
        while not until(self.events) and time.monotonic() < deadline:
            if self.socket.poll(100):
                _topic, seq, payload = self.socket.recv_multipart()
                seq = int.from_bytes(seq, "big")
                if seq > self.next_seq:
                    self._catch_up()
                self._apply(seq, payload)
            elif time.monotonic() - asked > 0.5:
                asked = time.monotonic()
                self._catch_up()
        return self.events

    def _apply(self, seq: int, payload: bytes) -> None:
        if seq == self.next_seq:  # a batch seen twice (live and replayed) counts once
            self.events.extend(self.decoder.decode(payload).events)
            self.next_seq += 1

    def _catch_up(self) -> None:
        try:
            self.replay.send_multipart([b"", self.next_seq.to_bytes(8, "big")], flags=zmq.NOBLOCK)
        except zmq.Again:
            return
        while self.replay.poll(2000):
            _empty, _topic, seq, payload = self.replay.recv_multipart()
            seq = int.from_bytes(seq, "big", signed=True)
            if seq < 0:  # the end of the replay
                return
            self._apply(seq, payload)

    def close(self) -> None:
        self.socket.close(linger=0)
        self.replay.close(linger=0)


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Replica:
    """One engine with the memory and disk tiers, publishing its events to ``self.subscriber``."""

    def __init__(self, engine_tmp, folder):
        self.engine_tmp, self.folder = engine_tmp, folder
        self.subscriber = Subscriber()
        self.engine = self._start()

    def _start(self):
        events = {
            "enable_kv_cache_events": True,
            "publisher": "zmq",
            "endpoint": self.subscriber.endpoint,  # no "*": the publisher connects to the subscriber
            "replay_endpoint": self.subscriber.replay_endpoint,
        }
        return start_engine(
            TINY,
            self.engine_tmp,
            env={"LMCACHE_LOCAL_DISK": str(self.folder), **SETTINGS},
            extra_config=CHUNK,
            cpus={0},
            enable_prefix_caching=True,  # vLLM's own GPU events come from its prefix cache
            prefix_caching_hash_algo="sha256_cbor",
            kv_events_config=events,
        )

    def serve(self, prompt: list[int]) -> None:
        self.engine.generate([prompt], max_tokens=1)
        self.engine.call("connector_state")  # background writes finish and are reported, as between requests

    def restart(self) -> None:
        """A new engine on the same folder, and a router that has not heard from it yet."""
        self.engine.close()
        self.subscriber.close()
        self.subscriber = Subscriber()
        self.engine = self._start()

    def close(self) -> None:
        self.engine.close()
        self.subscriber.close()


@pytest.fixture(scope="module")
def replica(engine_tmp, tmp_path_factory):
    replica = Replica(engine_tmp, tmp_path_factory.mktemp("kv-events-disk"))
    yield replica
    replica.close()


def stored(events, medium: str) -> list:
    return [h for e in events if isinstance(e, BlockStored) and e.medium == medium for h in e.block_hashes]


def removed(events, medium: str) -> list:
    return [h for e in events if isinstance(e, BlockRemoved) and e.medium == medium for h in e.block_hashes]


def hashes_of(events, prompt: list[int], medium: str = "GPU") -> list | None:
    """The hashes of the prompt's whole blocks in ``medium``'s events, each found by its parent's hash
    and its tokens, as a router chains them (the first block has no parent); None until all arrived."""
    by_parent = {}
    for e in events:
        if isinstance(e, BlockStored) and e.medium == medium:
            for i, h in enumerate(e.block_hashes):
                parent = e.parent_block_hash if i == 0 else e.block_hashes[i - 1]
                by_parent[(parent, tuple(e.token_ids[i * BLOCK : (i + 1) * BLOCK]))] = h
    hashes, parent = [], None
    for start in range(0, len(prompt) // BLOCK * BLOCK, BLOCK):
        parent = by_parent.get((parent, tuple(prompt[start : start + BLOCK])))
        if parent is None:
            return None
        hashes.append(parent)
    return hashes


def served(replica: Replica, prompt: list[int]) -> set:
    """Serve ``prompt``; vLLM's GPU hashes of its blocks, once its GPU and STORAGE events arrived."""
    replica.serve(prompt)

    def written(events) -> bool:
        hashes = hashes_of(events, prompt)
        return hashes is not None and set(hashes) <= set(stored(events, "STORAGE"))

    events = replica.subscriber.receive(written)
    assert written(events), "vLLM's GPU events or the connector's STORAGE events did not arrive"
    return set(hashes_of(events, prompt))


def test_cpu_events_carry_the_hashes_of_vllms_own_gpu_events(replica):
    prompt = random_prompt(PROMPT, seed=1)
    gpu = served(replica, prompt)
    events = replica.subscriber.events
    assert len(gpu) == PROMPT // BLOCK
    assert sorted(stored(events, "CPU")) == sorted(gpu)  # every whole block, the partial chunk's too
    assert hashes_of(events, prompt, "CPU") == hashes_of(events, prompt, "GPU")  # same parents and tokens


def test_memory_evictions_are_removed_and_the_disk_copies_stay_announced(replica):
    prompts = [random_prompt(PROMPT, seed=10 + i) for i in range(3)]
    first = served(replica, prompts[0])
    for prompt in prompts[1:]:  # 15 chunks through 8 slots: the first prompt's chunks leave memory
        served(replica, prompt)
    events = replica.subscriber.receive(lambda ev: first <= set(removed(ev, "CPU")))
    assert first <= set(removed(events, "CPU"))
    assert first <= set(stored(events, "STORAGE")) and not first & set(removed(events, "STORAGE"))


def test_disk_blocks_are_announced_again_after_a_restart(replica):
    hashes = served(replica, random_prompt(PROMPT, seed=20))
    replica.restart()
    deadline = time.monotonic() + 60
    while not hashes <= set(stored(replica.subscriber.events, "STORAGE")) and time.monotonic() < deadline:
        replica.serve([5, 6, 7])  # vLLM publishes the connector's events after a step
        replica.subscriber.receive(lambda ev: hashes <= set(stored(ev, "STORAGE")), timeout=1)
    assert hashes <= set(stored(replica.subscriber.events, "STORAGE"))
    assert not stored(replica.subscriber.events, "GPU")  # nothing was computed: the hashes come from disk
