"""Stand-in CPU kernels for aten's cuDNN ragged attention ops, so that the ``cudnn_varlen``
backend's custom ops and ``benchmarks/probe_cudnn_varlen.py``'s plumbing (fakes, compile,
bucketing, reference slicing) run on a machine without CUDA. The math is plain dense masked
attention in float64: it checks arvid's wiring, not cuDNN. ``LSE_HEADS_FIRST`` picks the layout of
the log-sum-exp the stand-in returns (``[H, N]`` as later torch, else ``[N, H, 1]``); the backward
insists on getting it back in that layout. :func:`register` installs the kernels (returns the
``torch.library.Library``; ``_destroy()`` it to remove them). As a script:
``python tests/_cudnn_standin.py JSON_OUT`` runs the probe."""

import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from arvid.generator.attention import document_causal_mask  # noqa: E402


def _heads(cu, *ts):
    n, _, d = ts[0].shape
    mask = document_causal_mask(cu.to(torch.int32), n)
    return mask, d, [t.double().transpose(0, 1) for t in ts]  # [H, N, D]


def _probs(mask, d, Q, K):
    return torch.softmax((Q @ K.transpose(1, 2) / d**0.5).masked_fill(~mask, float("-inf")), -1)


LSE_HEADS_FIRST = False
CALLS: list[tuple] = []


def forward(q, k, v, bias, cq, ck, mq, mk, lse, p=0.0, causal=False, debug=False, scale=None):
    assert causal and bias is None and cq.dtype in (torch.int32, torch.int64)
    assert int(mq) >= int((cq[1:] - cq[:-1]).max())  # max_seqlen must bound every sequence
    mask, d, (Q, K, V) = _heads(cq, q, k, v)
    out = (_probs(mask, d, Q, K) @ V).transpose(0, 1).to(q.dtype).contiguous()
    z = torch.zeros((), dtype=torch.int64)
    n, h = q.shape[0], q.shape[1]
    # a log-sum-exp whose values say where they belong: the backward checks it got them back in place
    stats = torch.arange(n * h, dtype=torch.float32)
    stats = stats.view(h, n) if LSE_HEADS_FIRST else stats.view(n, h, 1)
    CALLS.append(("fwd", cq.dtype, int(mq), cq is ck))
    return out, stats, cq, ck, mq, mk, z, z, torch.empty(0)


def backward(go, q, k, v, out, lse, seed, offset, bias, cq, ck, mq, mk, p=0.0, causal=False, scale=None):
    assert causal and bias is None
    n, h = q.shape[0], q.shape[1]
    want = torch.arange(n * h, dtype=torch.float32)
    assert torch.equal(lse, want.view(h, n) if LSE_HEADS_FIRST else want.view(n, h, 1)), "log-sum-exp misplaced"
    CALLS.append(("bwd", cq.dtype, int(mq), go.is_contiguous()))
    mask, d, (Q, K, V, G) = _heads(cq, q, k, v, go)
    P = _probs(mask, d, Q, K)
    out64 = P @ V
    dS = P * (G @ V.transpose(1, 2) - (G * out64).sum(-1, keepdim=True))
    grads = (dS @ K / d**0.5, dS.transpose(1, 2) @ Q / d**0.5, P.transpose(1, 2) @ G)
    return tuple(t.transpose(0, 1).to(q.dtype).contiguous() for t in grads)


def register() -> torch.library.Library:
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_cudnn_attention_forward", forward, "CPU")
    lib.impl("_cudnn_attention_backward", backward, "CPU")
    return lib


if __name__ == "__main__":
    lib = register()  # kept: the registrations go with the Library object
    import probe_cudnn_varlen as probe

    # torch_varlen is CUDA-only: its row runs arvid's portable backend instead
    real = probe.varlen_causal_attention
    probe.varlen_causal_attention = lambda q, k, v, cu, m, b: real(q, k, v, cu, m, "sdpa")
    probe.backend_unavailable_reason = lambda *a: None
    probe.main(["--device", "cpu", "--plumbing-check", "--tokens", "1500", "--heads", "2", "--head-dim", "16",
                "--iters", "1", "--batches", "3", "--count-bucket", "4", "--json", sys.argv[1]])
