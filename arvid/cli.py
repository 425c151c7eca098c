"""`arvid <command>`: parse the command line, hand it to one stage. No logic lives here.

Each stage module registers its own subcommand through ``add_arguments(subparsers)``; the
``eval`` and ``data``/``text`` groups collect several modules' subcommands.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import re
import sys

# (module, group): group None registers at the top level, else under that command group.
STAGE_MODULES: list[tuple[str, str | None]] = [
    ("arvid.pipeline", None),
    ("arvid.stages.data_cmd", None),
    ("arvid.stages.train_tokenizer", None),
    ("arvid.stages.curate", None),
    ("arvid.stages.train_router", None),
    ("arvid.stages.tokenize", None),
    ("arvid.stages.train_generator", None),
    ("arvid.stages.sample", None),
    ("arvid.stages.text_cmd", None),
    ("arvid.stages.evaluate", "eval"),
    ("arvid.stages.eval_fvd", "eval"),
    ("arvid.stages.eval_curve", "eval"),
]

GROUP_HELP = {"eval": "evaluation: fvd, recon, gen, fp, budget, curve"}


def build_parser() -> argparse.ArgumentParser:
    # The stage modules import torch: ~260k long-lived objects, over which the cyclic collector would
    # run full collections that find nothing (~0.2 s of the start-up). Refcounting still frees.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _build_parser()
    finally:
        if enabled:
            gc.enable()


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="arvid",
        description="Autoregressive video generation with an adaptive-length video tokenizer (EVATok).",
    )
    parser.add_argument("--log-level", default="INFO", help="logging level (DEBUG, INFO, WARNING)")
    parser.add_argument("--threads", type=int, default=None,
                        help="CPU threads for torch (default: torch's choice; 1 is fastest for tiny models on a busy CPU)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    groups: dict[str, argparse._SubParsersAction] = {}
    for module_name, group in STAGE_MODULES:
        module = importlib.import_module(module_name)
        if group is None:
            target = sub
        else:
            if group not in groups:
                gp = sub.add_parser(group, help=GROUP_HELP.get(group, group))
                groups[group] = gp.add_subparsers(dest=f"{group}_command", metavar="SUBCOMMAND")
                gp.set_defaults(func=lambda args, _gp=gp: _gp.print_help() or 2)
            target = groups[group]
        before = set(target.choices)
        module.add_arguments(target)
        for name in set(target.choices) - before:
            _add_config_fields(target.choices[name], module)
            _optional_overrides(target.choices[name])
    return parser


def _optional_overrides(parser: argparse.ArgumentParser) -> None:
    """argparse marks a ``nargs="*"`` (without a default) or ``REMAINDER`` positional, the dotted
    overrides, as required: a missing CONFIG was reported as "the following arguments are required:
    config, overrides", though the overrides may be left out."""
    for action in parser._actions:
        if not action.option_strings and action.nargs in (argparse.ZERO_OR_MORE, argparse.REMAINDER):
            action.required = False


def _add_config_fields(parser: argparse.ArgumentParser, module) -> None:
    """Append the YAML keys of the command's config dataclass (type, default, help) to its --help."""
    import dataclasses

    from arvid.config import describe

    for action in parser._actions:
        m = re.search(r"\((\w+Config)\)", action.help or "") if action.dest == "config" else None
        cls = getattr(module, m.group(1), None) if m else None
        if cls is not None and dataclasses.is_dataclass(cls):
            parser.formatter_class = argparse.RawDescriptionHelpFormatter
            parser.epilog = (f"config keys ({cls.__name__}; YAML or dotted overrides key.sub=value):\n  "
                             + "\n  ".join(describe(cls)))
            return


def _user_errors() -> tuple[type[BaseException], ...]:
    """The errors :func:`main` reports in one line (evaluated only when one propagates). A
    NonFiniteLossError can only come from a loaded Trainer: it is not imported for other errors."""
    trainer = sys.modules.get("arvid.training.trainer")
    return (ValueError, OSError) + ((trainer.NonFiniteLossError,) if trainer is not None else ())


def _run(args) -> int | None:
    """The command, then the distributed teardown (a no-op without a process group; no barrier
    after a failure)."""
    from arvid.training.device import distributed_teardown

    with distributed_teardown():
        return args.func(args)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    # Dotted overrides may also follow an option (`arvid pipeline CFG --until curve a.b=1`):
    # argparse stops filling a positional list at the first option, so such key=value words come
    # back unrecognised; they are the command's overrides, in the order written.
    args, extra = parser.parse_known_args(argv)
    if extra:
        from arvid.config import is_override

        bad = extra if not hasattr(args, "overrides") else [e for e in extra if not is_override(e)]
        if bad:  # only the words that are neither options nor overrides
            parser.error(f"unrecognized arguments: {' '.join(bad)}")
        args.overrides = list(args.overrides or []) + extra
    if str(args.log_level).upper() not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
        parser.error(f"--log-level must be DEBUG, INFO, WARNING, ERROR or CRITICAL, got {args.log_level!r}")
    logging.basicConfig(level=getattr(logging, str(args.log_level).upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be >= 1, got {args.threads}")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        rc = _run(args)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except _user_errors() as e:
        # Config errors, bad inputs, I/O problems, an attention backend that cannot run here
        # (AttentionBackendUnavailable is a ValueError) and a training run stopped by a non-finite
        # loss carry a message that says what to fix, install or resume from; a traceback would only
        # hide it. ARVID_DEBUG=1 shows the traceback.
        import os

        if os.environ.get("ARVID_DEBUG"):
            raise
        # one line: a parser's message (PyYAML's problem marks) may span several
        msg = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"arvid {args.command}: error: {msg}", file=sys.stderr)
        return 1
    return int(rc or 0)


def entry() -> None:
    """The ``arvid`` console script and ``python -m arvid``: :func:`main`, then an exit that a
    launched worker survives (:func:`arvid.training.device.exit_process`)."""
    from arvid.training.device import exit_process

    exit_process(main())


if __name__ == "__main__":
    entry()
