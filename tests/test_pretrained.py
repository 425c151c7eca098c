"""``save_pretrained`` / ``from_pretrained``: what a directory holds comes back as it was saved,
and a damaged directory is an error naming the file."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn

from arvid.config import ConfigError
from arvid.pretrained import CONFIG_NAME, PretrainedMixin


@dataclass
class TinyConfig:
    dim: int = 4


class Tiny(nn.Module, PretrainedMixin):
    config_class = TinyConfig
    model_kind = "tiny"

    def __init__(self, config: TinyConfig) -> None:
        super().__init__()
        self.config = config
        self.lin = nn.Linear(config.dim, config.dim)
        self.norm = nn.LayerNorm(config.dim)
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))


def _tiny(seed=0):
    torch.manual_seed(seed)
    return Tiny(TinyConfig(dim=4))


def test_round_trip_keeps_the_config_the_weights_and_float32(tmp_path):
    m = _tiny()
    loaded = Tiny.from_pretrained(m.save_pretrained(tmp_path / "m"))
    assert loaded.config == m.config and loaded.fingerprint() == m.fingerprint()
    assert {p.dtype for p in loaded.parameters()} == {torch.float32}


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_model_saved_in_half_precision_loads_in_it(tmp_path, dtype):
    """load_state_dict cast the saved bf16 weights into the float32 model built from the config: the
    loaded model computed in float32 and its fingerprint was not the saved model's."""
    m = _tiny().to(dtype)
    loaded = Tiny.from_pretrained(m.save_pretrained(tmp_path / "m"))
    assert {p.dtype for p in loaded.parameters()} == {dtype}
    assert loaded.steps.dtype == torch.long
    assert torch.equal(loaded.lin.weight, m.lin.weight)
    assert loaded.fingerprint() == m.fingerprint()


def test_a_model_saved_in_mixed_precision_loads_tensor_by_tensor(tmp_path):
    m = _tiny()
    m.lin.to(torch.bfloat16)  # the norm stays in float32
    loaded = Tiny.from_pretrained(m.save_pretrained(tmp_path / "m"))
    assert (loaded.lin.weight.dtype, loaded.lin.bias.dtype) == (torch.bfloat16, torch.bfloat16)
    assert (loaded.norm.weight.dtype, loaded.norm.bias.dtype) == (torch.float32, torch.float32)
    assert isinstance(loaded.lin.weight, nn.Parameter) and loaded.lin.weight.requires_grad
    assert loaded.fingerprint() == m.fingerprint()


@pytest.mark.parametrize("text,got", [("kind: tiny\nconfig: [1, 2]\n", "list"), ("kind: tiny\nconfig: abc\n", "str"),
                                      ("kind: tiny\n", "nothing")])
def test_a_config_that_is_not_a_mapping_is_named(tmp_path, text, got):
    """`config: [1, 2]` was a TypeError (a traceback from the CLI), `config: abc` a ValueError about
    'dictionary update sequence'; a missing `config` silently built the default config."""
    d = _tiny().save_pretrained(tmp_path / "m")
    (d / CONFIG_NAME).write_text(text)
    with pytest.raises(ConfigError, match=rf"config.yaml': `config` must be a mapping of TinyConfig fields, got {got}$"):
        Tiny.from_pretrained(d)


def test_damaged_or_foreign_directories_are_named(tmp_path):
    d = _tiny().save_pretrained(tmp_path / "m")
    other = type("Other", (Tiny,), {"model_kind": "other"})
    with pytest.raises(ConfigError, match="holds a 'tiny', not a 'other'"):
        other.from_pretrained(d)
    weights = d / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:40])
    with pytest.raises(OSError, match="model.safetensors' is not a readable safetensors file"):
        Tiny.from_pretrained(d)
    weights.unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors' does not exist"):
        Tiny.from_pretrained(d)
