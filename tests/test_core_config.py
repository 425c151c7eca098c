"""arvid.config: strict typed configs, overrides, clear errors."""

from dataclasses import dataclass
from typing import Literal

import pytest

from arvid.config import (
    ConfigError,
    apply_overrides,
    config_fingerprint,
    doc,
    from_dict,
    load_config,
    nested,
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
