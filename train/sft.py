"""Supervised fine-tuning of a persona's LoRA adapter with TRL's SFTTrainer.

    persona train sft --persona teto [--recipe FILE] [--qlora] [--epochs N]

Conversations are rendered with the base model's own chat template and only
assistant tokens carry loss (see ``train/chat_tokens.py``). On a CPU the run
stays in fp32 without gradient checkpointing (both slow a small model down
several times there); on CUDA the recipe's "auto" switches turn on bf16 and
QLoRA. The adapter, its ``meta.json`` and ``metrics.json`` (loss curve,
held-out NLL of base and adapter) land in ``PERSONA_HOME/adapters/<persona>/v<N>``.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import asdict, replace
from pathlib import Path

from rich.console import Console

from train import base_model, registry
from train.chat_tokens import IGNORE
from train.config import ConfigError
from train.data import data_hash, load_files
from train.evaluate import nll_by_language, pooled, tokenize_examples
from train.personas import Persona, load_persona
from train.recipes import SFTRecipe, load_recipe, sft_languages
from train.trainer_common import (add_common_arguments, apply_arguments, load_base, matmul_precision,
                                  schedule_fields, staged, utc_stamp, write_json)

log = logging.getLogger(__name__)
console = Console(stderr=True)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "recipe name or YAML path (default: the persona's recipe)")
    parser.add_argument("--languages", help="comma-separated languages to train on, e.g. en,ko")
    parser.add_argument("--no-activate", dest="activate", action="store_false",
                        help="register the adapter without making it the persona's active version")


def main(args: argparse.Namespace) -> registry.AdapterVersion:
    persona = load_persona(args.persona)
    recipe = apply_arguments(load_recipe(args.recipe or persona.recipe), args,
                             languages=args.languages.split(",") if args.languages else None)
    base = base_model.resolve(args.base_model)
    return run(persona, recipe, base, activate=args.activate)


def run(persona: Persona, recipe: SFTRecipe, base: str, activate: bool = True) -> registry.AdapterVersion:
    """Train one adapter and register it; returns the new version."""
    import torch

    started = time.time()
    cuda = torch.cuda.is_available()
    # Recorded with the languages it trains, so that the retraining step measures the same ones.
    recipe = replace(recipe, languages=sft_languages(recipe, base))
    tokenizer = base_model.load_tokenizer(base)
    train_files = [(persona.resolve(f.path), f.language) for f in persona.files("train", recipe.languages)]
    heldout_files = [(persona.resolve(f.path), f.language) for f in persona.files("heldout", recipe.languages)]
    if not train_files:
        raise ConfigError(f"persona {persona.name} has no training data in languages {recipe.languages}")
    train_examples = load_files(train_files, recipe.languages)
    heldout_examples = load_files(heldout_files, recipe.languages)
    train_tok = tokenize_examples(tokenizer, train_examples, persona.system_prompt)
    kept = [t for t in train_tok if len(t.input_ids) <= recipe.max_length and t.n_answer_tokens]
    dropped = len(train_tok) - len(kept)
    if not kept:
        raise ConfigError(f"persona {persona.name}: all {len(train_tok)} training dialogues are longer than "
                          f"the recipe's max_length={recipe.max_length} tokens")
    heldout_tok = tokenize_examples(tokenizer, heldout_examples, persona.system_prompt)
    model, qlora, bf16 = load_base(base, recipe, cuda)
    console.print(
        f"[bold]SFT[/] persona={persona.name} base={base} device={'cuda' if cuda else 'cpu'} qlora={qlora} "
        f"bf16={bf16}\n"
        f"  train: {len(kept)} dialogues, {sum(len(t.input_ids) for t in kept)} tokens"
        f" ({dropped} longer than max_length={recipe.max_length} skipped); "
        f"held-out: {len(heldout_tok)} prompts; languages={recipe.languages}"
    )
    pad_id = tokenizer.pad_token_id
    heldout_langs = [e.language for e in heldout_examples]
    base_eval = nll_by_language(model, heldout_tok, heldout_langs, pad_id) if heldout_tok else None

    model = attach_lora(model, recipe, qlora)
    with staged(persona.name) as staging:  # nothing half-written is ever registered
        history = train_lora(model, tokenizer, kept, recipe, bf16, cuda, staging)
        adapter_eval = nll_by_language(model, heldout_tok, heldout_langs, pad_id) if heldout_tok else None
        model.save_pretrained(staging)
        metrics = _metrics(history, base_eval, adapter_eval, len(kept), dropped, time.time() - started)
        write_json(staging / "metrics.json", metrics)
        meta = {
            "kind": "sft",
            "base_model": base,
            "recipe": asdict(recipe),
            "data_hash": data_hash([p for p, _ in train_files], recipe.languages),
            "data_files": [str(p.relative_to(persona.resolve("."))) for p, _ in train_files],
            "metrics": {k: v for k, v in metrics.items() if k != "loss_curve"},
            "parent_version": None,
            "created_at": utc_stamp(),
            "qlora": qlora,
        }
        version = registry.commit(persona.name, staging, meta)
    if activate:
        registry.set_active(persona.name, version.version, reason="sft")
    _report(version, metrics, activate)
    return version


def attach_lora(model, recipe: SFTRecipe, qlora: bool):
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    if qlora:
        model = prepare_model_for_kbit_training(
            model, use_gradient_checkpointing=recipe.gradient_checkpointing == "on")
    layers = None
    if recipe.lora.top_layers:
        total = model.config.num_hidden_layers
        layers = list(range(max(total - recipe.lora.top_layers, 0), total))
    config = LoraConfig(
        r=recipe.lora.r, lora_alpha=recipe.lora.alpha, lora_dropout=recipe.lora.dropout,
        target_modules=recipe.lora.target_modules, layers_to_transform=layers,
        task_type="CAUSAL_LM", bias="none",
    )
    return get_peft_model(model, config)


def sft_config(recipe: SFTRecipe, bf16: bool, cuda: bool, output_dir: Path, **overrides):
    """TRL's SFTConfig for a recipe; ``overrides`` are SFTConfig fields (the benchmark uses them)."""
    from trl import SFTConfig

    fields = dict(
        schedule_fields(recipe, cuda, output_dir),
        weight_decay=recipe.weight_decay,
        # Longer dialogues were already dropped (never cut mid-answer), so the
        # trainer has nothing to truncate.
        max_length=None,
        bf16=bf16,
        padding_free=recipe.padding_free,
        train_sampling_strategy="group_by_length" if recipe.group_by_length else "random",
        disable_tqdm=False,
        dataset_kwargs={"skip_prepare_dataset": True},
    )
    fields.update(overrides)
    return SFTConfig(**fields)


