"""A stand-in ``cudnn`` module (the cuDNN frontend's Python API, the part ``arvid.generator.cudnn_fe``
uses) that runs on the CPU in float64, so that the ``cudnn_fe`` backend's graphs can be checked
without a GPU: every tensor is read and written *only* through the dims, strides and ragged
offsets the graph declares (as cuDNN reads them), so a wrong stride, offset, padding-mask length
or statistics layout gives wrong numbers here too. The backward computes ``D = rowsum(dO * O)``
from the ``O`` it is handed, as cuDNN's kernels do. It checks arvid's wiring, not cuDNN.

``install(monkeypatch)`` puts it in ``sys.modules['cudnn']``; ``CALLS`` records each execution."""

from __future__ import annotations

import sys
import types

import torch

CALLS: list[tuple] = []


class _DT:
    BFLOAT16, HALF, FLOAT, INT32, INT64 = "bf16", "f16", "f32", "i32", "i64"


class _Diag:
    TOP_LEFT, BOTTOM_RIGHT = "top_left", "bottom_right"


class _Heur:
    A, B, FALLBACK = "A", "B", "FALLBACK"


class _Policy:
    HEURISTICS_CHOICE, ALL = "heuristics_choice", "all"


#: The execution plans a graph offers: (name, seconds each execution sleeps, whether it computes a
#: wrong result, where it fails: False, "build" or "run"). Tests replace it.
PLANS: list[tuple] = [("plan0", 0.0, False, False)]


class Tensor:
    def __init__(self, name: str, dim=None, stride=None, data_type=None):
        self.name, self.dim, self.stride, self.data_type = name, dim, stride, data_type
        self.ragged, self.output = None, False

    def set_ragged_offset(self, t: Tensor):
        self.ragged = t
        return self

    def set_output(self, flag: bool):
        self.output = flag
        return self

    def set_dim(self, dim):
        self.dim = list(dim)
        return self

    def set_stride(self, stride):
        self.stride = list(stride)
        return self

    def set_data_type(self, dt):
        self.data_type = dt
        return self


class pygraph:  # noqa: N801 - the frontend's name
    def __init__(self, io_data_type=None, intermediate_data_type=None, compute_data_type=None, handle=None):
        self.ops: list[tuple] = []
        self.built = False

    def tensor(self, name="", dim=None, stride=None, data_type=None):
        return Tensor(name, list(dim), list(stride), data_type)

    def sdpa(self, q, k, v, generate_stats=None, attn_scale=None, use_padding_mask=False, seq_len_q=None,
             seq_len_kv=None, diagonal_alignment=_Diag.TOP_LEFT, diagonal_band_right_bound=None, name=""):
        assert generate_stats and use_padding_mask and seq_len_q is not None and seq_len_kv is not None
        o, stats = Tensor("o"), Tensor("stats")
        self.ops.append(("fwd", dict(q=q, k=k, v=v, o=o, stats=stats, scale=attn_scale, seq_q=seq_len_q,
                                     seq_kv=seq_len_kv, causal=(diagonal_alignment, diagonal_band_right_bound))))
        return [o, stats]

    def sdpa_backward(self, q, k, v, o, dO, stats, attn_scale=None, use_padding_mask=False, seq_len_q=None,
                      seq_len_kv=None, max_total_seq_len_q=None, max_total_seq_len_kv=None,
                      diagonal_alignment=_Diag.TOP_LEFT, diagonal_band_right_bound=None, name=""):
        assert use_padding_mask and max_total_seq_len_q is not None
        dq, dk, dv = Tensor("dq"), Tensor("dk"), Tensor("dv")
        self.ops.append(("bwd", dict(q=q, k=k, v=v, o=o, do=dO, stats=stats, dq=dq, dk=dk, dv=dv, scale=attn_scale,
                                     seq_q=seq_len_q, seq_kv=seq_len_kv, max_t=max_total_seq_len_q,
                                     causal=(diagonal_alignment, diagonal_band_right_bound))))
        return [dq, dk, dv]

    def validate(self):
        for _, p in self.ops:
            for t in p.values():
                if isinstance(t, Tensor) and t.name not in ("seq_q", "seq_kv"):
                    assert t.dim is not None and len(t.dim) == 4 and len(t.stride) == 4, t.name

    def build_operation_graph(self):
        pass

    def create_execution_plans(self, modes):
        assert modes

    def check_support(self):
        pass

    def build_plans(self, policy=None):
        self.built = True
        self.policy = policy

    def get_workspace_size(self):
        return 16

    def get_execution_plan_count(self):
        return len(PLANS)

    def build_plan_at_index(self, i):
        if PLANS[i][3] == "build":
            raise RuntimeError(f"{PLANS[i][0]} cannot be built")
        self.built_plans = getattr(self, "built_plans", set()) | {i}

    def get_plan_name_at_index(self, i):
        return PLANS[i][0]

    def get_workspace_size_plan_at_index(self, i):
        return 16 * (i + 1)

    def execute_plan_at_index(self, pack: dict, workspace, index, handle=None):
        import time

        name, delay, wrong, fails = PLANS[index]
        assert index in getattr(self, "built_plans", set()), f"plan {index} run before it was built"
        if fails == "run":
            raise RuntimeError(f"{name} cannot run")
        assert workspace.numel() >= 16 * (index + 1)
        time.sleep(delay)
        self.execute(pack, workspace)
        if wrong:
            for t, x in pack.items():
                if t.output:
                    x.add_(1.0)

    def execute(self, pack: dict, workspace, handle=None):
        assert self.built or getattr(self, "built_plans", None)
        kind, p = self.ops[0]
        buf = {t.name: x for t, x in pack.items()}
        missing = {t.name for t in p.values() if isinstance(t, Tensor)} - set(buf)
        assert not missing, f"tensors without buffers: {missing}"
        assert buf[p["seq_q"].name].dtype == torch.int32
        lens = buf[p["seq_q"].name].flatten().tolist()
        assert lens == buf[p["seq_kv"].name].flatten().tolist()
        assert p["causal"] == (_Diag.TOP_LEFT, 0), p["causal"]
        CALLS.append((kind, len(lens), p["q"].dim[2]))
        if kind == "fwd":
            _forward(p, buf, lens)
        else:
            assert p["max_t"] >= sum(lens), (p["max_t"], sum(lens))
            _backward(p, buf, lens)


