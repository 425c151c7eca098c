"""GPT training throughput (tokens/s) and MFU for presets B, L, XL on packed batches.

    python benchmarks/bench_generator.py                        # CUDA: B, L, XL; router vs fixed lengths
    python benchmarks/bench_generator.py --presets B --no-compile
    python benchmarks/bench_generator.py --tiny --device cpu    # CPU smoke run (debug preset)
    python benchmarks/bench_generator.py --presets L --lengths router --profile   # where the step's time goes

Each step: forward on a packed batch of ``--max-tokens`` positions (router-like lengths, mean
~764 tokens, first-fit-decreasing into the budget, or every sequence 1028 = 4 + 4*256 tokens),
next-token cross-entropy, backward, fused AdamW; bf16 autocast; the forward+loss under
torch.compile (batches padded to the budget for static shapes; ``max_seqlen`` is the
format's bound so varying lengths do not recompile). tokens/s counts real sequence positions
(padding excluded); MFU = (6 * matmul params * tokens + causal attention FLOPs) / time / peak.
Prints a table and a JSON line (``--json PATH`` also writes it).

``--profile``: after the timed steps, ``--profile-steps`` more under torch.profiler; the kernels'
(on CPU: the operators') own time is split into matmul, attention, fused elementwise (Triton),
optimizer and other, with the top kernels, in the row's ``profile`` and printed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import platform
import re
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from arvid.data.types import BlockLayout  # noqa: E402
from arvid.generator.attention import AttentionBackendUnavailable, resolve_training_backend  # noqa: E402
from arvid.generator.gpt import GPT, GPTConfig  # noqa: E402
from arvid.generator.packing import IGNORE, TokenBudgetBatchSampler, pack_sequences, router_like_lengths  # noqa: E402
from arvid.generator.sequence import SequenceFormat  # noqa: E402
from arvid.training.graph_passes import UnfuseResidualAddmm, graph_pass_options  # noqa: E402
from arvid.training.profiling import measure_matmul_peak  # noqa: E402

#: GPTConfig fields every row sets itself (the format's vocabulary and length, 101 classes, the
#: backend and residual flags): not overridable with --gpt
BENCH_SETS = {"vocab_size", "max_seq_len", "num_classes", "attn_backend", "residual_dtype"}


def make_batches(kind: str, fmt: SequenceFormat, max_tokens: int, count: int, num_classes: int,
                 gen: torch.Generator, device: torch.device) -> list:
    """``count`` packed batches of at most ``max_tokens`` positions (padded to it), on ``device``."""
    layout = fmt.layout
    per = max(4, 2 * max_tokens // 700)  # enough sequences that first-fit-decreasing can fill the budget
    if kind == "fixed":
        L = layout.num_blocks + 256 * layout.num_blocks if 256 in layout.candidates else fmt.max_length
        lens = torch.full((count * max(1, max_tokens // L),), L)
    else:
        lens = router_like_lengths(count * per, layout, gen)
    sampler = TokenBudgetBatchSampler(lens, max_tokens, shuffle=True, seed=int(gen.initial_seed()) % 1000)
    plan = sorted(sampler.plan(0), key=lambda b: -sum(int(lens[i]) for i in b))[:count]  # the fullest bins
    batches = []
    for b in plan:
        seqs = [torch.randint(0, fmt.vocab_size, (int(lens[i]),), generator=gen) for i in b]
        cls = torch.randint(0, num_classes, (len(b),), generator=gen)
        # padded to the budget with a fixed max_seqlen bound: no recompile per batch
        pb = pack_sequences(seqs, 1, cls, pad_to=max_tokens, max_seqlen=fmt.max_length)
        batches.append(pb.to(device))
    return batches


# Kernel (or CPU operator) names -> the part of the step they belong to; first match wins.
CATEGORIES = (
    ("attention", re.compile(r"flash|fmha|attention|attn|varlen|cudnn.*sdpa", re.I)),
    ("optimizer", re.compile(r"multi_tensor|adam|foreach", re.I)),
    ("loss", re.compile(r"log_softmax|nll_loss|cross_entropy", re.I)),
    ("matmul", re.compile(r"gemm|cutlass|xmma|nvjet|cublas|matmul|aten::mm$|aten::addmm|aten::bmm|"
                          r"aten::linear|sm90_|sm80_", re.I)),
    ("fused elementwise", re.compile(r"triton", re.I)),
)


def categorize(name: str) -> str:
    for cat, pat in CATEGORIES:
        if pat.search(name):
            return cat
    return "other"


def profile_steps(step, batches: list, device: torch.device, top: int = 40) -> dict:
    """Run ``step`` on ``batches`` under torch.profiler; the own time of every kernel (CUDA) or
    operator (CPU), by category (shares of the total) and the ``top`` largest."""
    from torch.profiler import ProfilerActivity, profile

    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for b in batches:
            step(b)
        if device.type == "cuda":
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        if device.type == "cuda":
            t = e.self_device_time_total if e.device_type == torch.autograd.DeviceType.CUDA else 0.0
        else:  # operators' own CPU time; python and profiler bookkeeping events are left out
            t = e.self_cpu_time_total if e.key.startswith("aten::") or "Triton" in e.key else 0.0
        if t > 0:
            rows.append((e.key, float(t), int(e.count)))
    total = sum(t for _, t, _ in rows) or 1.0
    shares: dict[str, float] = {}
    for name, t, _ in rows:
        cat = categorize(name)
        shares[cat] = shares.get(cat, 0.0) + t / total
    rows.sort(key=lambda r: -r[1])
    callers = launched_by(prof, {n for n, _, _ in rows[:top]}, device)
    return {"steps": len(batches), "total_ms_per_step": total / 1e3 / max(1, len(batches)),
            "shares": dict(sorted(shares.items(), key=lambda kv: -kv[1])),
            "top": [{"name": n[:120], "category": categorize(n), "share": t / total, "calls": c,
                     "launched_by": callers.get(n, "")} for n, t, c in rows[:top]]}


def launched_by(prof, names: set[str], device: torch.device, depth: int = 4) -> dict[str, str]:
    """For each kernel (CUDA) or operator (CPU) in ``names``: the host call chain that most often
    launched it, innermost first (``cudaMemcpyAsync < aten::copy_ < aten::clone < ...``, ``depth``
    frames), with its share of the calls when others launched it too. Says where an unexplained
    kernel (a device copy, a cast) comes from."""
    from collections import Counter

    counts: dict[str, Counter] = {}
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CPU:
            continue
        launched = [k.name for k in evt.kernels] if device.type == "cuda" else [evt.key]
        for name in launched:
            if name not in names:
                continue
            chain, parent = [], evt if device.type == "cuda" else evt.cpu_parent
            while parent is not None and len(chain) < depth:
                chain.append(parent.name)
                parent = parent.cpu_parent
            counts.setdefault(name, Counter())[" < ".join(chain) or "(top level)"] += 1
    out = {}
    for name, c in counts.items():
        chain, n = c.most_common(1)[0]
        total = sum(c.values())
        out[name] = chain if n == total else f"{chain} ({n}/{total} calls)"
    return out


def batch_flops(model: GPT, batches: list) -> dict:
    """Real tokens (padding left out), mean length, and training FLOPs of ``batches`` under arvid's
    causal count and nanoGPT's full-square one (:meth:`GPT.training_flops`); on the host."""
    tokens, seqs, causal, full = 0, 0, 0.0, 0.0
    for b in batches:
        lens = b.seqlens().cpu()
        tokens, seqs = tokens + int(lens.sum()), seqs + b.num_seqs
        causal += model.training_flops(lens)
        full += model.training_flops(lens, full_attention=True)
    return {"tokens": tokens, "mean_len": tokens / max(1, seqs), "flops_causal": causal, "flops_full_attn": full}


