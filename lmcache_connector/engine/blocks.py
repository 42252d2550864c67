"""The engine API's own paged KV cache: the blocks the executor copies chunks out of and into.

vLLM hands the connector its paged KV cache; a custom engine has none, so the API keeps one: one
allocation ``[num_layers, num_blocks, 2, num_kv_heads, BLOCK_SIZE, head_size]``, seen per layer as
``[num_blocks, 2, H, BLOCK_SIZE, D]`` (K and V of a block's tokens, head by head). That is a layout
:class:`~lmcache_connector.ops.PagedKV` already reads (one region per layer, one page per block),
so the executor, its block mover and every tier work on it unchanged. A request's block ``i``
is always buffer block ``i``: one request is in flight at a time.

This module only copies between that buffer and per-layer ``[H, tokens, D]`` tensors (the
``transformers`` layout, on any device): a block's tokens are one ``[H, BLOCK_SIZE, D]`` slice of
a layer's K or V, so a run of blocks is one strided copy per layer and K/V.
"""

from __future__ import annotations

import torch

from lmcache_connector.engine.shape import BLOCK_SIZE, KVShape


class PagedBuffer:
    def __init__(self, shape: KVShape, num_blocks: int, device: torch.device):
        self.shape = shape
        self.num_blocks = num_blocks
        self.device = device
        self.blocks = torch.zeros(
            (shape.num_layers, num_blocks, 2, shape.num_kv_heads, BLOCK_SIZE, shape.head_size),
            dtype=shape.dtype,
            device=device,
        )

    def layer_views(self) -> dict[str, torch.Tensor]:
        """One ``[num_blocks, 2, H, BLOCK_SIZE, D]`` view per layer, all in one allocation."""
        return {f"layer.{i}": self.blocks[i] for i in range(self.shape.num_layers)}

    def write(self, layers: list[tuple[torch.Tensor, torch.Tensor]], first_block: int, num_blocks: int) -> None:
        """Copy tokens ``[first_block, first_block + num_blocks) * BLOCK_SIZE`` of each ``[H, T, D]``
        K and V into the same blocks of the buffer."""
        start, end = first_block * BLOCK_SIZE, (first_block + num_blocks) * BLOCK_SIZE
        for layer, pair in enumerate(layers):
            for kv, tensor in enumerate(pair):
                src = tensor[:, start:end].reshape(tensor.shape[0], num_blocks, BLOCK_SIZE, tensor.shape[2])
                self.blocks[layer, first_block : first_block + num_blocks, kv].copy_(src.transpose(0, 1))

    def read(self, num_blocks: int, device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """New ``[1, H, num_blocks * BLOCK_SIZE, D]`` K and V per layer, on ``device``."""
        s = self.shape
        out = []
        for layer in range(s.num_layers):
            pair = []
            for kv in range(2):
                tensor = torch.empty(
                    (1, s.num_kv_heads, num_blocks * BLOCK_SIZE, s.head_size), dtype=s.dtype, device=device
                )
                self._copy_out(layer, kv, num_blocks, tensor[0])
                pair.append(tensor)
            out.append(tuple(pair))
        return out

    def read_into(self, num_blocks: int, out: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy the first ``num_blocks`` blocks into the leading tokens of caller-provided ``[H, T, D]``
        K and V tensors (already checked to hold at least that many tokens)."""
        for layer, pair in enumerate(out):
            for kv, tensor in enumerate(pair):
                self._copy_out(layer, kv, num_blocks, tensor[:, : num_blocks * BLOCK_SIZE])

    def _copy_out(self, layer: int, kv: int, num_blocks: int, dst: torch.Tensor) -> None:
        src = self.blocks[layer, :num_blocks, kv].transpose(0, 1)  # [H, n, BLOCK_SIZE, D]
        try:
            dst.view(dst.shape[0], num_blocks, BLOCK_SIZE, dst.shape[2]).copy_(src)
        except RuntimeError:  # a caller's buffer whose token axis cannot be split in place
            dst.copy_(src.reshape(dst.shape))
