"""Stand-in CPU kernels for aten's cuDNN ragged attention ops, so that
``benchmarks/probe_cudnn_varlen.py``'s plumbing (custom ops, fakes, compile, bucketing, reference
slicing) runs on a machine without CUDA. The math is plain dense masked attention in float64:
it checks the probe, not cuDNN. Run as a script: ``python tests/_cudnn_standin.py JSON_OUT``."""

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


def forward(q, k, v, bias, cq, ck, mq, mk, lse, p=0.0, causal=False, debug=False, scale=None):
    assert causal and bias is None and cq.dtype in (torch.int32, torch.int64)
    assert int(mq) >= int((cq[1:] - cq[:-1]).max())  # max_seqlen must bound every sequence
    mask, d, (Q, K, V) = _heads(cq, q, k, v)
    out = (_probs(mask, d, Q, K) @ V).transpose(0, 1).to(q.dtype).contiguous()
    z = torch.zeros((), dtype=torch.int64)
    return out, torch.zeros(q.shape[0], q.shape[1], 1), cq, ck, mq, mk, z, z, torch.empty(0)


def backward(go, q, k, v, out, lse, seed, offset, bias, cq, ck, mq, mk, p=0.0, causal=False, scale=None):
    assert causal and bias is None
    mask, d, (Q, K, V, G) = _heads(cq, q, k, v, go)
    P = _probs(mask, d, Q, K)
    out64 = P @ V
    dS = P * (G @ V.transpose(1, 2) - (G * out64).sum(-1, keepdim=True))
    grads = (dS @ K / d**0.5, dS.transpose(1, 2) @ Q / d**0.5, P.transpose(1, 2) @ G)
    return tuple(t.transpose(0, 1).to(q.dtype).contiguous() for t in grads)


if __name__ == "__main__":
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("_cudnn_attention_forward", forward, "CPU")
    lib.impl("_cudnn_attention_backward", backward, "CPU")
    import probe_cudnn_varlen as probe

    # torch_varlen is CUDA-only: its row runs arvid's portable backend instead
    real = probe.varlen_causal_attention
    probe.varlen_causal_attention = lambda q, k, v, cu, m, b: real(q, k, v, cu, m, "sdpa")
    probe.backend_unavailable_reason = lambda *a: None
    probe.main(["--device", "cpu", "--plumbing-check", "--tokens", "1500", "--heads", "2", "--head-dim", "16",
                "--iters", "1", "--batches", "3", "--count-bucket", "4", "--json", sys.argv[1]])