def count_flops(preset: str, kind: str, args, fmt: SequenceFormat) -> dict:
    """``--flops-only``: :func:`batch_flops` of the batches :func:`bench` would time (the same draw:
    the batches depend only on the arguments), without running the model (built on the meta
    device; no GPU needed)."""
    with torch.device("meta"):
        model = GPT.from_preset(preset, vocab_size=fmt.vocab_size, max_seq_len=1 + fmt.max_length + 1, num_classes=101,
                                **args.gpt_overrides)
    gen = torch.Generator().manual_seed(1)
    batches = make_batches(kind, fmt, args.max_tokens, args.steps + args.warmup, 101, gen, torch.device("cpu"))
    c = batch_flops(model, batches[args.warmup:])
    return {"preset": preset, "lengths": kind, "steps": len(batches) - args.warmup, **c,
            "attention_share_causal": c["flops_full_attn"] / c["flops_causal"] - 1.0,
            "full_over_causal": c["flops_full_attn"] / c["flops_causal"]}


def bench(preset: str, kind: str, args, device: torch.device, fmt: SequenceFormat) -> dict:
    torch.manual_seed(0)
    gen = torch.Generator().manual_seed(1)
    overrides = dict(vocab_size=fmt.vocab_size, max_seq_len=1 + fmt.max_length + 1, num_classes=101,
                     attn_backend=args.backend, residual_dtype=args.residual_dtype, **args.gpt_overrides)
    model = GPT.from_preset(preset, **overrides).to(device)
    n_params = model.num_params()
    compiled_opt = args.optimizer == "compiled"
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, betas=(0.9, 0.95),
                            fused=(device.type == "cuda" and not compiled_opt) or None,
                            foreach=True if compiled_opt else None)
    # compiled: inductor's kernels over the foreach AdamW (one fused pass per group of parameters)
    opt_step = torch.compile(opt.step) if compiled_opt else opt.step
    batches = make_batches(kind, fmt, args.max_tokens, args.steps + args.warmup, 101, gen, device)
    n_prof = args.profile_steps if args.profile else 0
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")

    def loss_fn(batch):
        return F.cross_entropy(model(batch).float(), batch.targets, ignore_index=IGNORE)

    step_loss = torch.compile(loss_fn, mode=args.compile_mode) if args.compile else loss_fn
    row = {"preset": preset, "lengths": kind, "params_M": n_params / 1e6, "backend": None,
           "residual_dtype": args.residual_dtype, "gpt_overrides": args.gpt_overrides}
    # a backend that cannot train here (fa4 on Hopper) fails now with its reason, not after compiling
    resolve_training_backend(args.backend, device, args.dtype)
    with autocast:
        row["backend"] = model._backend(device, args.dtype)
    t_compile = time.perf_counter()

    def step(batch):
        with autocast:
            loss = step_loss(batch)
        loss.backward()
        opt_step()
        opt.zero_grad(set_to_none=True)
        return loss

    for b in batches[:args.warmup]:
        step(b)
    # every timed batch's shapes once, without an optimizer step: backends that build something
    # per new shape (cudnn_fe's cuDNN graphs, per bucket of the sequence count) do it here
    for b in batches[args.warmup:]:
        with autocast:
            step_loss(b).backward()
        opt.zero_grad(set_to_none=True)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    row["warmup_s"] = time.perf_counter() - t_compile
    timed = batches[args.warmup:]
    # counted before the clock starts: reading the lengths off the device inside the timed loop
    # made the host wait for every step (a sync per step, until 2026-12-07)
    counts = batch_flops(model, timed)
    tokens, flops, flops_full_attn = counts["tokens"], counts["flops_causal"], counts["flops_full_attn"]
    t0 = time.perf_counter()
    for b in timed:
        loss = step(b)
    if device.type == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    row.update(
        loss=float(loss.detach()), steps=len(batches) - args.warmup, step_ms=dt / max(1, len(batches) - args.warmup) * 1e3,
        tokens_per_s=tokens / dt, tflops=flops / dt / 1e12, mfu=flops / dt / (args.peak_tflops * 1e12),
        mfu_measured_peak=flops / dt / (args.measured_peak * 1e12) if args.measured_peak else None,
        mfu_measured_peak_full_attn=(flops_full_attn / dt / (args.measured_peak * 1e12) if args.measured_peak
                                     else None),
        fill=tokens / (args.max_tokens * max(1, len(batches) - args.warmup)), mean_len=counts["mean_len"],
        peak_mem_gb=torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
    )
    if row["backend"] == "cudnn_fe":  # the execution plans cuDNN offered and the ones kept (autotune)
        from arvid.generator import cudnn_fe

        row["cudnn_fe_plans"] = [{"kind": t["kind"], "plans": len(t["plans"]), "chosen": t["plans"][t["chosen"]],
                                  "first": t["plans"][0],
                                  "ms": [None if x is None else round(x, 4) for x in t["ms"]]} for t in cudnn_fe.TUNED]
        row["cudnn_fe_autotune"] = cudnn_fe.AUTOTUNE
        cudnn_fe.TUNED.clear()
    if n_prof:
        row["profile"] = profile_steps(step, timed[:n_prof], device)
    return row


