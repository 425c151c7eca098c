"""GPU seconds of a generation FVD: features of N generated clips plus cached real statistics.

    python benchmarks/bench_gfvd.py                           # CUDA, N = 10,000 (the ucf-gfvd-10k protocol)
    python benchmarks/bench_gfvd.py --device cpu --num 8 --batch 4   # smoke test

Generated clips already live on the GPU (a generator decodes them there), so the clips are drawn
on the device, 16 x 128 x 128 in [-1, 1], and go through :class:`arvid.eval.FrechetVideoDistance`
as ``arvid eval gen`` sends them: the protocol's resize to 224, the fused I3D in ``--precision``,
float64 sums, then the Frechet distance against real statistics given as features (as a cached
``.npz`` is). The I3D is randomly initialised unless ``--weights`` is given: the time does not
depend on the weights. Prints one JSON object (command, device, date), also to ``--json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time

import torch

from arvid.eval.fvd import FrechetVideoDistance
from arvid.eval.i3d import I3D, I3DFeatures
from arvid.eval.protocols import get_protocol


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--num", type=int, default=10_000, help="generated clips")
    p.add_argument("--batch", type=int, default=64, help="clips per I3D batch")
    p.add_argument("--protocol", default="ucf-gfvd-10k")
    p.add_argument("--precision", default="fp32", choices=["fp32", "tf32", "tf32-stem", "bf16"])
    p.add_argument("--weights", default=None, help="I3D weights (default: random init; the time is the same)")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    device = torch.device(a.device)
    proto = get_protocol(a.protocol)
    frames, size = proto.num_frames or 16, proto.resolution or 128
    net = (I3D.pretrained(a.weights) if a.weights else I3D()).fuse_().to(device)
    ext = I3DFeatures(net, proto.resize, proto.pre_resize, a.precision, batch_size=a.batch)
    fvd = FrechetVideoDistance(proto, extractor=ext).to(device)
    g = torch.Generator(device=device).manual_seed(0)
    fvd.update(torch.randn(max(a.num, 500), 400, generator=g, device=device, dtype=torch.float64), real=True)
    ext(torch.rand(min(a.batch, a.num), 3, frames, size, size, generator=g, device=device) * 2 - 1)  # warm-up
    _sync(device)
    t0 = time.perf_counter()
    for s in range(0, a.num, a.batch):
        n = min(a.batch, a.num - s)
        fvd.update(torch.rand(n, 3, frames, size, size, generator=g, device=device) * 2 - 1, real=False)
    _sync(device)
    t1 = time.perf_counter()
    value = float(fvd.compute())
    t2 = time.perf_counter()
    res = {"benchmark": "bench_gfvd", "command": " ".join(["python", *sys.argv]),
           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
           "torch": torch.__version__, "protocol": proto.name, "num": a.num, "batch": a.batch,
           "precision": a.precision, "features_s": round(t1 - t0, 2), "distance_s": round(t2 - t1, 3),
           "total_s": round(t2 - t0, 2), "clips_per_s": round(a.num / (t1 - t0), 1), "fvd": value}
    print(json.dumps(res), flush=True)
    if a.json:
        from arvid.io import atomic_write

        with atomic_write(a.json, "w") as f:
            f.write(json.dumps(res) + "\n")
    return res


if __name__ == "__main__":
    main()
