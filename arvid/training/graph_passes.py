"""Graph passes for inductor's compilation of a training step.

:class:`UnfuseResidualAddmm`: inductor rewrites a residual connection ``x + h @ W`` into
``aten.addmm(x, h, W)`` whenever the sum also feeds a non-pointwise op (the next RMSNorm). cuBLAS's
addmm first copies ``x`` into its output (a device-to-device copy of the whole residual stream),
then reads it again in the epilogue: 4.1 ms of copies a GPT-L step at 65,536 positions (H100,
2026-12-07, ``bench_generator.py --profile``: ``Memcpy DtoD`` launched by ``aten::addmm``). Split
back into ``mm`` and ``add``, the add joins the generated kernel of the RMSNorm that reads the
sum. Only additions of a full-size tensor are split (a bias ``[C]`` broadcast stays fused).

Passing them: ``torch.compile(fn, options=graph_pass_options(device))``. The values change by the bf16
rounding of the matmul's output before the add (addmm adds in float32 and rounds once).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files

_aten = torch.ops.aten


def _same_shape(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``a`` and ``b`` are known to have one shape, without installing a guard (sizes may
    be symbolic, or data-dependent, under dynamic shapes)."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    return a.dim() == b.dim() and all(statically_known_true(x == y) for x, y in zip(a.shape, b.shape))


class UnfuseResidualAddmm(CustomGraphPass):
    """``addmm(x, a, b)`` with ``x`` of the output's shape (alpha = beta = 1) -> ``x + mm(a, b)``.
    :attr:`graphs` counts the graphs this instance has run on, :attr:`rewritten` the nodes it has split."""

    def __init__(self) -> None:
        self.graphs = self.rewritten = 0

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.graphs += 1
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not _aten.addmm.default:
                continue
            inp, a, b = node.args[:3]
            if node.kwargs.get("alpha", 1) != 1 or node.kwargs.get("beta", 1) != 1:
                continue
            vals = [getattr(t, "meta", {}).get("val") for t in (inp, a, b, node)]
            if any(not isinstance(v, torch.Tensor) for v in vals) or not _same_shape(vals[0], vals[3]):
                continue
            with graph.inserting_before(node):
                mm = graph.call_function(_aten.mm.default, (a, b))
                mm.meta.update(node.meta)
                mm.meta["val"] = _aten.mm.default(vals[1], vals[2])
                add = graph.call_function(_aten.add.Tensor, (inp, mm))
                add.meta.update(node.meta)
                add.meta["val"] = _aten.add.Tensor(vals[0], mm.meta["val"])
            node.replace_all_uses_with(add)
            graph.erase_node(node)
            self.rewritten += 1

    def uuid(self) -> Any:
        return get_hash_for_files((__file__,))


#: Whether :func:`graph_pass_options` includes :class:`UnfuseResidualAddmm`: on unless
#: ``ARVID_UNFUSE_ADDMM=0`` (read at import, as arvid.generator.fused's switches are).
UNFUSE_ADDMM = os.environ.get("ARVID_UNFUSE_ADDMM", "1") != "0"


def graph_pass_options(device: torch.device | str) -> dict[str, Any]:
    """``torch.compile`` options that install this module's passes (after inductor's own
    post-grad passes) for a step on ``device``: on CUDA only (the copy is cuBLAS's; on the CPU
    inductor's addmm stays as it is)."""
    if not UNFUSE_ADDMM or torch.device(device).type != "cuda":
        return {}
    return {"post_grad_custom_post_pass": UnfuseResidualAddmm()}
