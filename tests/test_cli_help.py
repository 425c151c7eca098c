"""Every `arvid` command and subcommand answers ``--help``.

The commands are discovered from the argparse tree of ``arvid.cli.build_parser()``, so a new
command is covered without touching this file, and a command registered without ``help=`` (it
would be missing from its parent's command list) fails here. ``--help`` renders every argument's
help string too, so a stray ``%`` in one (argparse formats them with ``%``) fails here as well.
The known commands are listed only to check that the discovery finds them.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from arvid.cli import build_parser, main

# What the CLI offers today; the discovery must find at least these.
KNOWN = [
    (), ("pipeline",), ("data",), ("data", "synth"), ("data", "index"), ("train-tokenizer",), ("curate",),
    ("train-router",), ("tokenize",), ("train-generator",), ("sample",), ("text",), ("text", "train-spm"),
    ("eval",), ("eval", "recon"), ("eval", "gen"), ("eval", "fp"), ("eval", "fvd"), ("eval", "curve"),
]


def _subparsers(parser: argparse.ArgumentParser) -> list[argparse._SubParsersAction]:
    return [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]


def discover() -> dict[tuple[str, ...], tuple[argparse.ArgumentParser, str | None]]:
    """Command path -> (its parser, the help its parent lists for it; None for the root)."""
    found: dict[tuple[str, ...], tuple[argparse.ArgumentParser, str | None]] = {}

    def walk(parser: argparse.ArgumentParser, path: tuple[str, ...], help_: str | None) -> None:
        found[path] = (parser, help_)
        for action in _subparsers(parser):
            listed = {a.dest: a.help for a in action._choices_actions}  # only commands added with help=
            for name, sub in action.choices.items():
                walk(sub, path + (name,), listed.get(name))

    walk(build_parser(), (), None)
    return found


COMMANDS = discover()


def test_discovery_finds_every_known_command():
    missing = [" ".join(c) for c in KNOWN if c not in COMMANDS]
    assert not missing, f"commands not registered in arvid.cli.build_parser(): {missing}"
    assert len(COMMANDS) >= len(KNOWN)


@pytest.mark.parametrize("path", sorted(COMMANDS), ids=lambda p: " ".join(p) or "arvid")
def test_help(path, capsys):
    parser, listed_help = COMMANDS[path]
    if path:
        assert listed_help and listed_help.strip() and listed_help != argparse.SUPPRESS, (
            f"`arvid {' '.join(path)}` has no help= in its parent's command list")
        # every command can run: a leaf runs its stage, a group prints its subcommands
        assert callable(parser.get_default("func")), f"`arvid {' '.join(path)}` sets no func"
    with pytest.raises(SystemExit) as exc:
        main([*path, "--help"])
    assert exc.value.code in (0, None), f"`arvid {' '.join(path)} --help` exited {exc.value.code}"
    captured = capsys.readouterr()
    out = captured.out
    prog = " ".join(("arvid",) + path)
    assert out.startswith(f"usage: {prog}"), out[:300]
    usage = out.split("\n\n")[0]
    assert prog in usage
    assert "-h, --help" in out
    for action in _subparsers(parser):  # a group lists its subcommands
        for name in action.choices:
            assert name in out, f"`{prog} --help` does not list {name!r}"
    assert not captured.err.strip(), captured.err
    # a command that takes a config file lists the config's keys with their types and defaults
    if any(a.dest == "config" and "Config)" in (a.help or "") for a in parser._actions):
        assert "config keys (" in out, f"`{prog} --help` does not list its config keys"
        assert re.search(r"^  out(_dir)?: str = ", out, re.M), f"`{prog} --help` lists no output directory field"


def test_no_command_prints_help_and_returns_2(capsys):
    assert main([]) == 2
    assert capsys.readouterr().out.startswith("usage: arvid")


def test_overrides_may_follow_options_and_other_words_are_refused(capsys, tmp_path):
    cfg = str(Path(__file__).resolve().parents[1] / "configs" / "experiments" / "demo.yaml")
    outs = []
    for argv in (["pipeline", "--dry-run", cfg, f"out_dir={tmp_path}", "proxy.trainer.max_steps=3"],
                 ["pipeline", cfg, "--dry-run", f"out_dir={tmp_path}", "proxy.trainer.max_steps=3"],
                 ["pipeline", cfg, f"out_dir={tmp_path}", "--dry-run", "proxy.trainer.max_steps=3"]):
        assert main(argv) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] == outs[2] and str(tmp_path / "proxy") in outs[0]
    assert main(["pipeline", "--dry-run", cfg, f"out_dir={tmp_path}"]) == 0
    assert capsys.readouterr().out != outs[0]  # the override after the option did change the plan
    for bad in ("--bogus", "notanoverride"):
        with pytest.raises(SystemExit):
            main(["pipeline", cfg, "--dry-run", bad])
        assert f"unrecognized arguments: {bad}" in capsys.readouterr().err
    # only the bad word is named, not the valid override beside it (CLI review, 2026-12-07)
    with pytest.raises(SystemExit):
        main(["pipeline", cfg, "--dry-run", f"out_dir={tmp_path}", "--bogus"])
    assert "unrecognized arguments: --bogus\n" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--threads", "-1", "pipeline", cfg, "--dry-run"])
    assert "--threads must be >= 1, got -1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["--log-level", "bogus", "pipeline", cfg, "--dry-run"])
    assert "--log-level must be DEBUG, INFO" in capsys.readouterr().err


def test_eval_without_a_config_file_takes_a_first_override(tmp_path, monkeypatch):
    # `config` is optional for `arvid eval recon|gen|fp`: a key=value first word is an override,
    # not a config path (it used to be read as a YAML file name).
    import argparse

    from arvid.stages.evaluate import _config_and_overrides

    ns = argparse.Namespace
    assert _config_and_overrides(ns(config="tokenizer=runs/t", overrides=["num_videos=4"])) == (
        None, ["tokenizer=runs/t", "num_videos=4"])
    assert _config_and_overrides(ns(config="cfg.yaml", overrides=["a=1"])) == ("cfg.yaml", ["a=1"])
    monkeypatch.chdir(tmp_path)
    (tmp_path / "x=1.yaml").write_text("{}")
    assert _config_and_overrides(ns(config="x=1.yaml", overrides=[])) == ("x=1.yaml", [])  # a real file wins
    args = build_parser().parse_args(["eval", "recon", "tokenizer=runs/t", "num_videos=4"])
    assert _config_and_overrides(args) == (None, ["tokenizer=runs/t", "num_videos=4"])


@pytest.mark.parametrize("argv,flag,shown", [
    (["data", "index", "ROOT", "--out", "x.csv", "--workers", "-2"], "--workers", "integer >= 0, got -2"),
    (["data", "synth", "OUT", "--num", "0"], "--num", "integer >= 1, got 0"),
    (["data", "synth", "OUT", "--frames", "x"], "--frames", "integer >= 1, got 'x'"),
    (["eval", "fvd", "A", "B", "--batch-size", "0"], "--batch-size", "integer >= 1, got 0"),
    (["eval", "fvd", "A", "B", "--workers", "-1"], "--workers", "integer >= 0, got -1"),
])
def test_count_flags_refuse_values_below_their_minimum(capsys, argv, flag, shown):
    with pytest.raises(SystemExit):
        main(argv)
    err = capsys.readouterr().err
    assert f"argument {flag}: expected an {shown}" in err


def test_experiment_refuses_empty_stages_and_out_dir(capsys):
    cfg = str(Path(__file__).resolve().parents[1] / "configs" / "experiments" / "demo.yaml")
    assert main(["pipeline", cfg, "--dry-run", "stages=[]"]) == 1
    assert "stages is empty" in capsys.readouterr().err
    assert main(["pipeline", cfg, "--dry-run", "out_dir="]) == 1
    assert "out_dir is empty" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["pipeline", "train-tokenizer", "curate", "train-router", "tokenize",
                                     "train-generator"])
def test_a_missing_config_is_named_alone(capsys, command):
    """The dotted overrides may be left out: a missing CONFIG was reported as "the following
    arguments are required: config, overrides" (argparse marks nargs="*" and REMAINDER positionals
    required)."""
    with pytest.raises(SystemExit) as exc:
        main([command])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"arvid {command}: error: the following arguments are required: config")
