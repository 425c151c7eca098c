"""Shared by the attention tests: the dense float64 reference, and the GPU tests' router-like batch."""

from __future__ import annotations

import math

import torch


def reference(q, k, v, cu):
    """Loop over sequences; explicit softmax in float64 with a lower-triangular mask."""
    h = q.shape[1]
    rep = h // k.shape[1]
    out = torch.empty_like(q, dtype=torch.float64)
    for a, b in zip(cu[:-1].tolist(), cu[1:].tolist()):
        qs, ks, vs = (t[a:b].double().transpose(0, 1) for t in (q, k, v))  # [H', L, D]
        ks, vs = ks.repeat_interleave(rep, 0), vs.repeat_interleave(rep, 0)
        s = qs @ ks.transpose(1, 2) / math.sqrt(q.shape[2])
        L = b - a
        s = s.masked_fill(~torch.ones(L, L, dtype=torch.bool).tril(), float("-inf"))
        out[a:b] = (s.softmax(-1) @ vs).transpose(0, 1)
    return out


def router_like_qkv(h: int, d: int):
    """On CUDA: 21 sequences of router-like lengths (130-1,400 tokens, ~16k in all; a sequence
    count off cudnn_fe's bucket of 8), a fused projection ``qkv [N, 3h, d]`` bf16 and loss weights
    ``w [N, h, d]`` float32 -> ``(lens, cu_seqlens int32, qkv, w)``."""
    g = torch.Generator().manual_seed(0)
    lens = [int(x) for x in torch.randint(130, 1400, (21,), generator=g)]
    n = sum(lens)
    cu = torch.tensor([0] + lens, device="cuda").cumsum(0).to(torch.int32)
    return lens, cu, torch.randn(n, 3 * h, d, device="cuda", dtype=torch.bfloat16), torch.randn(n, h, d, device="cuda")
