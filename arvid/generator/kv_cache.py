"""A static, preallocated key/value cache for incremental decoding.

Shapes never change after allocation, so a decode step that writes into it in place
(``index_copy_`` at a position held in a device tensor) can be captured in a CUDA graph.
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer: ``k``, ``v`` ``[n_layers, B, n_kv_heads, max_len, head_dim]``.

    Position ``p`` of row ``b`` holds the key/value of the input at sequence position ``p``
    (conditioning prefix slots first). The cache does not track how far it is filled: the
    caller passes the position to ``GPT.decode_step`` (a device tensor, so no host sync).
    """

    def __init__(self, n_layers: int, batch_size: int, n_kv_heads: int, max_len: int, head_dim: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> None:
        if min(n_layers, batch_size, n_kv_heads, max_len, head_dim) <= 0:
            raise ValueError(
                f"KVCache sizes must be positive: n_layers={n_layers} batch_size={batch_size} "
                f"n_kv_heads={n_kv_heads} max_len={max_len} head_dim={head_dim}")
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, device=device, dtype=dtype)
        self.v = torch.zeros(shape, device=device, dtype=dtype)

    @property
    def batch_size(self) -> int:
        return self.k.shape[1]

    @property
    def max_len(self) -> int:
        return self.k.shape[3]

    @property
    def n_layers(self) -> int:
        return self.k.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.k.dtype

    @property
    def device(self) -> torch.device:
        return self.k.device

    def nbytes(self) -> int:
        """Bytes held by keys and values together."""
        return 2 * self.k.numel() * self.k.element_size()

    def reset(self) -> None:
        """Zero the cache in place (the buffers stay the same objects: CUDA graphs keep pointing at them)."""
        self.k.zero_()
        self.v.zero_()
