"""`arvid pipeline configs/experiments/NAME.yaml`: the stage graph of design.md, end to end.

    proxy -> curate -> router -> final -> tokenize -> generator -> sample -> report
                  \\-> curve (quality-cost curve; after router)

An experiment YAML holds one section per stage (each the stage's own config class) plus
what they share (``data``, ``tokenizer``). The pipeline fills in what connects them: each
stage's ``out_dir`` (``<out_dir>/<stage>``), the upstream directories it reads, the shared
data and tokenizer spec. Whatever a section sets for those fields is overwritten, so one YAML
cannot wire stages inconsistently.

Completion, resume and refusal to mix outputs are the engine's (arvid/pipeline_engine.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from arvid.config import doc, load_config, nested, save_config
from arvid.data.datasets import DataConfig
from arvid.pipeline_engine import Pipeline, PipelineError, Stage, format_plan, format_summary
from arvid.stages import curate as curate_stage
from arvid.stages import eval_curve as curve_stage
from arvid.stages import report as report_stage
from arvid.stages import sample as sample_stage
from arvid.stages import tokenize as tokenize_stage
from arvid.stages import train_generator as generator_stage
from arvid.stages import train_router as router_stage
from arvid.stages import train_tokenizer as tokenizer_stage

log = logging.getLogger("arvid.pipeline")

STAGES = ("proxy", "curate", "router", "curve", "final", "tokenize", "generator", "sample",
          "fixed", "fixed_tokenize", "fixed_generator", "report")
# The fixed-length baseline branch (a tokenizer, token store and GPT with one uniform assignment)
# runs only when listed in `stages`: it doubles the tokenizer and generator cost.
DEFAULT_STAGES = tuple(s for s in STAGES if not s.startswith("fixed"))


@dataclass
class ExperimentConfig:
    """One experiment: every stage's config, and what they share."""

    name: str = doc("experiment", "experiment name (used in reports)")
    out_dir: str = doc("outputs/experiment", "root of all stage directories")
    stages: list[str] = doc(list(DEFAULT_STAGES), "stages to run, a subset of the graph in graph order; add "
                            "fixed, fixed_tokenize, fixed_generator for the fixed-length baseline's gFVD")
    fixed_count: int | None = doc(None, "per-block count of the fixed-length baseline (null: the second-largest "
                                  "candidate, as the report's baseline)")
    data: DataConfig = nested(DataConfig, "the videos every stage uses (copied into each stage)")
    tokenizer: tokenizer_stage.TokenizerSpec = nested(
        tokenizer_stage.TokenizerSpec, "tokenizer architecture of both the proxy and the final tokenizer")
    proxy: tokenizer_stage.TrainTokenizerConfig = nested(
        tokenizer_stage.TrainTokenizerConfig, "stage 1: proxy tokenizer training (random assignments)")
    curate: curate_stage.CurateConfig = nested(curate_stage.CurateConfig, "stage 2: proxy rewards -> labels")
    router: router_stage.TrainRouterConfig = nested(router_stage.TrainRouterConfig, "stage 3: router training")
    curve: curve_stage.EvalCurveConfig = nested(curve_stage.EvalCurveConfig, "quality-cost curve of the proxy")
    final: tokenizer_stage.TrainTokenizerConfig = nested(
        tokenizer_stage.TrainTokenizerConfig, "stage 4: final tokenizer (router-chosen assignments)")
    tokenize: tokenize_stage.TokenizeConfig = nested(tokenize_stage.TokenizeConfig, "dataset -> token store")
    generator: generator_stage.TrainGeneratorConfig = field(
        default_factory=generator_stage.TrainGeneratorConfig, metadata={"help": "GPT training on the token store"})
    sample: sample_stage.SampleConfig = nested(sample_stage.SampleConfig, "class-conditional samples")
    report: report_stage.ReportConfig = nested(report_stage.ReportConfig, "metrics.json and report.md")

    def __post_init__(self) -> None:
        if not str(self.out_dir).strip():
            raise ValueError("out_dir is empty: give the folder that holds the stage directories")
        if not self.stages:
            raise ValueError(f"stages is empty: list at least one of {list(STAGES)} (or leave it out for "
                             f"the default {list(DEFAULT_STAGES)})")
        unknown = [s for s in self.stages if s not in STAGES]
        if unknown:
            raise ValueError(f"unknown stages {unknown}; the graph is {list(STAGES)}")
        order = [STAGES.index(s) for s in self.stages]
        if order != sorted(order):
            raise ValueError(f"stages must be listed in graph order {list(STAGES)}, got {self.stages}")


