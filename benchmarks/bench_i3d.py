"""I3D throughput for FVD: clips of 16 x 224 x 224 per second under each numeric mode.

    python benchmarks/bench_i3d.py                       # CUDA, batch 32, 20 timed iterations
    python benchmarks/bench_i3d.py --device cpu --batch 2 --iters 1   # smoke test

Modes: ``fp32`` (TF32 off: the reference), ``tf32``, ``tf32stem`` (TF32 through Mixed_3c, fp32
after: precision ``tf32-stem``), ``bf16``, and each with ``-cl`` (the
channels-last 3D memory format: ``fp32-cl``, ``tf32-cl``, ``bf16-cl``), all on the fused network
(batch norms folded into the convs, each Inception block's 1x1x1 convs on its input merged). On
the CPU the default is ``fp32,tf32`` (TF32 is a no-op there): PyTorch's CPU bf16 conv3d is far too
slow. Every mode's features are compared with fp32's on the same clips: ``max_rel_err`` is the
largest absolute difference divided by the largest absolute fp32 feature; the brief's bar is 1e-3.

``--clips-on host`` (default) times what FVD extraction of float clips costs: each batch is copied
from (pageable) host memory to the device inside the timed region (32 float32 clips of 16 x 224 x
224 are 308 MB). ``--clips-on device`` puts the clips on the device first, timing the network
alone (what a bare-model benchmark measures).

Prints a table and one JSON object (also written to ``--json`` if given) with the command, the
device and the date, so a number never travels without them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import platform
import sys
import time

import torch

from arvid.eval.i3d import I3D, I3DFeatures

MODES = {
    "fp32": ("fp32", False), "fp32-cl": ("fp32", True),
    "tf32": ("tf32", False), "tf32-cl": ("tf32", True),
    "tf32stem": ("tf32-stem", False), "tf32stem-cl": ("tf32-stem", True),
    "bf16": ("bf16", False), "bf16-cl": ("bf16", True),
}


def bench(model: I3D, clips: torch.Tensor, mode: str, batch: int, iters: int, warmup: int) -> tuple[float, torch.Tensor]:
    """Seconds per batch (median of ``iters``) and the features ``float64 [N, 400]`` of ``clips``."""
    precision, channels_last = MODES[mode]
    ext = I3DFeatures(model, precision=precision, channels_last=channels_last, batch_size=batch)
    device = next(model.parameters()).device
    feats = ext(clips)
    x = clips[:batch]
    for _ in range(warmup):
        ext(x)
    times = []
    for _ in range(iters):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        ext(x)  # ends with a device -> host copy, so the time includes the whole batch
        times.append(time.perf_counter() - t0)
    times.sort()
    return times[len(times) // 2], feats


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda")
    p.add_argument("--batch", type=int, default=32, help="clips per batch")
    p.add_argument("--iters", type=int, default=20, help="timed batches per mode")
    p.add_argument("--warmup", type=int, default=None, help="untimed batches per mode (default: 3 on CUDA, 0 on CPU)")
    p.add_argument("--frames", type=int, default=16)
    p.add_argument("--modes", default=None,
                   help=f"comma list of {', '.join(MODES)} (default: all on CUDA; fp32,tf32 on CPU, where "
                        "PyTorch's bf16 conv3d is a reference path ~200x slower than fp32)")
    p.add_argument("--clips-on", choices=("host", "device"), default="host",
                   help="where the clips live before each batch: host (timed with the copy to the device, "
                        "the default) or device (the network alone)")
    p.add_argument("--tol", type=float, default=1e-3, help="max relative feature error allowed vs fp32")
    p.add_argument("--json", default=None, help="also write the JSON result here")
    args = p.parse_args(argv)

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA is not available; use --device cpu for a smoke test", file=sys.stderr)
        return 2
    spec = args.modes or (",".join(MODES) if device.type == "cuda" else "fp32,tf32")
    modes = [m.strip() for m in spec.split(",") if m.strip()]
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        print(f"unknown modes {unknown}; known: {', '.join(MODES)}", file=sys.stderr)
        return 2
    if "fp32" not in modes:
        modes.insert(0, "fp32")
    warmup = args.warmup if args.warmup is not None else (3 if device.type == "cuda" else 0)

    g = torch.Generator().manual_seed(0)
    # smooth-ish random clips in [-1, 1] (pure noise would be an unnatural input)
    base = torch.rand(args.batch, 3, args.frames, 28, 28, generator=g) * 2 - 1
    clips = torch.nn.functional.interpolate(base, size=(args.frames, 224, 224), mode="trilinear")
    if args.clips_on == "device":
        clips = clips.to(device)

    rows, ref = [], None
    for mode in modes:
        model = I3D.pretrained().fuse_().to(device)  # fresh copy: a mode may cast it
        sec, feats = bench(model, clips, mode, args.batch, args.iters, warmup)
        if mode == "fp32":
            ref = feats
        assert ref is not None
        err = float((feats - ref).abs().max() / ref.abs().max())
        rows.append({"mode": mode, "clips_per_s": args.batch / sec, "ms_per_batch": 1e3 * sec,
                     "max_rel_err": err, "within_tol": err <= args.tol})
        del model

    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    result = {
        "benchmark": "i3d", "command": " ".join([sys.executable, *sys.argv]),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "device": name,
        "torch": torch.__version__, "batch": args.batch, "frames": args.frames, "iters": args.iters,
        "tol": args.tol, "clips_on": args.clips_on, "results": rows,
    }
    print(f"I3D {args.frames}x224x224, batch {args.batch}, clips on {args.clips_on}, {name}")
    print(f"{'mode':<8} {'clips/s':>10} {'ms/batch':>10} {'max rel err':>12}  ok")
    for r in rows:
        print(f"{r['mode']:<8} {r['clips_per_s']:>10.2f} {r['ms_per_batch']:>10.1f} {r['max_rel_err']:>12.2e}  "
              f"{'yes' if r['within_tol'] else 'NO'}")
    print(json.dumps(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