def inductor_options(items: list[str], error) -> dict:
    """``KEY=VALUE`` strings -> ``{key: value}`` for ``torch._inductor.config``, checked and typed as
    the Trainer's ``compile_options`` are (:func:`arvid.training.inductor.check_inductor_options`)."""
    from arvid.config import ConfigError
    from arvid.training.inductor import check_inductor_options

    raw = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            error(f"--inductor {item!r}: expected KEY=VALUE, e.g. max_pointwise_cat_inputs=2")
        raw[key] = text
    try:
        return check_inductor_options(raw, "--inductor")
    except ConfigError as exc:
        error(str(exc))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--presets", default="B,L,XL")
    p.add_argument("--lengths", default="router,fixed", help="comma list of router|fixed")
    p.add_argument("--max-tokens", type=int, default=16448, help="packed positions per batch (16 x 1028)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=4)
    p.add_argument("--precision", choices=("bf16", "fp32"), default="bf16")
    p.add_argument("--backend", default="auto")
    p.add_argument("--residual-dtype", default="float32", choices=("float32", "compute"),
                   help="GPTConfig.residual_dtype: compute keeps the residual stream in bf16")
    p.add_argument("--flash-impl", default="", help="FA4 or FA3: torch's flash kernels for torch_varlen "
                                                    "(arvid.generator.attention.activate_flash_impl)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument("--compile-mode", default="default",
                   help="torch.compile mode of the step (max-autotune-no-cudagraphs: Triton matmul templates "
                        "with the norms/activations fused in, chosen against cuBLAS by timing)")
    p.add_argument("--cudnn-autotune", action=argparse.BooleanOptionalAction, default=None,
                   help="cudnn_fe: time cuDNN's execution plans per graph and keep the fastest (default: "
                        "arvid.generator.cudnn_fe.AUTOTUNE, off unless ARVID_CUDNN_FE_AUTOTUNE=1)")
    p.add_argument("--optimizer", choices=("fused", "compiled"), default="fused",
                   help="AdamW's step: fused (torch's fused CUDA kernel) or compiled (torch.compile over the "
                        "foreach implementation)")
    p.add_argument("--gpt", action="append", default=[], metavar="KEY=INT",
                   help="override a GPTConfig field of the preset (repeatable), e.g. --gpt n_heads=8: the same "
                        "parameters with heads of 128; rows then differ from the preset's (recorded as gpt_overrides)")
    p.add_argument("--fused", choices=("default", "all", "off", "rope", "swiglu"), default="default",
                   help="arvid.generator.fused's kernels in the step: RoPE inside the cudnn_fe ops and the SwiGLU op "
                        "(both on by default); 'default' = the library's settings, "
                        "'off' = the plain torch code inductor compiles")
    p.add_argument("--dv-in-place", action="store_true",
                   help="cudnn_fe's RoPE route: cuDNN writes dv into d[qkv]'s v columns itself "
                        "(arvid.generator.cudnn_fe.DV_IN_PLACE, off by default until it passes the GPU test)")
    p.add_argument("--addmm", choices=("default", "fused", "unfused"), default="default",
                   help="residual additions after a matmul: 'fused' = inductor's addmm (cuBLAS copies the residual "
                        "into its output first), 'unfused' = mm, with the add in the next generated kernel "
                        "(arvid.training.graph_passes.UnfuseResidualAddmm); 'default' = what the Trainer does")
    p.add_argument("--inductor-tuning", action="store_true",
                   help="torch._inductor.config.coordinate_descent_tuning: tune the block sizes of the generated "
                        "elementwise and reduction kernels by timing (longer compile)")
    p.add_argument("--inductor", action="append", default=[], metavar="KEY=VALUE",
                   help="set a torch._inductor.config option for the compiled step (repeatable; the value is read "
                        "as the option's type), e.g. --inductor max_pointwise_cat_inputs=2: concatenations of more "
                        "inputs are written by their producers into slices instead of one kernel of masked loads")
    p.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM bf16 dense")
    p.add_argument("--measure-peak", action="store_true",
                   help="time a matmul in --precision first (8192^3 on CUDA); rows also give mfu_measured_peak against it (the "
                        "issue's MFU: against the measured matmul ceiling; 790-803 TFLOP/s on the lent H100)")
    p.add_argument("--tiny", action="store_true", help="debug preset, small batches, no compile (CPU smoke)")
    p.add_argument("--json", help="also write the results here")
    p.add_argument("--flops-only", action="store_true",
                   help="only count the FLOPs of the batches a run with these arguments times (causal and "
                        "nanoGPT's full-square attention), without running the model")
    p.add_argument("--profile", action="store_true", help="profile a few more steps: time by kernel category")
    p.add_argument("--profile-steps", type=int, default=3, help="steps under the profiler (with --profile)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    args.gpt_overrides = {}
    fields = {f.name for f in dataclasses.fields(GPTConfig)} - BENCH_SETS
    for item in args.gpt:
        m = re.fullmatch(r"(\w+)=(-?\d+)", item)
        if m is None:
            p.error(f"--gpt {item!r}: expected KEY=INT, e.g. n_heads=8")
        if m[1] not in fields:
            p.error(f"--gpt {item!r}: {m[1]!r} is not a GPTConfig field this benchmark lets you set "
                    f"(it sets {', '.join(sorted(BENCH_SETS))} itself); expected one of {', '.join(sorted(fields))}")
        args.gpt_overrides[m[1]] = int(m[2])
    args.inductor_options = inductor_options(args.inductor, p.error)
    if args.inductor_tuning:  # shorthand for --inductor coordinate_descent_tuning=true
        args.inductor_options["coordinate_descent_tuning"] = True
    layout = BlockLayout()
    if args.tiny:
        args.presets, args.max_tokens, args.steps, args.warmup, args.compile = "debug", 600, 2, 1, False
        layout = BlockLayout((4, 4), (16, 32, 64, 128, 256))
        if device.type == "cpu":
            args.precision = "fp32"
            args.backend = "sdpa" if args.backend == "auto" else args.backend
    fmt = SequenceFormat(8192, layout)
    if args.flash_impl:
        from arvid.generator.attention import activate_flash_impl

        activate_flash_impl(args.flash_impl)  # raises, saying what to install, when it cannot
    args.dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    from arvid.generator import cudnn_fe

    if args.cudnn_autotune is not None:
        cudnn_fe.AUTOTUNE = args.cudnn_autotune
    if args.dv_in_place:
        cudnn_fe.DV_IN_PLACE = True
    from arvid.generator import fused

    if args.addmm == "default":  # what the Trainer would do on this device
        args.addmm = "unfused" if graph_pass_options(device) else "fused"
    if args.fused != "default":
        fused.ROPE, fused.SWIGLU = args.fused in ("all", "rope"), args.fused in ("all", "swiglu")
    # arvid's graph passes as the Trainer installs them (--addmm unfused), then the --inductor options:
    # set in inductor's config (torch.compile takes options or a mode, not both)
    if args.compile:  # set (or cleared) in every run: the config outlives one main() in a process
        import torch._inductor.config as inductor_config

        passes = {"post_grad_custom_post_pass": UnfuseResidualAddmm() if args.addmm == "unfused" else None}
        for key, value in {**passes, **args.inductor_options}.items():
            setattr(inductor_config, key, value)
    else:
        args.addmm = "eager"  # no compiled step: nothing to fuse or split
    if args.flops_only:
        rows = [count_flops(preset, kind, args, fmt) for preset in args.presets.split(",")
                for kind in args.lengths.split(",")]
        for r in rows:
            print(f"{r['preset']:6s} {r['lengths']:7s} mean L {r['mean_len']:7.1f}  attention {r['attention_share_causal']:.1%} "
                  f"of the causal FLOPs; nanoGPT count / causal {r['full_over_causal']:.4f}")
        result = {"bench": "generator_flops", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
                  "max_tokens": args.max_tokens, "rows": rows}
        print(json.dumps(result))
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1))
        return result
    args.measured_peak = measure_matmul_peak(device, args.dtype) if args.measure_peak else None
    if args.measured_peak:
        print(f"# measured {args.precision} matmul peak: {args.measured_peak:.1f} TFLOP/s", flush=True)
    rows = []
    for preset in args.presets.split(","):
        for kind in args.lengths.split(","):
            try:
                rows.append(bench(preset, kind, args, device, fmt))
            except torch.cuda.OutOfMemoryError as e:
                rows.append({"preset": preset, "lengths": kind, "error": f"OOM: {str(e).splitlines()[0][:120]}"})
            except AttentionBackendUnavailable as e:  # the backend cannot train here: say why, go on
                rows.append({"preset": preset, "lengths": kind, "error": str(e)})
            print("row", json.dumps(rows[-1]), flush=True)  # partial results survive a timeout
            if device.type == "cuda":
                torch.cuda.empty_cache()
            torch._dynamo.reset() if args.compile else None
    result = {
        "bench": "generator", "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:])),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "torch": torch.__version__, "precision": args.precision, "compile": args.compile, "compile_mode": args.compile_mode,
        "inductor_tuning": args.inductor_tuning, "inductor_options": args.inductor_options, "optimizer": args.optimizer,
        "fused": {"rope": fused.ROPE, "swiglu": fused.SWIGLU},
        "addmm": args.addmm, "dv_in_place": cudnn_fe.DV_IN_PLACE,
        "flash_impl": args.flash_impl or "torch default",
        "max_tokens": args.max_tokens, "peak_tflops": args.peak_tflops,
        "measured_peak_tflops": args.measured_peak, "rows": rows,
    }
    print(f"# {result['device']}, torch {result['torch']}, {args.precision}, compile={args.compile}, "
          f"{args.max_tokens} positions per batch, peak {args.peak_tflops} TFLOP/s (MFU*: against the measured "
          f"matmul peak, with --measure-peak)")
    print(f"{'preset':6s} {'lengths':7s} {'params':>8s} {'backend':>12s} {'mean L':>7s} {'fill':>5s} {'step ms':>8s} "
          f"{'tokens/s':>10s} {'TFLOP/s':>8s} {'MFU':>6s} {'MFU*':>6s} {'mem GB':>7s}")
    for r in rows:
        if "error" in r:
            print(f"{r['preset']:6s} {r['lengths']:7s} {r['error']}")
            continue
        mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "-"
        mfu2 = f"{r['mfu_measured_peak']:6.1%}" if r.get("mfu_measured_peak") is not None else "     -"
        print(f"{r['preset']:6s} {r['lengths']:7s} {r['params_M']:7.1f}M {r['backend']:>12s} {r['mean_len']:7.0f} "
              f"{r['fill']:5.2f} {r['step_ms']:8.1f} {r['tokens_per_s']:10.0f} {r['tflops']:8.1f} {r['mfu']:6.1%} {mfu2} {mem:>7s}")
    for r in rows:
        if "profile" in r:
            pr = r["profile"]
            print(f"# profile {r['preset']} {r['lengths']}: {pr['total_ms_per_step']:.1f} ms of "
                  f"{'kernel' if device.type == 'cuda' else 'operator'} time per step; "
                  + ", ".join(f"{k} {v:.1%}" for k, v in pr["shares"].items()))
            for t in pr["top"][:30]:
                print(f"#   {t['share']:6.1%} {t['calls']:6d}x {t['category']:18s} {t['name']}")
                if t["category"] == "other" and t["launched_by"]:  # where the unexplained ones come from
                    print(f"#   {'':6s} {'':7s} {'':18s}   from {t['launched_by'][:160]}")
    print(json.dumps(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