def _r(cfg: Any, **changes: Any) -> Any:
    return dataclasses.replace(cfg, **changes)


def build_pipeline(exp: ExperimentConfig) -> Pipeline:
    """Resolve every stage's config (paths, shared sections) and return the engine's pipeline."""
    root = Path(exp.out_dir)
    d = {s: root / s for s in STAGES}
    proxy_tok = str(d["proxy"] / "tokenizer")
    final_tok = str(d["final"] / "tokenizer")
    router_dir = str(d["router"] / "router")
    configs: dict[str, Any] = {
        "proxy": _r(exp.proxy, data=exp.data, tokenizer=exp.tokenizer, stage="proxy", out_dir=str(d["proxy"])),
        "curate": _r(exp.curate, data=_r(exp.data, random_start=False, flip=False), tokenizer=proxy_tok,
                     out_dir=str(d["curate"])),
        "router": _r(exp.router, data=_r(exp.data, random_start=False, flip=False), curation=str(d["curate"]),
                     out_dir=str(d["router"])),
        # The max-proxy-reward points need curation records of the curve's videos: the curve runs
        # on the curated split.
        "curve": _r(exp.curve, data=_r(exp.data, random_start=False, flip=False), split=exp.curate.split,
                    tokenizer=proxy_tok, curation=str(d["curate"]), router=router_dir, out_dir=str(d["curve"])),
        "final": _r(exp.final, data=exp.data, tokenizer=exp.tokenizer, stage="final", router=router_dir,
                    out_dir=str(d["final"])),
        "tokenize": _r(exp.tokenize, data=_r(exp.data, random_start=False, flip=False), tokenizer=final_tok,
                       router=router_dir, out_dir=str(d["tokenize"])),
        "generator": _r(exp.generator, token_store=str(d["tokenize"] / "tokens"), tokenizer=final_tok,
                        out_dir=str(d["generator"])),
        "sample": _r(exp.sample, generator=str(d["generator"] / "gpt"), tokenizer=final_tok, out=str(d["sample"])),
        "report": _r(exp.report, name=exp.name, data=_r(exp.data, random_start=False, flip=False),
                     experiment_dir=str(root), out_dir=str(d["report"])),
    }
    if any(s.startswith("fixed") for s in exp.stages):
        # the fixed branch: the final tokenizer's training budget, one uniform assignment for every clip
        from arvid.tokenizer.base import tokenizer_config

        layout = tokenizer_config(exp.tokenizer.name, exp.tokenizer.params, preset=exp.tokenizer.preset).layout
        count = exp.fixed_count or report_stage.fixed_baseline_count(layout)
        if count not in layout.candidates:
            raise ValueError(f"fixed_count={count} is not a candidate count {layout.candidates}")
        uniform = [count] * layout.num_blocks
        fixed_tok = str(d["fixed"] / "tokenizer")
        configs.update({
            "fixed": _r(exp.final, data=exp.data, tokenizer=exp.tokenizer, stage="fixed", router=None,
                        assignments=None, fixed_assignment=uniform, out_dir=str(d["fixed"])),
            "fixed_tokenize": _r(exp.tokenize, data=_r(exp.data, random_start=False, flip=False), tokenizer=fixed_tok,
                                 router=None, assignments=None, fixed_assignment=uniform,
                                 out_dir=str(d["fixed_tokenize"])),
            "fixed_generator": _r(exp.generator, token_store=str(d["fixed_tokenize"] / "tokens"), tokenizer=fixed_tok,
                                  out_dir=str(d["fixed_generator"])),
        })
        configs["report"] = _r(configs["report"], fixed_count=count)
    runs = {
        "proxy": tokenizer_stage.run, "curate": curate_stage.run, "router": router_stage.run,
        "curve": curve_stage.run, "final": tokenizer_stage.run, "tokenize": tokenize_stage.run,
        "generator": generator_stage.run, "sample": sample_stage.run, "report": report_stage.run_report,
        "fixed": tokenizer_stage.run, "fixed_tokenize": tokenize_stage.run, "fixed_generator": generator_stage.run,
    }
    deps = {
        "proxy": [], "curate": ["proxy"], "router": ["curate"], "curve": ["proxy", "router"],
        "final": ["router"], "tokenize": ["final", "router"], "generator": ["tokenize"],
        "sample": ["generator"], "fixed": [], "fixed_tokenize": ["fixed"], "fixed_generator": ["fixed_tokenize"],
        "report": ["sample", "fixed_generator"],
    }
    # what a stage reads without depending on it: ordering for `--jobs`, not in the fingerprint
    reads = {"report": ["curve"]}
    selected = [s for s in STAGES if s in exp.stages]

    def stands_for(stage: str) -> list[str]:
        """The selected stages a dependency reaches: itself if selected, else its own dependencies'."""
        if stage in selected:
            return [stage]
        return [x for d in deps[stage] for x in stands_for(d)]

    stages = []
    for s in selected:
        cfg = configs[s]
        own = [x for x in deps[s] if x in selected]
        after = [x for d in deps[s] + reads.get(s, []) for x in stands_for(d) if x not in own]
        stages.append(Stage(s, cfg, lambda _dir, _run=runs[s], _cfg=cfg: _run(_cfg), deps=own,
                            description=_describe(s), after=list(dict.fromkeys(after))))
    return Pipeline(stages, root)


