"""arvid.training.graph_passes: the residual addmm split back into mm + add under torch.compile
(inductor builds the addmm on the CPU too, so the pass runs here as on CUDA)."""

from __future__ import annotations

import pytest
import torch

from arvid.training import graph_passes
from arvid.training.graph_passes import UnfuseResidualAddmm, graph_pass_options


def _step(x, w1, w2, bias):
    h = x + x @ w1  # a residual sum that also feeds a reduction: inductor makes it addmm(x, x, w1)
    n = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
    return h + n @ w2, torch.addmm(bias, n, w2)  # the second: a broadcast bias, left fused


def _inputs():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(*shape, generator=g) for shape in ((64, 32), (32, 32), (32, 32), (32,))]


@pytest.fixture(autouse=True)
def _no_compile_cache():
    """A cached compilation skips the post-grad passes: compile afresh in every test."""
    from torch._functorch import config as functorch_config
    from torch._inductor import config as inductor_config

    with inductor_config.patch(fx_graph_cache=False), functorch_config.patch(enable_autograd_cache=False):
        yield


def _compiled_code(options):
    from torch._inductor.utils import run_and_get_code

    torch._dynamo.reset()
    fn = torch.compile(_step, options=options)
    out, codes = run_and_get_code(fn, *_inputs())
    return out, "\n".join(codes)


def test_the_pass_splits_the_residual_addmm_and_keeps_the_values():
    want = _step(*_inputs())
    base_out, base_code = _compiled_code(None)
    assert "addmm" in base_code  # inductor fuses the residual add into addmm on this torch
    p = UnfuseResidualAddmm()
    out, code = _compiled_code({"post_grad_custom_post_pass": p})
    assert p.rewritten == 2  # the two residual sums; the bias addmm ([32] broadcast) stays
    assert code.count("extern_kernels.addmm") == 1 and "extern_kernels.mm" in code
    for a, b in zip(out, want):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_the_pass_is_installed_on_cuda_only_and_can_be_turned_off(monkeypatch):
    assert graph_pass_options("cpu") == {}
    opts = graph_pass_options("cuda")
    assert isinstance(opts["post_grad_custom_post_pass"], UnfuseResidualAddmm)
    monkeypatch.setenv("ARVID_UNFUSE_ADDMM", "0")
    assert graph_pass_options("cuda") == {}
    monkeypatch.delenv("ARVID_UNFUSE_ADDMM")
    monkeypatch.setattr(graph_passes, "UNFUSE_ADDMM", False)
    assert graph_pass_options("cuda") == {}


@pytest.mark.parametrize("kw", [{"beta": 2.0}, {"alpha": 0.5}])
def test_the_pass_leaves_scaled_addmm_alone(kw):
    p = UnfuseResidualAddmm()
    g = torch.fx.Graph()
    x, a, b = (g.placeholder(n) for n in "xab")
    for node, shape in ((x, (4, 3)), (a, (4, 5)), (b, (5, 3))):
        node.meta["val"] = torch.empty(shape, device="meta")
    y = g.call_function(torch.ops.aten.addmm.default, (x, a, b), kw)
    y.meta["val"] = torch.empty(4, 3, device="meta")
    g.output(y)
    p(g)
    assert p.rewritten == 0 and any(n.target is torch.ops.aten.addmm.default for n in g.nodes)
