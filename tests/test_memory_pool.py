"""The memory tier's pool: exactly its configured size, usable bytes, pinned on CUDA, pageable here."""

from __future__ import annotations

import ctypes
import gc
import logging
import mmap
import time

import pytest
import torch

from lmcache_connector.tiers.memory import pool as memory
from lmcache_connector.tiers.memory.pool import MemoryPool

ODD_SHAPE = (5, 3, 1000)  # 15,000 bytes per slot: neither a page multiple nor a power of two


def page_round(n: int) -> int:
    return -(-n // mmap.PAGESIZE) * mmap.PAGESIZE


def mapping_around(ptr: int) -> tuple[int, int, str]:
    """The ``(start, end, perms)`` of the mapping of this process that contains ``ptr``."""
    with open("/proc/self/maps") as maps:
        for line in maps:
            span, perms = line.split()[:2]
            start, end = (int(x, 16) for x in span.split("-"))
            if start <= ptr < end:
                return start, end, perms
    raise AssertionError(f"{ptr:#x} is in no mapping")


class FakeCudart:
    """Records what the pool asks of ``torch.cuda.cudart()``."""

    def __init__(self, register_error: int = 0):
        self.register_error = register_error
        self.registered: list[tuple[int, int, int]] = []
        self.unregistered: list[int] = []

    def cudaHostRegister(self, ptr: int, size: int, flags: int) -> int:  # noqa: N802 - CUDA's name
        self.registered.append((ptr, size, flags))
        return self.register_error

    def cudaHostUnregister(self, ptr: int) -> int:  # noqa: N802
        self.unregistered.append(ptr)
        return 0

    def cudaGetErrorString(self, error: int) -> str:  # noqa: N802
        return f"error {error}"


def test_pool_maps_exactly_its_configured_size():
    pool = MemoryPool(3, ODD_SHAPE)
    nbytes = 3 * 5 * 3 * 1000
    assert pool.nbytes == nbytes and pool.buffer.numel() == nbytes
    assert pool.mapped_bytes == page_round(nbytes) == len(pool._mapping)  # rounded to a page, nothing more
    ptr = pool.buffer.data_ptr()
    anchor = ctypes.c_char.from_buffer(pool._mapping)
    assert ctypes.addressof(anchor) == ptr  # the tensor is the mapping itself, not a copy
    del anchor
    assert ptr % mmap.PAGESIZE == 0
    start, end, perms = mapping_around(ptr)
    # The kernel may merge neighbouring anonymous mappings into one entry, so the entry holds ours.
    assert start <= ptr and ptr + pool.mapped_bytes <= end and perms.startswith("rw")
    pool.close()


def test_pool_bytes_are_usable_slot_by_slot():
    pool = MemoryPool(4, ODD_SHAPE)
    for slot in range(4):
        pool.slot(slot).fill_(slot + 1)
    pool.slot(2, num_blocks=1, first_block=1).fill_(0xEE)  # a partial view stays inside its blocks
    for slot in range(4):
        view = pool.slot(slot)
        if slot == 2:
            assert (view[:, 1] == 0xEE).all() and (view[:, 0] == 3).all() and (view[:, 2] == 3).all()
        else:
            assert (view == slot + 1).all()
    # The disk writer and reader see a slot's regions as byte views of the same memory.
    region = memoryview(pool.slot(3)[4].numpy()).cast("B")
    region[-1] = 0x42
    assert pool.buffer.view(-1)[-1].item() == 0x42  # the pool's very last byte
    assert MemoryPool(0, ODD_SHAPE).buffer.numel() == 0  # an empty tier maps nothing
    pool.close()


def test_pool_on_a_cpu_machine_is_pageable_and_registers_nothing(monkeypatch, caplog):
    def no_cuda():
        raise AssertionError("cudart must not be asked without CUDA")

    monkeypatch.setattr(torch.cuda, "cudart", no_cuda)
    pool = MemoryPool(2, ODD_SHAPE)
    assert pool.pinned is False and pool._prefault is not None
    pool.close()
    monkeypatch.undo()
    with caplog.at_level(logging.WARNING, logger="lmcache_connector"):
        forced = MemoryPool(2, ODD_SHAPE, pin=True)  # this torch has no CUDA: a warning, then pageable
    assert forced.pinned is False and "Pinned host memory unavailable" in caplog.text
    forced.close()


def test_pool_registers_exactly_its_mapping_with_cuda_and_unregisters_at_close(monkeypatch):
    cudart = FakeCudart()
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    pool = MemoryPool(3, ODD_SHAPE, pin=True)
    ptr = pool.buffer.data_ptr()
    assert pool.pinned is True
    assert cudart.registered == [(ptr, page_round(pool.nbytes), memory.CUDA_HOST_REGISTER_DEFAULT)]
    assert pool._prefault is None  # locked pages need no prefaulting
    pool.close()
    pool.close()
    assert cudart.unregistered == [ptr] and pool.pinned is False
    pool.slot(0).fill_(7)  # still usable, now pageable

    collected = MemoryPool(2, ODD_SHAPE, pin=True)
    other = collected.buffer.data_ptr()
    del collected
    gc.collect()
    assert cudart.unregistered == [ptr, other]  # a pool dropped without close unregisters too


def test_pool_falls_back_to_pageable_memory_when_registration_is_refused(monkeypatch, caplog):
    cudart = FakeCudart(register_error=2)  # cudaErrorMemoryAllocation
    monkeypatch.setattr(torch.cuda, "cudart", lambda: cudart)
    with caplog.at_level(logging.WARNING, logger="lmcache_connector"):
        pool = MemoryPool(2, ODD_SHAPE, pin=True)
    assert pool.pinned is False and pool._prefault is not None
    assert "cudaHostRegister" in caplog.text and "error 2" in caplog.text
    pool.close()
    assert cudart.unregistered == []


def test_pageable_pool_is_faulted_in_ahead_of_use():
    pool = MemoryPool(4, (1, 4, 64 * 1024))  # 1 MiB
    if pool._prefault._madvise is None:
        pytest.skip("no madvise on this platform")
    libc = ctypes.CDLL(None, use_errno=True)
    pages = pool.mapped_bytes // mmap.PAGESIZE
    vec = (ctypes.c_ubyte * pages)()
    deadline = time.monotonic() + 10
    resident = 0
    while time.monotonic() < deadline:
        assert libc.mincore(ctypes.c_void_p(pool.buffer.data_ptr()), ctypes.c_size_t(pool.mapped_bytes), vec) == 0
        resident = sum(v & 1 for v in vec)
        if resident == pages:
            break
        time.sleep(0.02)
    if resident < pages and pool._prefault._done == pool._prefault._base:
        pytest.skip("madvise(MADV_POPULATE_WRITE) unsupported by this kernel")
    assert resident == pages
    pool.close()
