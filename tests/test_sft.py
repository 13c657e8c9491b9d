"""SFT on a tiny real model: LoRA weights change, base weights do not, and the
run registers a complete adapter with its metrics."""

import json

import pytest
import torch

from train import registry, sft
from train.base_model import load_model, load_tokenizer
from train.chat_tokens import tokenize_chat, with_system
from train.personas import load_persona_file
from train.recipes import SFTRecipe, LoraSpec
from tests.conftest import write_jsonl

DIALOGUES = [
    ("I have an exam Thursday.", "Open the book. Now."),
    ("Should I text him back?", "Yes. One line. Send it."),
    ("I can't pick a laptop.", "Buy the lighter one. Done."),
    ("My room is a mess.", "Ten minutes. Floor first. Go."),
    ("I'm bored.", "Walk outside. Twenty minutes."),
    ("Pizza or tacos?", "Tacos. Decision made."),
]
TINY_RECIPE = SFTRecipe(lora=LoraSpec(r=4, alpha=8, dropout=0.0), epochs=2, batch_size=4,
                        learning_rate=1e-2, max_length=128, logging_steps=1)


@pytest.fixture
def tiny_persona(tmp_path):
    data = tmp_path / "personas" / "data"
    write_jsonl(data / "train.jsonl", [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]} for q, a in DIALOGUES
    ])
    write_jsonl(data / "heldout.jsonl", [{"prompt": "Tea or coffee?", "response": "Coffee. Drink it."}])
    (tmp_path / "personas" / "tiny.yaml").write_text(
        "name: tiny\ndisplay_name: Tiny\ndescription: test persona\n"
        "system_prompt: You are Tiny. Be short.\nlanguages: [en]\n"
        "data:\n  train: [{path: data/train.jsonl, language: en}]\n"
        "  heldout: [{path: data/heldout.jsonl, language: en}]\n"
    )
    return load_persona_file(tmp_path / "personas" / "tiny.yaml")


def test_training_changes_lora_weights_and_leaves_base_weights(tiny_model_dir, tiny_persona, tmp_path):
    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir))
    base_before = {k: v.clone() for k, v in model.state_dict().items()}
    model = sft.attach_lora(model, TINY_RECIPE, qlora=False)
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    assert lora_before and all(p.requires_grad == ("lora_" in n) for n, p in model.named_parameters())

    tokenized = [tokenize_chat(tokenizer, with_system(
        [{"role": "user", "content": q}, {"role": "assistant", "content": a}], "You are Tiny.")) for q, a in DIALOGUES]
    history = sft.train_lora(model, tokenizer, tokenized, TINY_RECIPE, bf16=False, cuda=False, staging=tmp_path)
    assert any("loss" in h for h in history)

    after = dict(model.named_parameters())
    changed = [n for n, before in lora_before.items() if not torch.equal(before, after[n].detach())]
    assert len(changed) == len(lora_before), "every LoRA matrix should move"
    base_after = model.get_base_model().state_dict()
    for key, before in base_before.items():
        peft_key = key.replace(".weight", ".base_layer.weight") if key not in base_after else key
        assert torch.equal(before, base_after[peft_key]), f"base weight {key} changed"


def test_run_registers_a_complete_adapter(tiny_model_dir, tiny_persona, persona_home):
    version = sft.run(tiny_persona, TINY_RECIPE, str(tiny_model_dir))
    assert version.name == "tiny-v1" and registry.active("tiny").version == 1
    files = {p.name for p in version.path.iterdir()}
    assert {"adapter_config.json", "adapter_model.safetensors", "meta.json", "metrics.json"} <= files
    assert "trainer" not in files
    meta = json.loads((version.path / "meta.json").read_text())
    for key in ("base_model", "recipe", "data_hash", "metrics", "parent_version", "created_at"):
        assert key in meta
    metrics = json.loads((version.path / "metrics.json").read_text())
    assert metrics["loss_curve"] and metrics["train_examples"] == len(DIALOGUES)
    assert metrics["heldout_nll_base"] > 0 and "heldout_nll_reduction" in meta["metrics"]


