"""arvid.config: strict typed configs, overrides, clear errors."""

import re
from dataclasses import dataclass
from typing import Literal

import pytest

from arvid.config import (
    EXECUTION_NOTE,
    ConfigError,
    apply_overrides,
    config_fingerprint,
    describe,
    doc,
    execution_fields,
    fingerprint_dict,
    from_dict,
    load_config,
    nested,
    read_yaml,
    save_config,
    to_dict,
)


@dataclass
class ModelCfg:
    dim: int = doc(64, "width")
    dropout: float = doc(0.0, "dropout")
    norm: Literal["rms", "layer"] = doc("rms", "norm type")
    sizes: tuple[int, ...] = doc((1, 2), "sizes")
    name: str | None = doc(None, "optional name")


@dataclass
class RunCfg:
    model: ModelCfg = nested(ModelCfg, "model")
    steps: int = doc(10, "steps")
    tags: dict = doc({}, "free-form tags")


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("model:\n  dim: 128\n  sizes: [3, 4, 5]\nsteps: 5\n")
    cfg = load_config(RunCfg, p, ["model.dropout=0.5", "steps=7", "model.norm=layer"])
    assert cfg.model.dim == 128 and cfg.model.sizes == (3, 4, 5)
    assert cfg.model.dropout == 0.5 and cfg.steps == 7 and cfg.model.norm == "layer"


