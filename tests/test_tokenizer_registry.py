"""The tokenizer registry: built-ins, presets, and third-party plug-ins through entry points."""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch

from arvid.config import ConfigError
from arvid.tokenizer import base
from arvid.tokenizer.base import available_tokenizers, build_tokenizer, tokenizer_class

PLUGIN = textwrap.dedent('''
    from dataclasses import dataclass

    import torch
    from torch import nn

    from arvid.data.types import BlockLayout, TokenizedVideo
    from arvid.pretrained import PretrainedMixin


    @dataclass
    class PlugConfig:
        scale: int = 2


    class PlugTokenizer(nn.Module, PretrainedMixin):
        config_class = PlugConfig

        def __init__(self, config):
            super().__init__()
            self.config = config
            self.layout = BlockLayout((1,), (4,))
            self.codebook_size = 16
            self.w = nn.Parameter(torch.zeros(1))

        @classmethod
        def presets(cls):
            return {"tiny": {"scale": 3}}

        def encode(self, video, assignment=None):
            b = video.shape[0]
            return TokenizedVideo(torch.arange(4 * b) % 16, torch.full((b, 1), 4))

        def decode(self, tokens):
            return torch.zeros(tokens.batch_size, 3, 1, 2, 2)
''')


@pytest.fixture
def plugin_on_path(tmp_path, monkeypatch):
    pkg = tmp_path / "myplug_pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(PLUGIN)
    dist = tmp_path / "myplug-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: myplug\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[arvid.tokenizers]\nmyplug = myplug_pkg:PlugTokenizer\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    registry = dict(base._REGISTRY)
    yield tmp_path
    base._REGISTRY.clear()
    base._REGISTRY.update(registry)
    sys.modules.pop("myplug_pkg", None)


def test_entry_point_plugin_loads(plugin_on_path, tmp_path):
    cls = tokenizer_class("myplug")
    assert cls.__name__ == "PlugTokenizer" and cls.__module__ == "myplug_pkg"
    assert cls.model_kind == "myplug"
    assert "myplug" in available_tokenizers()
    tok = build_tokenizer("myplug", preset="tiny")
    assert tok.config.scale == 3
    tv = tok.encode(torch.zeros(2, 3, 1, 2, 2))
    assert tv.codes.numel() == 8
    # save/load through the generic loader finds the plug-in by the kind written in config.yaml
    tok.save_pretrained(tmp_path / "saved")
    loaded = base.load_tokenizer(tmp_path / "saved")
    assert type(loaded) is cls and loaded.config.scale == 3


def test_builtins_and_errors():
    assert {"evatok", "grid3d"} <= set(available_tokenizers())
    with pytest.raises(ConfigError, match="did you mean 'evatok'"):
        tokenizer_class("evatk")
    with pytest.raises(ConfigError, match="no preset 'XL'"):
        build_tokenizer("evatok", preset="XL")
    with pytest.raises(ConfigError, match="unknown key `tokenizer.dimm`"):
        build_tokenizer("evatok", preset="debug", config={"dimm": 3})
    for name in ("evatok", "grid3d"):
        presets = tokenizer_class(name).presets()
        assert "debug" in presets and "B" in presets
