"""A static, preallocated key/value cache for incremental decoding.

Shapes never change after allocation, so a decode step that writes into it in place
(``index_copy_`` at a position held in a device tensor) can be captured in a CUDA graph.

Each layer's keys and values are their own allocation, not views of one
``[n_layers, ...]`` tensor: ``torch.compile`` sees a write into a view of a larger graph input
as a write into the whole input, and the functionalised step copied each layer's slice into a
new buffer and the whole cache back at the end: traffic in proportion to the cache's allocated
length at every step. With the debug GPT on the CPU, the compiled step went from 0.50 ms at a
512-position cache to 12.3 ms at 32,768; with separate tensors it stays at 0.38 ms
(``benchmarks/bench_compiled_decode.py``;
``tests/test_generator_gpt.py::test_compiled_decode_step_does_not_copy_the_cache``).
"""

from __future__ import annotations

import torch


class KVCache:
    """Keys and values of every layer: ``k[layer]``, ``v[layer]`` ``[B, n_kv_heads, max_len, head_dim]``
    (``k`` and ``v`` are lists with one tensor per layer).

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
        shape = (batch_size, n_kv_heads, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layers)]

    @property
    def batch_size(self) -> int:
        return self.k[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @property
    def n_layers(self) -> int:
        return len(self.k)

    @property
    def dtype(self) -> torch.dtype:
        return self.k[0].dtype

    @property
    def device(self) -> torch.device:
        return self.k[0].device

    def tensors(self) -> list[torch.Tensor]:
        """Every buffer: the keys of each layer, then the values."""
        return [*self.k, *self.v]

    def nbytes(self) -> int:
        """Bytes held by keys and values together."""
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def fill_(self, value: float) -> KVCache:
        """Set every entry to ``value`` in place (tests fill the cache with garbage this way)."""
        for t in self.tensors():
            t.fill_(value)
        return self

    def reset(self) -> None:
        """Zero the cache in place (the buffers stay the same objects: CUDA graphs keep pointing at them)."""
        for t in self.tensors():
            t.zero_()