def _describe(stage: str) -> str:
    return {
        "proxy": "train the proxy tokenizer under random assignments",
        "curate": "score candidate assignments with the proxy, label each video",
        "router": "train the router on the labels",
        "curve": "quality-cost curve: uniform, max-reward, router, threshold",
        "final": "train the final tokenizer with the router's assignments",
        "tokenize": "encode the dataset into the token store",
        "generator": "train the GPT on packed variable-length sequences",
        "sample": "sample class-conditional videos",
        "fixed": "train the fixed-length baseline tokenizer (one uniform assignment)",
        "fixed_tokenize": "encode the dataset with the fixed-length tokenizer",
        "fixed_generator": "train the GPT of the fixed-length baseline",
        "report": "FVD, PSNR, LPIPS, tokens per video, samples/s -> metrics.json, report.md",
    }[stage]


def weights_needed(stage: str, cfg: Any, exp: ExperimentConfig) -> list[tuple[str, str | None]]:
    """The third-party weights a stage will load, as ``(spec name, explicit path or None)``.

    ``exp``: the experiment, for the router stage, which completes the held-out beam records with
    the proxy and the curation's quality term after training."""
    lpips = {"alex": "lpips-alexnet-v0.1", "vgg": "lpips-vgg16-v0.1"}
    need: list[tuple[str, str | None]] = []
    if stage in ("proxy", "final", "fixed") and cfg.loss.lpips_weight > 0:
        need.append((lpips[cfg.loss.lpips_net], None))
    if stage in ("proxy", "final", "fixed") and cfg.loss.align_weight > 0 and cfg.loss.align_encoder == "i3d":
        need.append(("i3d-kinetics-400", None))
    if stage in ("curate", "curve") and cfg.quality == "lpips":
        need.append((lpips[cfg.lpips_net], cfg.lpips_weights))
    if stage == "curve" and cfg.fvd:
        need.append(("i3d-kinetics-400", cfg.fvd_weights))
    if stage == "router" and exp.curate.quality == "lpips" and exp.curate.mode == "beam":
        need.append((lpips[exp.curate.lpips_net], exp.curate.lpips_weights))
    if stage == "report":
        if cfg.lpips:
            need.append((lpips["alex"], None))
        if cfg.fvd:
            need.append(("i3d-kinetics-400", cfg.fvd_weights))
    return need


