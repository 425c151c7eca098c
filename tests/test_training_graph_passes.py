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
    _, base_code = _compiled_code(None)
    # without the pass inductor builds three addmm: the two residual sums and the bias
    assert base_code.count("extern_kernels.addmm") == 3
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
    monkeypatch.setattr(graph_passes, "UNFUSE_ADDMM", False)  # what ARVID_UNFUSE_ADDMM=0 sets at import
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


def _gpt_step_with_the_pass(device: str, dtype: torch.dtype):
    """A debug GPT's forward and backward, eager and compiled with the pass: (pass, the compiled
    code, [eager (loss, grads), compiled (loss, grads)])."""
    from arvid.generator import GPT, pack_sequences

    torch.manual_seed(0)
    m = GPT.from_preset("debug", vocab_size=41, max_seq_len=64, num_classes=5).to(device)
    torch.nn.init.normal_(m.head.weight, std=0.3)
    g = torch.Generator().manual_seed(0)
    seqs = [torch.randint(0, 41, (n,), generator=g) for n in (9, 5, 12)]
    batch = pack_sequences(seqs, 1, torch.tensor([0, 3, 1])).to(device)
    autocast = torch.autocast(device, dtype=dtype, enabled=dtype != torch.float32)
    from torch._inductor.utils import run_and_get_code

    p = UnfuseResidualAddmm()
    results = []

    def step(run):
        m.zero_grad(set_to_none=True)
        with autocast:
            loss = run(batch).float().square().mean()
        loss.backward()
        return loss.detach(), [q.grad.detach().clone() for q in m.parameters() if q.grad is not None]

    results.append(step(m))
    out, codes = run_and_get_code(step, torch.compile(m, options={"post_grad_custom_post_pass": p}))
    results.append(out)
    torch._dynamo.reset()
    return p, "\n".join(codes), results


def test_the_pass_splits_every_residual_addmm_of_the_gpt_and_keeps_its_gradients():
    """The debug GPT compiled with the pass on the CPU (where inductor also builds the residual
    addmm): no addmm is left in its compiled code, and the loss and gradients are eager's."""
    p, code, ((l0, g0), (l1, g1)) = _gpt_step_with_the_pass("cpu", torch.float32)
    # the GPT has no biases: every addmm inductor builds is a residual one (3 in this graph without
    # the pass, torch 2.13), and none is left
    assert p.rewritten >= 2 and "extern_kernels.mm(" in code and "extern_kernels.addmm(" not in code
    torch.testing.assert_close(l1, l0, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_the_pass_splits_the_gpts_residual_addmm_in_bf16():
    """On CUDA in bf16 autocast (the training step's setting): every residual addmm split, and the
    loss and gradients within bf16 rounding of eager's."""
    p, code, ((l0, g0), (l1, g1)) = _gpt_step_with_the_pass("cuda", torch.bfloat16)
    assert p.rewritten >= 2 and "extern_kernels.addmm(" not in code
    assert abs(l1.item() - l0.item()) <= 2e-2 * abs(l0.item())
    for a, b in zip(g1, g0):
        assert (a.float() - b.float()).abs().max().item() <= 3e-2 * b.float().abs().max().item() + 1e-6
