"""README.md's and BENCHMARKS.md's command lines against the code, so the documentation cannot
silently drift from the CLI.

- Every ``arvid`` command (``python -m arvid``, ``torchrun ... -m arvid`` too) in README.md's
  fenced ``bash`` blocks, indented code blocks and inline code spans goes through
  :func:`arvid.cli.main` with the real parser; only its last step, :func:`arvid.cli._run`, is
  replaced: a stage with a config has its ``load_config`` swapped for one that loads the config
  (the YAML given, the dotted overrides applied by arvid's own code: strict keys, typed values)
  and stops there. Nothing runs. Each ``--flag`` must be an option of the (sub)command at its
  place, spelled in full (argparse would accept an abbreviation; the docs should not use one).
  An inline span that leaves out required arguments (``arvid eval fvd --save-stats``) names a
  command or an option rather than giving a whole command line: its command and flags are
  checked, its missing arguments are not. (The pipeline diagram, a fence without ``bash``, is
  prose and is not checked.)
- Every ``configs/...yaml`` path in README.md exists, and the Configs section's tree lists exactly
  the shipped configs (``tests/test_core_config.py`` loads each shipped config with its stage).
- Every ``benchmarks/<script>.py --flag`` (or ``bench_*.py --flag``) in README.md and
  BENCHMARKS.md is an option of that script's argparse parser, captured by calling the script's
  ``main()`` with ``ArgumentParser.parse_args`` made to stop at once.

Placeholders (``CONFIG``, ``REAL``, ``N``, ``...``) are listed in :data:`PLACEHOLDERS`: a placeholder
config is replaced by a shipped config of the same class (or none, where the config is optional),
a placeholder value of a typed option by a valid one, and ``...`` is dropped; the flags and the
override keys around them are checked as written.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import itertools
import re
import shlex
import sys
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BENCHMARKS = ROOT / "BENCHMARKS.md"

#: Words the docs write in place of a real argument.
PLACEHOLDERS = {"CONFIG", "CFG", "NAME", "REAL", "FAKE", "DIR", "N", "G", "T", "STAGE", "FILE", "B", "..."}
#: Shell words that end a command.
SEPARATORS = {"&&", "||", ";", "|", ">", ">>", "2>&1", "&"}


# --------------------------------------------------------------------------- extracting commands


@dataclass(frozen=True)
class Snippet:
    file: str
    line: int
    text: str
    inline: bool  # an inline code span (may name a command without its required arguments)


def _join_continuations(lines: list[tuple[int, str]]) -> list[tuple[int, str]]:
    """Shell lines ending in a backslash joined to the next: (first line number, logical line)."""
    out: list[tuple[int, str]] = []
    pending: tuple[int, str] | None = None
    for no, line in lines:
        if pending is not None:
            no, line = pending[0], pending[1] + " " + line.strip()
            pending = None
        if line.rstrip().endswith("\\"):
            pending = (no, line.rstrip()[:-1])
        else:
            out.append((no, line))
    if pending is not None:
        out.append(pending)
    return out


def _expand_vars(line: str, env: dict[str, str]) -> str:
    for name, value in env.items():
        line = re.sub(rf"\$(?:{name}\b|\{{{name}\}})", lambda _m, v=value: v, line)
    return line


def snippets(path: Path) -> list[Snippet]:
    """The code of a Markdown file: each logical line of its ``bash`` fences and indented code
    blocks, and each inline code span (whitespace-normalised, possibly spanning lines)."""
    lines = path.read_text(encoding="utf-8").split("\n")
    out: list[Snippet] = []
    prose = list(lines)
    blocks: list[list[tuple[int, str]]] = []
    fence: str | None = None
    for i, line in enumerate(lines):
        stripped = line.strip()
        if stripped.startswith("```"):
            if fence is None:
                fence = stripped[3:].strip()
                if fence == "bash":
                    blocks.append([])
            else:
                fence = None
            prose[i] = ""
        elif fence is not None:
            if fence == "bash":
                blocks[-1].append((i + 1, line))
            prose[i] = ""
    # indented code blocks (four spaces or more, as in the list items of README's Commands) that
    # hold an arvid command; a run of them is one block
    indented: list[tuple[int, str]] = []
    for i, line in enumerate(prose):
        continued = bool(indented) and indented[-1][0] == i and indented[-1][1].rstrip().endswith("\\")
        if continued or re.match(r"^ {4,}arvid ", line):
            indented.append((i + 1, line))
            prose[i] = ""
    if indented:
        blocks.append(indented)
    for block in blocks:
        env: dict[str, str] = {}
        for no, line in _join_continuations(block):
            line = _expand_vars(line, env)
            m = re.match(r"^\s*([A-Za-z_]\w*)=(.*)$", line)
            if m:
                try:
                    words = shlex.split(m.group(2), comments=True)
                except ValueError:
                    words = []
                if len(words) == 1:  # VAR="a b c": a shell variable later lines expand
                    env[m.group(1)] = words[0]
                    continue
            out.append(Snippet(path.name, no, line.strip(), inline=False))
    text = "\n".join(prose)
    for m in re.finditer(r"(?<!`)(`+)(?!`)(.+?)(?<!`)\1(?!`)", text, re.S):
        if "\n\n" in m.group(2):  # a code span does not cross a paragraph
            continue
        out.append(Snippet(path.name, text.count("\n", 0, m.start()) + 1, " ".join(m.group(2).split()),
                           inline=True))
    return out


def _words(text: str) -> list[str]:
    try:
        return shlex.split(text, comments=True)
    except ValueError:  # an unbalanced quote in prose
        return text.split()


def _is_alternative(word: str) -> bool:
    return bool(re.fullmatch(r"[a-z][a-z0-9_-]*", word))


def arvid_commands(snippet: Snippet) -> list[list[str]]:
    """The argument lists of the ``arvid`` commands in a snippet, ``a|b`` alternatives expanded.

    ``arvid eval recon|gen|fp|curve CONFIG`` and ``arvid curate | tokenize | train-generator
    CONFIG`` write alternatives with ``|``: bare words on both sides of a ``|`` are joined and
    expanded, one command each."""
    words = _words(snippet.text)
    joined: list[str] = []
    i = 0
    while i < len(words):
        if (words[i] == "|" and joined and i + 1 < len(words) and _is_alternative(joined[-1].split("|")[-1])
                and _is_alternative(words[i + 1])):
            joined[-1] += "|" + words[i + 1]
            i += 2
            continue
        joined.append(words[i])
        i += 1
    commands = []
    for start, word in enumerate(joined):
        if word != "arvid":
            continue
        argv = list(itertools.takewhile(lambda w: w not in SEPARATORS, joined[start + 1:]))
        if argv and argv[0].endswith(":"):  # "arvid train-generator: error: ...": output, not a command
            continue
        if not argv and snippet.inline:  # the program's name in prose
            continue
        choices = [w.split("|") if re.fullmatch(r"[a-z][\w-]*(\|[a-z][\w-]*)+", w) else [w] for w in argv]
        commands.extend(list(c) for c in itertools.product(*choices))
    return commands


# --------------------------------------------------------------------------- checking arvid commands


class _Loaded(BaseException):
    """Raised by the stand-in ``load_config`` once the config has loaded: the stage never runs."""

    def __init__(self, cls, path, overrides, cfg):
        super().__init__(cls.__name__)
        self.cls, self.path, self.overrides, self.cfg = cls, path, overrides, cfg


@cache
def _parser() -> argparse.ArgumentParser:
    from arvid.cli import build_parser

    return build_parser()


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction | None:
    return next((a for a in parser._actions if isinstance(a, argparse._SubParsersAction)), None)


@cache
def representative_config(cls: type) -> str | None:
    """A shipped config (under configs/) that loads as ``cls``, for a placeholder CONFIG; None when
    none does (the optional-config ``eval`` commands then start from the defaults)."""
    from arvid.config import load_config

    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        try:
            load_config(cls, path)
        except ValueError:  # a ConfigError: another stage's config
            continue
        return str(path.relative_to(ROOT))
    return None


def _is_placeholder_path(path) -> bool:
    """``CONFIG``, or ``configs/experiments/NAME.yaml`` (a one-letter stem is a real name: S, B, L)."""
    p = Path(str(path))
    return str(path) in PLACEHOLDERS or (p.stem in PLACEHOLDERS and len(p.stem) > 1 and not p.exists())


def _walk(argv: list[str]) -> tuple[list[str], list[str], list[str]]:
    """Exact option names at their place, and placeholder values of typed options replaced:
    (problems, the argv to parse, the command path)."""
    problems: list[str] = []
    parser, path = _parser(), ["arvid"]
    out: list[str] = []
    i = 0
    while i < len(argv):
        word = argv[i]
        i += 1
        if word == "...":
            continue
        out.append(word)
        if word.startswith("-") and len(word) > 1 and not re.fullmatch(r"-[\d.]+", word):
            flag, eq, _ = word.partition("=")
            action = parser._option_string_actions.get(flag)
            if action is None:
                near = [o for o in parser._option_string_actions if o.startswith(flag)]
                problems.append(f"`{flag}` is not an option of `{' '.join(path)}`"
                                + (f" (argparse would take it as an abbreviation of {near[0]})" if len(near) == 1 else ""))
                continue
            takes = 1 if action.nargs is None else action.nargs if isinstance(action.nargs, int) else 0
            if action.nargs == "?" and i < len(argv) and not argv[i].startswith("-"):
                takes = 1
            for _ in range(0 if eq else takes):
                if i >= len(argv):
                    break
                value = argv[i]
                i += 1
                if value in PLACEHOLDERS and (action.choices or action.type not in (None, str)):
                    value = str(next(iter(action.choices))) if action.choices else "1"
                out.append(value)
            continue
        sub = _subparsers(parser)
        if sub is not None and word in sub.choices:
            parser = sub.choices[word]
            path.append(word)
    return problems, out, path[1:]


def check_arvid(argv: list[str], inline: bool) -> str | None:
    """None if the command parses and its config (if any) loads; else what is wrong."""
    import logging

    import torch

    from arvid import cli
    from arvid.config import load_config

    problems, argv, command = _walk(argv)
    # an inline span of the command's name alone (`arvid eval budget`) names it: parsed, not loaded
    name_only = inline and argv == command
    seen: dict[str, object] = {}

    def stand_in_load_config(cls, path=None, overrides=()):
        if path is not None and _is_placeholder_path(path):
            path = representative_config(cls)
        cfg = load_config(cls, path, overrides)
        raise _Loaded(cls, path, list(overrides), cfg)

    def fake_run(args):
        if not hasattr(args, "config") or name_only:  # eval fvd, data, text: flags and positionals only
            return 0
        scope = args.func.__globals__  # the stage module's namespace: its load_config
        real = scope.get("load_config")
        scope["load_config"] = stand_in_load_config
        try:
            args.func(args)
            seen["error"] = "the stage ran without loading a config"
        except _Loaded:
            pass
        except Exception as e:  # noqa: BLE001 - a config error: what the CLI would print
            seen["error"] = f"{type(e).__name__}: {e}"
        finally:
            scope["load_config"] = real
        return 0

    err, out = io.StringIO(), io.StringIO()
    saved = cli.build_parser, cli._run, torch.set_num_threads, logging.basicConfig
    cli.build_parser, cli._run = _parser, fake_run
    torch.set_num_threads = logging.basicConfig = lambda *a, **k: None
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            rc = cli.main(argv)
    except SystemExit as e:
        rc = e.code
    finally:
        cli.build_parser, cli._run, torch.set_num_threads, logging.basicConfig = saved
    message = (err.getvalue().strip().splitlines() or [""])[-1]
    if rc not in (0, None):
        # inline: a command named without its required arguments; no command given (`arvid
        # --threads 1 ...`): main printed the help and returned 2
        tolerated = inline and re.search(r"the following arguments are required|expected one argument", message)
        if not (tolerated or (rc == 2 and not message and not command)):
            problems.append(message or f"exit status {rc}")
    if "error" in seen:
        problems.append(str(seen["error"]))
    return "; ".join(problems) or None


def readme_arvid_commands() -> list[tuple[Snippet, list[str]]]:
    return [(s, argv) for s in snippets(README) for argv in arvid_commands(s)]


def _where(s: Snippet, argv: list[str]) -> str:
    shown = "arvid " + " ".join(shlex.quote(a) for a in argv)
    text = s.text if len(s.text) <= 160 else s.text[:157] + "..."
    return f"{s.file}:{s.line}: `{text}`" + (f" (as `{shown}`)" if shown not in s.text else "")


def test_readme_arvid_commands_parse_and_their_configs_load(monkeypatch):
    monkeypatch.chdir(ROOT)
    commands = readme_arvid_commands()
    assert len(commands) >= 40, f"only {len(commands)} arvid commands found in README.md: is the extraction broken?"
    assert len([1 for s, _ in commands if not s.inline]) >= 20
    bad = []
    for s, argv in commands:
        problem = check_arvid(argv, s.inline)
        if problem:
            bad.append(f"{_where(s, argv)}: {problem}")
    assert not bad, "README.md commands that do not match the CLI:\n  " + "\n  ".join(bad)


@pytest.mark.parametrize("line,inline,expected", [
    ("arvid pipeline configs/experiments/demo.yaml --bogus", False, "`--bogus` is not an option of `arvid pipeline`"),
    ("arvid pipeline configs/experiments/demo.yaml --dry", False, "abbreviation of --dry-run"),
    ("arvid pipeline configs/experiments/demo.yaml curate.no_such_key=1", False, "no_such_key"),
    ("arvid pipeline configs/experiments/demo.yaml generator.trainer.max_steps=abc", False, "max_steps"),
    ("arvid pipeline configs/experiments/missing.yaml", False, "does not exist"),
    ("arvid curate configs/curate/T.yaml", False, "does not exist"),  # T is a placeholder elsewhere, not here
    ("arvid curate configs/tokenizer/debug.yaml", False, "ConfigError"),  # another stage's config
    ("arvid no-such-command CONFIG", False, "invalid choice"),
    ("arvid eval fvd A B --stage proxy", False, "`--stage` is not an option of `arvid eval fvd`"),
    ("arvid sample --generator G --tokenizer T --until curve", False, "`--until` is not an option of `arvid sample`"),
    ("arvid pipeline CFG --jobs 2 --stage proxy", False, "`--stage` is not an option"),
    ("arvid eval gen CONFIG no_such=1", False, "no_such"),
    ("arvid data synth", False, "required"),
    ("arvid data synth", True, None),  # an inline mention of the command
    ("arvid eval fvd --save-stats", True, None),
    ("arvid train-tokenizer configs/tokenizer/debug.yaml --stage final trainer.max_steps=3", False, "needs `router`"),
    ("arvid train-tokenizer configs/tokenizer/debug.yaml --stage final router=R trainer.max_steps=3", False, None),
    ("arvid eval recon|gen|fp|curve CONFIG", False, None),
    ("arvid pipeline CFG --only STAGE --jobs N", False, None),
])
def test_the_checker_finds_what_is_wrong(monkeypatch, line, inline, expected):
    """The checks are not vacuous: known-bad lines are reported, with the reason."""
    monkeypatch.chdir(ROOT)
    commands = arvid_commands(Snippet("x.md", 1, line, inline))
    assert commands
    problems = [check_arvid(argv, inline) for argv in commands]
    if expected is None:
        assert problems == [None] * len(commands)
    else:
        assert all(p and expected in p for p in problems), problems


def test_extraction_reads_continuations_variables_and_spans(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("Run `arvid pipeline\nCFG --until curve` now.\n\n```bash\nV=\"a=1 \\\n   b=2\"\n"
                  "arvid curate X $V \\\n    c=3   # comment\n```\n\n    arvid sample --generator G \\\n"
                  "        --budget 600\n")
    got = [(s.line, s.inline, argv) for s in snippets(md) for argv in arvid_commands(s)]
    assert sorted(got) == [(1, True, ["pipeline", "CFG", "--until", "curve"]),
                           (7, False, ["curate", "X", "a=1", "b=2", "c=3"]),
                           (11, False, ["sample", "--generator", "G", "--budget", "600"])]


# --------------------------------------------------------------------------- config paths


def _expand_braces(path: str) -> list[str]:
    m = re.search(r"\{([^{}]*)\}", path)
    if not m:
        return [path]
    return [q for alt in m.group(1).split(",") for q in _expand_braces(path[:m.start()] + alt + path[m.end():])]


def test_readme_config_paths_exist():
    text = README.read_text(encoding="utf-8")
    bad, found = [], 0
    for no, line in enumerate(text.split("\n"), 1):
        for m in re.finditer(r"(?<![\w/.])configs/[\w./{},-]*?\.yaml\b", line):
            for path in _expand_braces(m.group(0)):
                found += 1
                if _is_placeholder_path(path):
                    continue
                if not (ROOT / path).is_file():
                    bad.append(f"{README.name}:{no}: {path} does not exist ({line.strip()[:120]})")
    assert found >= 10, f"only {found} configs/...yaml paths found in README.md"
    assert not bad, "README.md names configs that are not there:\n  " + "\n  ".join(bad)


def test_readme_configs_tree_lists_the_shipped_configs():
    """The Configs section's tree (``configs/`` then ``folder/   a, b (note), c``) lists every
    shipped YAML and no other."""
    lines = README.read_text(encoding="utf-8").split("\n")
    start = next(i for i, line in enumerate(lines) if line.strip() == "## Configs")
    block = list(itertools.takewhile(lambda line: not line.startswith("```"),
                                     lines[next(i for i in range(start, len(lines)) if lines[i].startswith("```")) + 1:]))
    assert block and block[0].strip() == "configs/", block[:1]
    listed: dict[str, str] = {}
    folder = None
    for line in block[1:]:
        m = re.match(r"^  (\w+)/\s+(.*)$", line)
        if m:
            folder = m.group(1)
            listed[folder] = m.group(2)
        elif folder and line.strip():
            listed[folder] += " " + line.strip()
    bad = []
    shipped_folders = {p.name for p in (ROOT / "configs").iterdir() if p.is_dir()}
    for folder in sorted(shipped_folders | set(listed)):
        desc = listed.get(folder, "")
        while re.search(r"\([^()]*\)", desc):
            desc = re.sub(r"\([^()]*\)", "", desc)
        # "whole pipelines: demo, synthetic_gpu": the names after a label
        names = {n.split(":")[-1].strip() for n in desc.split(",") if n.strip()}
        shipped = {p.stem for p in (ROOT / "configs" / folder).glob("*.yaml")}
        if folder not in listed:
            bad.append(f"configs/{folder}/ is not in the tree")
        for n in sorted(names - shipped):
            bad.append(f"configs/{folder}/{n}.yaml is listed but not shipped")
        for n in sorted(shipped - names):
            bad.append(f"configs/{folder}/{n}.yaml is shipped but not listed")
    assert not bad, "README.md's Configs tree:\n  " + "\n  ".join(bad)


# --------------------------------------------------------------------------- benchmark flags


class _Captured(BaseException):
    def __init__(self, parser):
        super().__init__("parser")
        self.parser = parser


@cache
def script_options(name: str) -> frozenset[str]:
    """The option strings of ``benchmarks/<name>.py``'s parser: its ``main()`` is called with
    ``parse_args`` raising the parser it was called on, so nothing after the parsing runs."""
    path = ROOT / "benchmarks" / f"{name}.py"
    if "ArgumentParser" not in path.read_text(encoding="utf-8"):
        return frozenset()  # takes no options
    spec = importlib.util.spec_from_file_location(f"_readme_bench_{name}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(path.parent))  # probe_* import bench_* as the scripts run from benchmarks/
    try:
        spec.loader.exec_module(mod)
        real = argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args

        def capture(self, *a, **k):
            raise _Captured(self)

        argparse.ArgumentParser.parse_args = argparse.ArgumentParser.parse_known_args = capture
        try:
            mod.main()
        except _Captured as c:
            return frozenset(c.parser._option_string_actions)
        finally:
            argparse.ArgumentParser.parse_args, argparse.ArgumentParser.parse_known_args = real
    finally:
        sys.path.remove(str(path.parent))
    raise AssertionError(f"benchmarks/{name}.py's main() returned without parsing its arguments")


def benchmark_mentions(path: Path) -> list[tuple[Snippet, str, list[str]]]:
    """(snippet, script name, the --flags after it) for each benchmark script a snippet runs."""
    out = []
    for s in snippets(path):
        words = _words(s.text)
        for i, word in enumerate(words):
            m = re.fullmatch(r"(benchmarks/)?(\w+)\.py", word)
            if not m or not (m.group(1) or (ROOT / "benchmarks" / f"{m.group(2)}.py").is_file()
                             or re.match(r"(bench|probe)_", m.group(2))):
                continue
            rest = itertools.takewhile(lambda w: w not in SEPARATORS and not w.endswith(".py") and w != "arvid",
                                       words[i + 1:])
            out.append((s, m.group(2), [w.partition("=")[0] for w in rest if w.startswith("--")]))
    return out


def test_benchmark_flags_in_the_docs_exist():
    bad, checked = [], 0
    for doc in (README, BENCHMARKS):
        for s, name, flags in benchmark_mentions(doc):
            if not (ROOT / "benchmarks" / f"{name}.py").is_file():
                bad.append(f"{s.file}:{s.line}: `{s.text[:120]}`: benchmarks/{name}.py does not exist")
                continue
            options = script_options(name)
            for flag in flags:
                checked += 1
                if flag not in options:
                    known = ", ".join(sorted(o for o in options if o.startswith("--")))
                    bad.append(f"{s.file}:{s.line}: `{s.text[:120]}`: {flag} is not an option of "
                               f"benchmarks/{name}.py (it has: {known})")
    assert checked >= 100, f"only {checked} benchmark flags found in the docs: is the extraction broken?"
    assert not bad, "benchmark command lines in the docs that the scripts refuse:\n  " + "\n  ".join(bad)
