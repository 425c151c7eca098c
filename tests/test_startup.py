"""Start-up cost of the `arvid` CLI: what ``--help`` and ``pipeline --dry-run`` import.

Every command (and every ``pipeline --jobs N`` stage child) builds the whole parser, so every
stage module is imported. Heavy libraries (torch._dynamo ~1.4 s, torchmetrics ~1.4 s with its
scipy.signal and matplotlib) must be imported inside the functions that use them, not at the
top of a module the parser reaches. Fresh subprocesses: the test process has them all loaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch._dynamo", "torchmetrics", "scipy.signal", "matplotlib", "accelerate")


def _run(code: str, timeout: float = 240) -> str:
    p = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


@pytest.mark.parametrize("code", [
    "import arvid.generator.gpt",
    "import arvid.pipeline",
    "from arvid.cli import build_parser; build_parser()",
    "from arvid.cli import main; main(['pipeline', 'configs/experiments/demo.yaml', '--dry-run'])",
])
def test_cli_paths_do_not_import_heavy_libraries(code):
    out = _run(f"import contextlib, io, json, sys\nwith contextlib.redirect_stdout(io.StringIO()):\n    {code}\n"
               f"print(json.dumps([m for m in {HEAVY!r} if m in sys.modules]))")
    loaded = json.loads(out.splitlines()[-1])
    assert not loaded, f"`{code}` imports {loaded}: import them inside the function that needs them"


def test_eval_exports_resolve_lazily():
    import arvid.eval as E

    for name in E.__all__:
        assert getattr(E, name) is getattr(sys.modules[f"arvid.eval.{E._MODULE_OF[name]}"], name)
    assert set(E.__all__) <= set(dir(E))
    with pytest.raises(AttributeError):
        E.no_such_name  # noqa: B018


# The first GPT forward of the process inside torch.compile: GPT._backend resolves the attention
# backend outside dynamo's trace (torch._dynamo is not imported before the compile), and the
# compiled logits and gradients equal eager ones.
_FIRST_FORWARD_COMPILED = """
import json, sys
import torch
import arvid.generator.gpt as G
from arvid.generator import GPT, pack_sequences

traced = []
resolve = G.resolve_backend
G.resolve_backend = lambda *a: traced.append(torch.compiler.is_compiling()) or resolve(*a)
assert "torch._dynamo" not in sys.modules
torch.manual_seed(0)
m = GPT.from_preset("debug", vocab_size=41, max_seq_len=64, num_classes=5)
torch.nn.init.normal_(m.head.weight, std=0.3)
g = torch.Generator().manual_seed(1)
batch = pack_sequences([torch.randint(0, 41, (n,), generator=g) for n in (9, 1, 14)], 1, torch.tensor([0, 3, 5]))
compiled = torch.compile(m, backend="eager")(batch)
compiled.square().mean().backward()
grads = [p.grad.clone() for p in m.parameters()]
m.zero_grad()
eager = m(batch)
eager.square().mean().backward()
same = torch.equal(compiled, eager) and all(torch.allclose(a, p.grad) for a, p in zip(grads, m.parameters()))
print(json.dumps({"traced": traced, "same": same, "cache": list(m._backend_cache.values())}))
"""


def test_first_gpt_forward_inside_torch_compile():
    out = json.loads(_run(_FIRST_FORWARD_COMPILED).splitlines()[-1])
    assert out["traced"] == [False], "the backend must be resolved once, outside torch.compile's trace"
    assert out["cache"] == ["sdpa"]
    assert out["same"]