def pyav_needed(stage: str, cfg: Any, exp: ExperimentConfig) -> str | None:
    """Why ``stage`` will need PyAV (reading video files, writing mp4), or None."""
    if exp.data.source != "synthetic" and stage not in ("generator", "fixed_generator", "sample"):
        return f"data.source={exp.data.source!r} reads video files"
    if stage == "sample" and cfg.context:
        return f"sample.context={cfg.context!r} reads the context clips"
    if stage == "sample" and (cfg.grid_format in ("mp4", "both") or cfg.save_videos):
        return (f"sample.grid_format={cfg.grid_format!r}, sample.save_videos={cfg.save_videos} write mp4; "
                "sample.grid_format=gif needs none")
    return None


def preflight(items: list, exp: ExperimentConfig) -> None:
    """Before the first stage runs, check that every weights file a stage still to run will load
    is there, so that a missing LPIPS or I3D file fails now, not hours in (the error names the
    stage, the file and the install command)."""
    from arvid.eval.weights import SPECS, WeightsError, require

    for item in items:
        if item.action == "skip":
            continue
        need_av = pyav_needed(item.stage.name, item.stage.config, exp)
        if need_av:
            try:
                import av  # noqa: F401
            except ImportError:
                raise ValueError(f"stage {item.stage.name!r} needs PyAV ({need_av}), which is not installed: "
                                 f"pip install av") from None
        for name, path in weights_needed(item.stage.name, item.stage.config, exp):
            try:
                require(SPECS[name], path)
            except WeightsError as e:
                raise ValueError(f"stage {item.stage.name!r} will need {name} weights: {e}") from None


def _death_signal() -> Any:
    """Linux: a ``preexec_fn`` that makes the stage process get SIGTERM when the pipeline process dies,
    even by SIGKILL (``PR_SET_PDEATHSIG``); None elsewhere. ``prctl`` is looked up here, in the parent:
    after fork the child only calls it (no import, no dlopen), then exits at once if the parent is
    already gone."""
    if sys.platform != "linux":
        return None
    try:
        import ctypes
        import signal

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()
    sigterm = int(signal.SIGTERM)

    def preexec() -> None:  # pragma: no cover - runs in the child between fork and exec
        prctl(1, sigterm)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def stage_launcher(exp: ExperimentConfig, cli_options: list[str] | None = None) -> Any:
    """For :meth:`Pipeline.run_parallel`: start ``arvid [cli_options] pipeline RESOLVED --only STAGE
    --expect-fingerprint FP --planned-at T [--from STAGE]`` in a process of its own, its output
    appended to ``<out_dir>/logs/<stage>.log``. RESOLVED is the parent's config with its overrides
    applied, written once to ``<out_dir>/logs/experiment.resolved.<pid>.yaml``: a child never re-reads the
    user's YAML (which may have been edited since), and refuses to run if its fingerprint is not
    the one the parent planned."""
    logs = Path(exp.out_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    resolved = logs / f"experiment.resolved.{os.getpid()}.yaml"  # one per parent: several may share out_dir
    save_config(exp, resolved)
    preexec = _death_signal()

    def launch(item) -> subprocess.Popen:
        name = item.stage.name
        cmd = [sys.executable, "-m", "arvid", *(cli_options or []), "pipeline", str(resolved), "--only", name,
               "--expect-fingerprint", item.fingerprint, "--planned-at", repr(item.planned_at),
               *(["--from", name] if item.action == "redo" else [])]
        with open(logs / f"{name}.log", "ab") as f:
            f.write(f"\n=== {time.strftime('%Y-%m-%d %H:%M:%S')} {shlex.join(cmd)}\n".encode())
            f.flush()
            return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    preexec_fn=preexec)

    return launch


