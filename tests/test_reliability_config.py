"""Config errors: wrong types, unknown keys, impossible values -> ConfigError naming the key, never
another exception (property-based over every stage's config and the model configs).
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import types
import typing
from typing import Any, Literal, Union, get_args, get_origin

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arvid.config import ConfigError, from_dict, load_config

CONFIGS = [
    ("arvid.stages.train_tokenizer", "TrainTokenizerConfig"),
    ("arvid.stages.curate", "CurateConfig"),
    ("arvid.stages.train_router", "TrainRouterConfig"),
    ("arvid.stages.tokenize", "TokenizeConfig"),
    ("arvid.stages.train_generator", "TrainGeneratorConfig"),
    ("arvid.stages.sample", "SampleConfig"),
    ("arvid.training", "TrainerConfig"),
    ("arvid.data.datasets", "DataConfig"),
    ("arvid.tokenizer.evatok", "EVATokConfig"),
    ("arvid.generator.gpt", "GPTConfig"),
    ("arvid.sampling.sampler", "SamplerConfig"),
]


def _cls(mod: str, name: str) -> type:
    return getattr(importlib.import_module(mod), name)


# anything YAML can hold (plus NaN / inf, which YAML's .nan / .inf give)
scalars = st.one_of(st.none(), st.booleans(), st.integers(-10**6, 10**6), st.sampled_from([0, -1, 1, 2**40]),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=8),
                    st.sampled_from(["", "auto", "fp32", "cosine", "debug", "1e-3", "null", "/nonexistent"]))
yaml_values = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                            st.dictionaries(st.text(max_size=6), inner, max_size=3)),
                           max_leaves=8)


def value_for(tp: Any, depth: int = 0) -> st.SearchStrategy:
    """Values near the annotation ``tp`` (right type, edge values) mixed with arbitrary wrong ones."""
    origin = get_origin(tp)
    right: st.SearchStrategy
    if origin is Literal:
        right = st.sampled_from(list(get_args(tp)))
    elif origin in (Union, types.UnionType):
        right = st.one_of([value_for(a, depth) for a in get_args(tp) if a is not type(None)] + [st.none()])
    elif dataclasses.is_dataclass(tp):
        right = config_dicts(tp, depth + 1) if depth < 2 else st.just({})
    elif origin in (list, tuple) or tp in (list, tuple):
        args = [a for a in get_args(tp) if a is not Ellipsis] or [Any]
        right = st.lists(value_for(args[0], depth + 1), max_size=5)
    elif origin is dict or tp is dict:
        right = st.dictionaries(st.text(max_size=6), scalars, max_size=3)
    elif tp is bool:
        right = st.booleans()
    elif tp is int:
        right = st.one_of(st.integers(-3, 40), st.sampled_from([0, -1, 10**9]))
    elif tp is float:
        right = st.one_of(st.floats(-5, 5), st.sampled_from([0.0, -1.0, 1.0, float("nan"), float("inf")]))
    elif tp is str:
        right = st.text(max_size=8)
    else:
        right = yaml_values
    return st.one_of(right, right, yaml_values)  # two parts near the type, one part anything


def config_dicts(cls: type, depth: int = 0) -> st.SearchStrategy:
    """Partial config dicts of ``cls``: a subset of its keys with near-type values, sometimes an unknown key."""
    hints = typing.get_type_hints(cls)
    fields = [f.name for f in dataclasses.fields(cls) if f.init]
    known = st.fixed_dictionaries({}, optional={n: value_for(hints[n], depth) for n in fields})
    unknown = st.dictionaries(st.text(min_size=1, max_size=8).filter(lambda k: k not in fields), yaml_values,
                              max_size=1)
    return st.builds(lambda a, b: {**a, **b}, known, st.one_of(st.just({}), st.just({}), unknown))


@pytest.mark.parametrize("mod,name", CONFIGS)
def test_random_configs_give_a_config_or_a_config_error(mod, name):
    cls = _cls(mod, name)

    @settings(max_examples=int(os.environ.get("ARVID_HYPOTHESIS_EXAMPLES", 60)), deadline=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(data=config_dicts(cls))
    def check(data):
        try:
            obj = from_dict(cls, data, source="test.yaml")
        except ConfigError as e:
            # the message says what is wrong; from_dict prefixes the file except where a config's own
            # __post_init__ raises ConfigError (TrainerConfig): then it names the class and field
            msg = str(e)
            assert msg.startswith("test.yaml") or f"{cls.__name__}." in msg or "Config." in msg, msg
            return
        assert isinstance(obj, cls)

    check()


@pytest.mark.parametrize("text", ["max_steps: [1, 2", "- 1\n- 2\n", "a: b: c", "\t- x", "42", "max_steps: 1\nnope: 2"])
def test_broken_yaml_files_are_config_errors(tmp_path, text):
    from arvid.training import TrainerConfig

    p = tmp_path / "c.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError, match="c.yaml"):
        load_config(TrainerConfig, p)


def test_config_error_messages_name_the_key_and_the_expected_type(tmp_path):
    from arvid.stages.train_tokenizer import TrainTokenizerConfig

    p = tmp_path / "tok.yaml"
    p.write_text("trainer:\n  max_steps: ten\n")
    with pytest.raises(ConfigError, match=r"tok\.yaml: `trainer\.max_steps` must be int, got 'ten'"):
        load_config(TrainTokenizerConfig, p)
    p.write_text("trainer:\n  max_step: 10\n")
    with pytest.raises(ConfigError, match=r"unknown key `trainer\.max_step`.*did you mean `trainer\.max_steps`"):
        load_config(TrainTokenizerConfig, p)
    p.write_text("stage: proxi\n")
    with pytest.raises(ConfigError, match=r"`stage` must be .*did you mean 'proxy'"):
        load_config(TrainTokenizerConfig, p)
    with pytest.raises(ConfigError, match="must look like key.path=value"):
        load_config(TrainTokenizerConfig, None, ["trainer.max_steps"])
    with pytest.raises(ConfigError, match="`data` is not a section"):
        load_config(TrainTokenizerConfig, None, ["data=3", "data.frames=2"])
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TrainTokenizerConfig, tmp_path / "missing.yaml")


def test_a_misspelt_tokenizer_param_is_named_as_written_before_the_run_dir_exists(tmp_path):
    """`tokenizer.params` is a free dict until the tokenizer's own config class reads it: a misspelt
    key there is refused before train-tokenizer makes its run directory, named as the user wrote
    it (`tokenizer.params.<key>`), with the closest valid key (it was named `tokenizer.<key>`,
    against the run directory's config.yaml, after the directory was made)."""
    from arvid.stages.train_tokenizer import TrainTokenizerConfig, run

    out = tmp_path / "run"
    cfg = load_config(TrainTokenizerConfig, None, ["tokenizer.params.candidatez=[4,8]", f"out_dir={out}"])
    with pytest.raises(ConfigError, match=r"unknown key `tokenizer\.params\.candidatez`.*did you mean "
                                          r"`tokenizer\.params\.candidates`"):
        run(cfg)
    assert not out.exists()
    with pytest.raises(ConfigError, match="stage final needs `router`"):
        load_config(TrainTokenizerConfig, None, ["stage=final"])


def test_cli_turns_config_errors_into_one_line(tmp_path, capsys):
    from arvid.cli import main

    p = tmp_path / "gen.yaml"
    p.write_text("trainer: {max_steps: -x}\n")
    assert main(["train-generator", str(p), "bogus_key=1"]) == 1
    err = capsys.readouterr().err
    assert "error:" in err and "bogus_key" in err and "Traceback" not in err