def test_a_failed_run_registers_nothing(tiny_model_dir, tiny_persona, monkeypatch):
    def crash(*args, **kwargs):
        raise RuntimeError("killed mid-training")

    monkeypatch.setattr(sft, "train_lora", crash)
    with pytest.raises(RuntimeError):
        sft.run(tiny_persona, TINY_RECIPE, str(tiny_model_dir))
    assert registry.versions("tiny") == [] and registry.active("tiny") is None
    assert not any(p.name.startswith(".staging") for p in (registry.root() / "tiny").iterdir())


@pytest.mark.skipif(not torch.cuda.is_available() and not __import__("importlib").util.find_spec("bitsandbytes"),
                    reason="bitsandbytes not installed")
def test_qlora_loads_nf4_and_trains(tiny_model_dir, tmp_path):
    """QLoRA (nf4, double quant) loads and takes a training step on this device."""
    import bitsandbytes as bnb

    tokenizer = load_tokenizer(str(tiny_model_dir))
    model = load_model(str(tiny_model_dir), qlora=True)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    model = sft.attach_lora(model, TINY_RECIPE, qlora=True)
    lora = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    tokenized = [tokenize_chat(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
                 for q, a in DIALOGUES[:4]]
    recipe = SFTRecipe(lora=TINY_RECIPE.lora, max_steps=1, batch_size=4, learning_rate=1e-2, max_length=128)
    sft.train_lora(model, tokenizer, tokenized, recipe, bf16=False, cuda=False, staging=tmp_path)
    after = dict(model.named_parameters())
    assert any(not torch.equal(v, after[n].detach()) for n, v in lora.items())


def test_padding_free_batches_keep_dialogues_independent(tiny_model_dir):
    """The recipe concatenates a batch's dialogues into one row with restarting
    position ids; the attention mask must keep them apart exactly."""
    model = load_model(str(tiny_model_dir)).eval()
    model.config.use_cache = False  # as train_lora sets it
    a, b = torch.randint(0, 1000, (1, 12)), torch.randint(0, 1000, (1, 7))
    with torch.no_grad():
        alone_a, alone_b = model(a).logits, model(b).logits
        packed = model(input_ids=torch.cat([a, b], 1),
                       position_ids=torch.cat([torch.arange(12), torch.arange(7)])[None]).logits
    assert torch.allclose(packed[0, :12], alone_a[0], atol=1e-5)
    assert torch.allclose(packed[0, 12:], alone_b[0], atol=1e-5)


def test_labelled_positions_loss_equals_the_models_own_loss(tiny_model_dir, tokenizer):
    model = load_model(str(tiny_model_dir))
    model.config.use_cache = False
    rows = [tokenize_chat(tokenizer, [{"role": "user", "content": q}, {"role": "assistant", "content": a}])
            for q, a in DIALOGUES[:3]]
    ids = torch.tensor([sum((r.input_ids for r in rows), [])])
    labels = torch.tensor([sum((r.labels for r in rows), [])])
    positions = torch.tensor([sum((list(range(len(r.input_ids))) for r in rows), [])])
    inputs = {"input_ids": ids, "position_ids": positions, "labels": labels}
    with torch.no_grad():
        expected = model(**inputs).loss
        lean = sft.labelled_positions_loss(model, inputs)
    assert torch.allclose(lean, expected, atol=1e-5)


def test_recipe_that_leaves_no_data_is_a_clear_error(tiny_model_dir, tiny_persona):
    from train.config import ConfigError

    with pytest.raises(ConfigError, match="no training data in languages"):
        sft.run(tiny_persona, SFTRecipe(languages=["ko"]), str(tiny_model_dir))
    with pytest.raises(ConfigError, match="longer than the recipe's max_length=8"):
        sft.run(tiny_persona, SFTRecipe(max_length=8), str(tiny_model_dir))
    assert registry.versions("tiny") == []
