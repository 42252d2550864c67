"""The CPU-memory tier's bytes: one pool of equal chunk slots, allocated once.

The pool is ``[num_slots, R, blocks_per_chunk, row_bytes]`` uint8. A slot holds one chunk in the
chunk-buffer format of :mod:`lmcache_connector.ops` (a partial chunk uses the first ``n`` blocks of
its slot), so stores and loads copy straight between the paged KV cache and the slot with no
intermediate buffer and no allocation on the hot path.

The memory is one private anonymous ``mmap`` of exactly ``num_slots * slot_bytes``, rounded up to
the page size only, seen as a tensor without a copy. On a CUDA machine the mapping is registered
with the driver (``cudaHostRegister``): its pages are locked, device<->host copies run at DMA speed
and asynchronously, and the Triton kernels read and write it directly. PyTorch's own pinned
allocation (``pin_memory=True``) would round the size up to a power of two in its caching host
allocator: a 5 GB tier would lock 8 GiB per worker. Where registration is unavailable (no CUDA) or
refused, the memory is pageable and a :class:`Prefaulter` commits its pages ahead of use.
:meth:`MemoryPool.close` unregisters it (also done when the pool is collected); the memory stays
valid, pageable, as long as a view of it is alive.

Which slot holds which chunk is decided by the scheduler-side index; this class only hands out
views.
"""

from __future__ import annotations

import logging
import mmap
import weakref

import torch

from lmcache_connector.tiers.memory.prefault import Prefaulter

logger = logging.getLogger("lmcache_connector")

CUDA_HOST_REGISTER_DEFAULT = 0  # with unified addressing (every 64-bit CUDA process): mapped and portable


class MemoryPool:
    def __init__(self, num_slots: int, chunk_shape: tuple[int, int, int], pin: bool | None = None):
        regions, blocks_per_chunk, row_bytes = chunk_shape
        self.num_slots = num_slots
        self.slot_bytes = regions * blocks_per_chunk * row_bytes
        shape = (num_slots, regions, blocks_per_chunk, row_bytes)
        nbytes = num_slots * self.slot_bytes
        self.mapped_bytes = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE
        if nbytes:
            flags, prot = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, mmap.PROT_READ | mmap.PROT_WRITE
            self._mapping: mmap.mmap | None = mmap.mmap(-1, self.mapped_bytes, flags=flags, prot=prot)
            flat = torch.frombuffer(self._mapping, dtype=torch.uint8, count=nbytes)
        else:
            self._mapping = None
            flat = torch.empty(0, dtype=torch.uint8)
        self.buffer = flat.view(shape)
        if pin is None:
            pin = torch.cuda.is_available()
        self._unregister: weakref.finalize | None = None
        self.pinned = bool(pin and nbytes) and self._register()
        # Registered memory is committed (locked) at registration; pageable memory ahead of use.
        self._prefault = None if self.pinned else Prefaulter(flat, self.slot_bytes)

    def _register(self) -> bool:
        """Lock the mapping's pages for DMA with ``cudaHostRegister``; False (and a warning) if that fails."""
        try:
            cudart = torch.cuda.cudart()
            error = cudart.cudaHostRegister(self.buffer.data_ptr(), self.mapped_bytes, CUDA_HOST_REGISTER_DEFAULT)
        except Exception as exc:  # noqa: BLE001 - no CUDA in this build or process: pageable memory
            logger.warning("Pinned host memory unavailable (%s); using pageable memory", exc)
            return False
        if int(error) != 0:
            logger.warning(
                "cudaHostRegister of the %.1f GiB memory tier failed (%s); using pageable memory",
                self.mapped_bytes / 2**30,
                cudart.cudaGetErrorString(error),
            )
            return False
        self._unregister = weakref.finalize(self, _unregister, cudart, self.buffer.data_ptr())
        self._unregister.atexit = False  # at exit the process's pages go anyway
        return True

    def note_used(self, slot: int) -> None:
        """The scheduler assigned ``slot``: fault in the pages that will be needed next."""
        if self._prefault is not None:
            self._prefault.note_used(slot)

    def slot(self, slot: int, num_blocks: int | None = None, first_block: int = 0) -> torch.Tensor:
        """The ``[R, num_blocks, row_bytes]`` view of blocks ``[first_block, first_block + num_blocks)``."""
        view = self.buffer[slot]
        if num_blocks is None and first_block == 0:
            return view
        end = view.shape[1] if num_blocks is None else first_block + num_blocks
        return view[:, first_block:end]

    @property
    def nbytes(self) -> int:
        return self.num_slots * self.slot_bytes

    def close(self) -> None:
        """Unregister the pinned pages (no copy may be in flight) and stop the prefaulter.

        The buffer stays usable as pageable memory while views of it are alive.
        """
        if self._prefault is not None:
            self._prefault.stop()
        if self._unregister is not None:
            self._unregister()
        self.pinned = False


def _unregister(cudart, ptr: int) -> None:
    try:
        cudart.cudaHostUnregister(ptr)
    except Exception:  # noqa: BLE001 - the CUDA context may already be gone
        logger.debug("cudaHostUnregister failed", exc_info=True)