def make_trainer(model, tokenizer, tokenized, config, lean_loss: bool = True):
    """An SFTTrainer over pre-tokenized dialogues (input ids + assistant-only labels)."""
    from datasets import Dataset
    from trl import SFTTrainer

    dataset = Dataset.from_dict({
        "input_ids": [t.input_ids for t in tokenized],
        "labels": [t.labels for t in tokenized],
    })
    # A KV cache during training would also disable transformers' detection of
    # packed sequences, letting padding-free dialogues attend to each other.
    model.config.use_cache = False
    cls = _lean_trainer_class() if lean_loss else SFTTrainer
    return cls(model=model, args=config, train_dataset=dataset, processing_class=tokenizer)


def train_lora(model, tokenizer, tokenized, recipe: SFTRecipe, bf16: bool, cuda: bool, staging: Path) -> list[dict]:
    """Train the LoRA weights in place; returns the trainer's log history."""
    import shutil

    config = sft_config(recipe, bf16, cuda, staging / "trainer")
    trainer = make_trainer(model, tokenizer, tokenized, config)
    with matmul_precision(recipe.float32_matmul_precision):
        trainer.train()
    shutil.rmtree(staging / "trainer", ignore_errors=True)
    return trainer.state.log_history


def _lean_trainer_class():
    """SFTTrainer with a leaner loss for small models on a CPU.

    TRL's default loss runs a fused LM-head pass that also computes per-token
    entropy and top-1 accuracy for logging; on a CPU that made 12 steps take
    37.0 s instead of 26.7 s. With padding-free batches (one packed row) we go
    further: only positions whose next token is labelled get logits, so the
    49k-wide LM head and its softmax skip every prompt token. The loss is the
    same mean NLL over labelled tokens (``tests/test_sft.py`` checks it
    against the model's own loss).
    """
    from transformers import Trainer
    from trl import SFTTrainer

    class LeanSFTTrainer(SFTTrainer):
        def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
            inputs["use_cache"] = False
            labels = inputs.get("labels")
            if return_outputs or labels is None or labels.size(0) != 1:
                return Trainer.compute_loss(self, model, inputs, return_outputs, num_items_in_batch)
            return labelled_positions_loss(model, inputs, num_items_in_batch)

    return LeanSFTTrainer