def run_pipeline(config: str, overrides: list[str], until: str | None = None, from_: str | None = None,
                 dry_run: bool = False, only: str | None = None, jobs: int = 1,
                 cli_options: list[str] | None = None, expect_fingerprint: str | None = None,
                 planned_at: float | None = None) -> list:
    """Run (or with ``dry_run`` plan) the experiment; ``only``: that stage alone; ``jobs`` > 1: independent
    stages at once, each in its own process (``cli_options``: the global ``arvid`` options they get).
    ``expect_fingerprint``, ``planned_at``: what a ``--jobs`` parent hands its ``--only`` children."""
    if jobs < 1:
        raise ValueError(f"--jobs must be at least 1, got {jobs}")
    exp = load_config(ExperimentConfig, config, overrides)
    pipe = build_pipeline(exp)
    check = lambda plan: preflight(plan, exp)  # noqa: E731
    if jobs > 1 and not dry_run:
        if only is not None:
            raise ValueError("--jobs and --only exclude each other: --only runs one stage")
        items = pipe.run_parallel(stage_launcher(exp, cli_options), jobs, until=until, from_=from_,
                                  preflight=check)
    else:
        items = pipe.run(until=until, from_=from_, dry_run=dry_run, preflight=check, only=only,
                         expect_fingerprint=expect_fingerprint, planned_at=planned_at)
    if not dry_run and only is None:  # a --only run (a --jobs child) leaves the record to its parent
        save_config(exp, Path(exp.out_dir) / "experiment.yaml")
    return items


def _main(args: argparse.Namespace) -> int:
    opts = ["--log-level", str(args.log_level)] + (["--threads", str(args.threads)] if args.threads else [])
    try:
        items = run_pipeline(args.config, list(args.overrides), args.until, getattr(args, "from"), args.dry_run,
                             only=args.only, jobs=args.jobs, cli_options=opts,
                             expect_fingerprint=args.expect_fingerprint, planned_at=args.planned_at)
    except PipelineError as e:
        raise ValueError(str(e)) from e
    print(format_plan(items) if args.dry_run else format_summary(items))
    return 0


def add_arguments(subparsers) -> None:
    """Register ``arvid pipeline CONFIG [--until S] [--from S] [--only S] [--jobs N] [--dry-run] [overrides]``."""
    p = subparsers.add_parser("pipeline", help="run the whole stage graph of an experiment, resumably",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("config", help="experiment YAML (ExperimentConfig), e.g. configs/experiments/demo.yaml")
    p.add_argument("--until", default=None, help="stop after this stage")
    p.add_argument("--from", default=None, help="redo this stage and those downstream of it (old outputs are moved aside; "
                   "independent stages, such as the fixed-length branch after --from router, are kept)")
    p.add_argument("--dry-run", action="store_true", help="print the plan and do nothing")
    p.add_argument("--only", default=None, metavar="STAGE",
                   help="run this one stage (its upstream stages must be finished)")
    p.add_argument("--jobs", type=int, default=1, metavar="N",
                   help="run up to N independent stages at once, each in its own process (logs in "
                        "<out_dir>/logs/); e.g. the fixed-length branch beside the main chain on one GPU")
    # what a --jobs parent hands its --only children
    p.add_argument("--expect-fingerprint", default=None, help=argparse.SUPPRESS)
    p.add_argument("--planned-at", type=float, default=None, help=argparse.SUPPRESS)
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. proxy.trainer.max_steps=10")
    p.set_defaults(func=_main)