def test_unknown_key_names_key_file_and_suggestion(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  dimm: 3\n")
    with pytest.raises(ConfigError) as e:
        load_config(RunCfg, p)
    msg = str(e.value)
    assert "model.dimm" in msg and "bad.yaml" in msg and "model.dim" in msg


def test_wrong_type_names_key_and_expected(tmp_path):
    with pytest.raises(ConfigError, match=r"`model.dim` must be int, got 'abc'"):
        load_config(RunCfg, None, ["model.dim=abc"])
    with pytest.raises(ConfigError, match=r"`steps` must be int"):
        from_dict(RunCfg, {"steps": 1.5})
    with pytest.raises(ConfigError, match="did you mean 'layer'"):
        from_dict(RunCfg, {"model": {"norm": "layr"}})
    with pytest.raises(ConfigError, match=r"`model.sizes\[1\]` must be int"):
        from_dict(RunCfg, {"model": {"sizes": [1, "x"]}})
    with pytest.raises(ConfigError, match="must be int, got True"):
        # a bool is not an int even though Python says it is
        from_dict(ModelCfg, {"dim": True})


def test_save_roundtrip_and_fingerprint(tmp_path):
    cfg = load_config(RunCfg, None, ["model.dim=32", "tags={a: 1}"])
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(RunCfg, tmp_path / "c.yaml")
    assert to_dict(again) == to_dict(cfg)
    assert config_fingerprint(again) == config_fingerprint(cfg)
    assert config_fingerprint(load_config(RunCfg, None, ["model.dim=33"])) != config_fingerprint(cfg)


def test_base_include(tmp_path):
    (tmp_path / "base.yaml").write_text("steps: 3\nmodel:\n  dim: 8\n")
    (tmp_path / "child.yaml").write_text("_base_: base.yaml\nmodel:\n  dropout: 0.1\n")
    cfg = load_config(RunCfg, tmp_path / "child.yaml")
    assert cfg.steps == 3 and cfg.model.dim == 8 and cfg.model.dropout == 0.1


def test_base_of_another_type_is_a_config_error(tmp_path):
    """`_base_: 3` was a TypeError ('int' object is not iterable) out of read_yaml, not a ConfigError."""
    p = tmp_path / "c.yaml"
    p.write_text("_base_: 3\nsteps: 2\n")
    with pytest.raises(ConfigError, match=r"c.yaml.*`_base_` must be a file name or a list of them, got 3"):
        load_config(RunCfg, p)


@pytest.mark.parametrize("key, shown", [("1", "1"), ("null", "None"), ("2.5", "2.5")])
def test_a_key_that_is_not_a_string_is_an_unknown_key(tmp_path, key, shown):
    """YAML reads `1:` and `null:` as an int and None key; the close-match lookup raised a TypeError."""
    p = tmp_path / "c.yaml"
    p.write_text(f"steps: 2\nmodel:\n  {key}: 3\n")
    with pytest.raises(ConfigError, match=rf"c.yaml: unknown key `model.{re.escape(shown)}` for ModelCfg"):
        load_config(RunCfg, p)


def test_override_syntax_errors():
    with pytest.raises(ConfigError, match="key.path=value"):
        apply_overrides({}, ["nokey"])
    with pytest.raises(ConfigError, match="not a section"):
        apply_overrides({"steps": 3}, ["steps.x=1"])


def test_exponent_floats_without_a_dot_read_as_numbers(tmp_path):
    """`5e-4` is a float in YAML 1.2 and Python; PyYAML's YAML 1.1 made it the string '5e-4', which
    the strict float field then refused. Files and overrides both read it as a number now."""
    p = tmp_path / "c.yaml"
    p.write_text("model:\n  dropout: 5e-4\n  dim: 1e2\n")
    cfg = load_config(RunCfg, p, ["steps=2E+1", "tags.lr=3e-5"])
    assert cfg.model.dropout == pytest.approx(5e-4) and isinstance(cfg.model.dropout, float)
    assert cfg.model.dim == 100 and isinstance(cfg.model.dim, int)
    assert cfg.steps == 20 and cfg.tags == {"lr": pytest.approx(3e-5)}
    # strings that only look numeric stay strings and are still refused by a float field
    p.write_text("model:\n  dropout: 5e\n")
    with pytest.raises(ConfigError, match="dropout"):
        load_config(RunCfg, p)


# ----------------------------------------------------------------- YAML round trip of number-like strings

# strings that arvid's loader (or YAML 1.1) would read as something else when written plainly
NUMBER_LIKE = ["1e3", "5e-4", ".5", "-.5", "+.5", "-.5e3", "+1e5", "1E5", "1_000e3", "1.", "1:30.5", "1e999",
               ".inf", "-.inf", "+.inf", ".nan", "inf", "nan", "-inf", "0x1F", "017", "1_000", "12:30", "yes",
               "off", "null", "~", "", "._e5", "1_e5", "2024-01-01"]


@dataclass
class StrCfg:
    name: str = doc("", "a free-form name")
    names: list[str] = doc([], "more names")
    table: dict[str, str] = doc({}, "named strings")


@pytest.mark.parametrize("text", NUMBER_LIKE)
def test_number_like_strings_round_trip_through_save_config(tmp_path, text):
    """save_config quotes every string the loader would read as a number (``'1e3'``, not ``1e3``,
    which came back as the float 1000.0 and failed the str field)."""
    cfg = StrCfg(name=text, names=[text, "x"], table={"k": text})
    save_config(cfg, tmp_path / "c.yaml")
    again = load_config(StrCfg, tmp_path / "c.yaml")
    assert again == cfg


def test_dump_yaml_round_trips_any_string_and_float():
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from arvid.config import _load, dump_yaml

    @settings(max_examples=400, deadline=None)
    @given(s=st.one_of(st.text(alphabet="0123456789_.eE+-:xXoOinfaINFA ", max_size=12), st.text(max_size=8)),
           x=st.floats(allow_nan=False))
    def check(s, x):
        assert _load(dump_yaml({"s": s, "x": x}), "t") == {"s": s, "x": x}

    check()


def test_save_pretrained_quotes_number_like_strings(tmp_path):
    import torch
    from torch import nn

    from arvid.pretrained import PretrainedMixin

    class Tiny(nn.Module, PretrainedMixin):
        config_class = StrCfg
        model_kind = "tiny"

        def __init__(self, config: StrCfg) -> None:
            super().__init__()
            self.config = config
            self.w = nn.Parameter(torch.zeros(2))

    cfg = StrCfg(name="1e3", names=["5e-4", ".5"], table={"a": "-.5e3"})
    Tiny(cfg).save_pretrained(tmp_path / "m")
    assert Tiny.from_pretrained(tmp_path / "m").config == cfg
    # and arvid's own loader (read_yaml) reads the file back as written
    from arvid.config import read_yaml

    assert read_yaml(tmp_path / "m" / "config.yaml")["config"] == to_dict(cfg)


# ----------------------------------------------------------------- float edge cases of the loader


@dataclass
class NumCfg:
    x: float = doc(0.0, "a float")
    s: str = doc("", "a string")
    xs: list[float] = doc([], "floats")


def test_signed_leading_dot_floats_are_numbers(tmp_path):
    cfg = load_config(NumCfg, None, ["x=-.5e3", "xs=[+.5, -.25, .5E-1]"])
    assert cfg.x == -500.0 and cfg.xs == [0.5, -0.25, 0.05]
    p = tmp_path / "c.yaml"
    p.write_text("x: -.5\n")
    assert load_config(NumCfg, p).x == -0.5


@pytest.mark.parametrize("text", ["._e5", "._", "-._1", "1e", "e5", ".e5", "1e5.", "--1e5"])
def test_malformed_numbers_stay_strings(text):
    """No digit where float() needs one: the text is a string (never a ValueError traceback), so a
    str field takes it and a float field refuses it naming the key."""
    assert load_config(NumCfg, None, [f"s={text}"]).s == text
    with pytest.raises(ConfigError, match=r"`x` must be float, got '"):
        load_config(NumCfg, None, [f"x={text}"])


@pytest.mark.parametrize("text", ["123e4567", "1e309", "-1e400", "1.5e999", "1_000e999"])
def test_float_overflow_is_refused_naming_the_key_and_value(tmp_path, text):
    """A number that float() turns into inf is a typo more often than a wish for infinity: refused
    with the key and the value (.inf spells infinity; quotes make it a string)."""
    with pytest.raises(ConfigError, match=rf"`x` = {re.escape(text)} is out of the float range.*\.inf.*quote"):
        load_config(NumCfg, None, [f"x={text}"])
    with pytest.raises(ConfigError, match=rf"`xs\[1\]` = {re.escape(text)} is out of the float range"):
        load_config(NumCfg, None, [f"xs=[1, {text}]"])
    p = tmp_path / "c.yaml"
    p.write_text(f"s: ok\nx: {text}\n")
    with pytest.raises(ConfigError, match=rf"c\.yaml: `x` = {re.escape(text)} is out of the float range"):
        load_config(NumCfg, p)
    p.write_text(f"sub:\n  deep: [{text}]\n")
    with pytest.raises(ConfigError, match=r"`sub\.deep\[0\]` = "):
        read_yaml(p)
    # quoted, it is a string; spelled .inf, it is infinity
    assert load_config(NumCfg, None, [f"s='{text}'", "x=-.inf"]) == NumCfg(x=float("-inf"), s=text)


# ----------------------------------------------------------------- execution-only fields


@dataclass
class InnerCfg:
    lr: float = doc(1e-3, "learning rate")
    num_workers: int = doc(0, "loader workers", execution=True)


@dataclass
class OuterCfg:
    inner: InnerCfg = nested(InnerCfg, "inner")
    items: list[InnerCfg] = doc([], "a list of inner configs")
    seed: int = doc(0, "seed")
    log_every: int = doc(10, "log interval", execution=True)


def test_fingerprint_dict_leaves_out_execution_fields_at_every_depth():
    a = OuterCfg(items=[InnerCfg(num_workers=1)])
    b = OuterCfg(inner=InnerCfg(num_workers=8), items=[InnerCfg(num_workers=4)], log_every=1)
    assert to_dict(a) != to_dict(b)
    assert fingerprint_dict(a) == fingerprint_dict(b) == {"inner": {"lr": 1e-3}, "items": [{"lr": 1e-3}], "seed": 0}
    assert fingerprint_dict(OuterCfg(seed=1)) != fingerprint_dict(a)
    assert fingerprint_dict(OuterCfg(inner=InnerCfg(lr=1e-4))) != fingerprint_dict(a)
    assert execution_fields(OuterCfg) == ["inner.num_workers", "log_every"]


def test_execution_fields_of_the_sampler_and_trainer_configs():
    """The fields left out of stage fingerprints: each changes only speed, logging or checkpoint
    bookkeeping, never the outputs (precision, seeds, batch sizes, devices, cfg scales stay in)."""
    from arvid.sampling.sampler import SamplerConfig
    from arvid.stages.curate import CurateConfig
    from arvid.stages.sample import SampleConfig
    from arvid.stages.tokenize import TokenizeConfig
    from arvid.stages.train_generator import TrainGeneratorConfig
    from arvid.training import TrainerConfig

    sampler = {"check_every", "compile", "use_cache", "compile_mode", "kv_bucket", "compile_sampling",
               "decode_attention"}
    trainer = {"checkpoint_every", "keep_last", "log_every", "num_workers", "compile", "resume",
               "find_unused_parameters", "progress", "profile_start", "profile_steps", "loss_check",
               "compile_options"}
    assert set(execution_fields(SamplerConfig)) == sampler
    assert set(execution_fields(TrainerConfig)) == trainer
    assert set(execution_fields(SampleConfig)) == {f"sampler.{n}" for n in sampler}
    assert set(execution_fields(TrainGeneratorConfig)) == {"peak_tflops", "flash_impl"} | {f"trainer.{n}" for n in trainer}
    # tokenize's save_every fixes which videos each resumable chunk holds: it stays in
    assert execution_fields(TokenizeConfig) == ["num_workers"]
    assert set(execution_fields(CurateConfig)) == {"num_workers", "save_every"}

    base = SampleConfig()
    fast = from_dict(SampleConfig, {"sampler": {"compile": "eager", "compile_mode": "max-autotune-no-cudagraphs",
                                                "kv_bucket": 64, "check_every": 4, "use_cache": False}})
    assert fingerprint_dict(fast) == fingerprint_dict(base) and to_dict(fast) != to_dict(base)
    for real in ({"sampler": {"cfg_scale": 2.0}}, {"seed": 1}, {"precision": "bf16"}, {"batch_size": 8}):
        assert fingerprint_dict(from_dict(SampleConfig, real)) != fingerprint_dict(base), real
    t0 = TrainerConfig()
    assert fingerprint_dict(TrainerConfig(num_workers=4, log_every=1, progress=False, compile=True)) == \
        fingerprint_dict(t0)
    for real in ({"precision": "bf16"}, {"batch_size": 64}, {"seed": 3}, {"grad_accum": 2}, {"tf32": False}):
        assert fingerprint_dict(TrainerConfig(**real)) != fingerprint_dict(t0), real


def test_describe_marks_execution_only_fields():
    lines = describe(OuterCfg)
    marked = [ln.split(":")[0].strip() for ln in lines if ln.endswith(EXECUTION_NOTE)]
    assert marked == ["num_workers", "log_every"]
    assert EXECUTION_NOTE == "(execution only: not in the fingerprint)"


def test_the_walkthrough_stage_configs_load_and_chain():
    """The README walkthrough's shipped stage configs load, read the same videos, and each names
    the previous stage's output."""
    from arvid.stages.curate import CurateConfig
    from arvid.stages.eval_curve import EvalCurveConfig
    from arvid.stages.tokenize import TokenizeConfig
    from arvid.stages.train_router import TrainRouterConfig

    cur = load_config(CurateConfig, "configs/curate/S.yaml")
    router = load_config(TrainRouterConfig, "configs/router/S.yaml")
    tok = load_config(TokenizeConfig, "configs/tokenize/S.yaml")
    curve = load_config(EvalCurveConfig, "configs/eval/curve_S.yaml")
    assert cur.data == router.data == tok.data == curve.data
    assert router.curation == cur.out_dir and curve.curation == router.val_curation
    assert tok.router == curve.router == f"{router.out_dir}/router"
    assert cur.tokenizer == curve.tokenizer == "outputs/ucf/proxy/tokenizer"


def test_a_nested_configs_own_check_names_the_source_and_key_path():
    """TrainerConfig's ConfigError passed through without file or key path (an experiment holds
    four TrainerConfigs); it now reads like any other invalid value (2026-12-07)."""
    from arvid.stages.train_router import TrainRouterConfig

    with pytest.raises(ConfigError, match=r"^<defaults> \+ command-line overrides: invalid TrainerConfig at "
                                          r"`trainer`: TrainerConfig.warmup_steps must be >= 0, got -1$"):
        load_config(TrainRouterConfig, None, ["trainer.warmup_steps=-1"])


def test_changed_fields_count_paths_relative_to_the_experiment():
    """A pipeline stage's paths lie under its experiment folder (out_dir's parent): a moved or
    respelled experiment is the same config (the stage-level resume checks refused it, while the
    pipeline planned a resume: review of 2026-12-07). Paths outside it still count as they are."""
    from arvid.config import changed_fields
    from arvid.stages.tokenize import TokenizeConfig

    def cfg(root, data_root="/data/ucf", **kw):
        return TokenizeConfig(tokenizer=f"{root}/final/tokenizer", router=f"{root}/router/router",
                              out_dir=f"{root}/tokenize", data={"source": "folder", "root": data_root}, **kw)

    assert changed_fields(cfg("/a/exp"), cfg("/b/moved/exp")) == []
    assert changed_fields(cfg("/a/exp"), cfg("/a/exp", data_root="/data/k600")) == ["data.root"]
    assert changed_fields(cfg("/a/exp"), cfg("/a/exp", num_videos=3)) == ["num_videos"]
    assert changed_fields(cfg("/a/exp"), cfg("/a/exp", num_workers=7)) == []  # execution only


def test_every_shipped_config_loads_with_its_stage():
    """Each YAML under configs/ is a valid config of the command its folder names (a renamed field or
    a stale value in a shipped config fails here, not in a user's run)."""
    from pathlib import Path

    from arvid.pipeline import ExperimentConfig
    from arvid.stages.curate import CurateConfig
    from arvid.stages.eval_curve import EvalCurveConfig
    from arvid.stages.tokenize import TokenizeConfig
    from arvid.stages.train_generator import TrainGeneratorConfig
    from arvid.stages.train_router import TrainRouterConfig
    from arvid.stages.train_tokenizer import TrainTokenizerConfig

    by_folder = {"curate": CurateConfig, "eval": EvalCurveConfig, "experiments": ExperimentConfig,
                 "generator": TrainGeneratorConfig, "router": TrainRouterConfig, "tokenize": TokenizeConfig,
                 "tokenizer": TrainTokenizerConfig}
    root = Path(__file__).resolve().parent.parent / "configs"
    files = sorted(root.rglob("*.yaml"))
    assert len(files) >= 15
    for f in files:
        cls = by_folder[f.parent.name]
        load_config(cls, f)
    # the CPU smoke chain's paths meet: tokenizer -> curate -> router
    tok = load_config(TrainTokenizerConfig, root / "tokenizer/debug.yaml")
    cur = load_config(CurateConfig, root / "curate/debug.yaml")
    rout = load_config(TrainRouterConfig, root / "router/debug.yaml")
    assert cur.tokenizer == f"{tok.out_dir}/tokenizer" and rout.curation == cur.out_dir
    assert cur.data == rout.data