def labelled_positions_loss(model, inputs: dict, num_items_in_batch=None):
    """Causal-LM loss for one packed row, computing logits only where a label follows."""
    import torch

    inputs = dict(inputs)
    targets = inputs.pop("labels")[0, 1:]
    keep = (targets != IGNORE).nonzero().squeeze(1)
    logits = model(**inputs, logits_to_keep=keep).logits[0]
    total = torch.nn.functional.cross_entropy(logits.float(), targets[keep], reduction="sum")
    # Like transformers' loss: divide by the labelled tokens of the whole
    # (accumulated) batch when the trainer counted them, else by this row's.
    return total / (num_items_in_batch if num_items_in_batch is not None else max(keep.numel(), 1))


def _metrics(history, base_eval, adapter_eval, n_train, n_dropped, seconds) -> dict:
    curve = [[h["step"], round(h["loss"], 4)] for h in history if "loss" in h]
    final = next((h for h in reversed(history) if "train_loss" in h), {})
    metrics = {
        "loss_curve": curve,
        "train_loss": final.get("train_loss"),
        "train_steps": history[-1].get("step") if history else 0,
        "train_examples": n_train,
        "skipped_too_long": n_dropped,
        "train_seconds": round(seconds, 1),
    }
    if base_eval and adapter_eval:
        metrics.update(_heldout(pooled(base_eval), pooled(adapter_eval)))
        # Per language too: {"en": {"heldout_nll_base": ..., "heldout_nll_adapter": ..., ...}, "ko": ...}
        metrics["heldout_by_language"] = {lang: _heldout(base_eval[lang], adapter_eval[lang]) for lang in base_eval}
    return metrics


def _heldout(base: dict, adapter: dict) -> dict:
    return {
        "heldout_nll_base": round(base["mean_nll"], 4),
        "heldout_nll_adapter": round(adapter["mean_nll"], 4),
        "heldout_nll_reduction": round(1 - adapter["mean_nll"] / base["mean_nll"], 4) if base["mean_nll"] else None,
        "heldout_answer_tokens": adapter["answer_tokens"],
        "heldout_examples": adapter["examples"],
    }


def _report(version: registry.AdapterVersion, metrics: dict, activate: bool) -> None:
    console.print(f"[bold green]Saved[/] {version.name} in {version.path}"
                  + (" (now active)" if activate else " (not activated)"))
    if "heldout_nll_base" in metrics:
        console.print(
            f"Held-out NLL per answer token: base {metrics['heldout_nll_base']:.3f} -> "
            f"adapter {metrics['heldout_nll_adapter']:.3f} "
            f"({metrics['heldout_nll_reduction']:.1%} lower, {metrics['heldout_examples']} prompts)"
        )
        for lang, m in metrics.get("heldout_by_language", {}).items():
            console.print(f"  {lang}: {m['heldout_nll_base']:.3f} -> {m['heldout_nll_adapter']:.3f} "
                          f"({m['heldout_nll_reduction'] or 0:.1%} lower, {m['heldout_examples']} prompts)")
    console.print(f"Training took {metrics['train_seconds']:.0f} s ({metrics['train_steps']} steps)")