def _seq(t: Tensor, buf: dict, i: int, length: int) -> torch.Tensor:
    """Sequence ``i`` of graph tensor ``t`` as ``[h, length, d]``, a view of its buffer."""
    x = buf[t.name]
    b, h, s, d = t.dim
    assert length <= s, f"{t.name}: a sequence of {length} tokens in a graph of {s}"
    if t.ragged is not None:
        offsets = buf[t.ragged.name]
        assert offsets.dtype == torch.int64 and offsets.shape == (b + 1, 1, 1, 1), (t.name, offsets.dtype, offsets.shape)
        off = int(offsets.flatten()[i])
    else:
        off = i * t.stride[0]
    return x.as_strided((h, length, d), tuple(t.stride[1:]), x.storage_offset() + off)


def _stats(t: Tensor, buf: dict, i: int, length: int) -> torch.Tensor:
    x = buf[t.name]
    assert t.dim[3] == 1 and x.dtype == torch.float32
    return x.as_strided((t.dim[1], length), (t.stride[1], t.stride[2]), x.storage_offset() + i * t.stride[0])


def _probs(p, q, k, length):
    rep = q.shape[0] // k.shape[0]
    k = k.repeat_interleave(rep, 0)
    scores = (q @ k.transpose(1, 2)) * p["scale"]
    mask = torch.ones(length, length, dtype=torch.bool).tril()
    scores = scores.masked_fill(~mask, float("-inf"))
    return scores, torch.softmax(scores, -1)


def _forward(p, buf, lens):
    for i, n in enumerate(lens):
        if n == 0:
            continue
        q, k, v = (_seq(p[x], buf, i, n).double() for x in ("q", "k", "v"))
        scores, probs = _probs(p, q, k, n)
        out = probs @ v.repeat_interleave(q.shape[0] // v.shape[0], 0)
        _seq(p["o"], buf, i, n).copy_(out)
        _stats(p["stats"], buf, i, n).copy_(torch.logsumexp(scores, -1))


def _backward(p, buf, lens):
    for i, n in enumerate(lens):
        if n == 0:
            continue
        q, k, v, o, do = (_seq(p[x], buf, i, n).double() for x in ("q", "k", "v", "o", "do"))
        rep = q.shape[0] // k.shape[0]
        scores, _ = _probs(p, q, k, n)
        lse = _stats(p["stats"], buf, i, n).double()
        probs = torch.exp(scores - lse[..., None])  # from the saved statistics, as the kernel does
        vr = v.repeat_interleave(rep, 0)
        dp = do @ vr.transpose(1, 2)
        delta = (do * o).sum(-1, keepdim=True)  # from the O it is handed
        ds = probs * (dp - delta) * p["scale"]
        dq = ds @ k.repeat_interleave(rep, 0)
        dk = (ds.transpose(1, 2) @ q).unflatten(0, (k.shape[0], rep)).sum(1)
        dv = (probs.transpose(1, 2) @ do).unflatten(0, (v.shape[0], rep)).sum(1)
        for name, g in (("dq", dq), ("dk", dk), ("dv", dv)):
            _seq(p[name], buf, i, n).copy_(g)


def module() -> types.ModuleType:
    import importlib.machinery

    m = types.ModuleType("cudnn")
    m.__spec__ = importlib.machinery.ModuleSpec("cudnn", None)  # importlib.util.find_spec reads it
    m.data_type, m.diagonal_alignment, m.heur_mode, m.build_plan_policy = _DT, _Diag, _Heur, _Policy
    m.pygraph = pygraph
    m.backend_version = lambda: 91900
    m.create_handle = lambda: 1
    m.set_stream = lambda handle=None, stream=None: None
    return m


def install(monkeypatch) -> types.ModuleType:
    """``sys.modules['cudnn']`` = the stand-in for this test, and ``arvid.generator.cudnn_fe`` made
    to run on the CPU (its CUDA handle and stream calls short-circuited, its caches emptied)."""
    from arvid.generator import cudnn_fe

    m = module()
    CALLS.clear()
    monkeypatch.setitem(sys.modules, "cudnn", m)
    monkeypatch.setattr(cudnn_fe, "_cudnn", lambda: m)
    monkeypatch.setattr(cudnn_fe, "_handle", lambda device: 1)
    monkeypatch.setattr(cudnn_fe, "_GRAPHS", {})
    monkeypatch.setattr(cudnn_fe, "BUILT", [])
    monkeypatch.setattr(cudnn_fe, "TUNED", [])
    monkeypatch.setattr(cudnn_fe, "_BATCH", cudnn_fe.LastBatchMemo())
    return m
