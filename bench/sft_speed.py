"""SFT step time: our recipe against TRL's defaults and single changes, in one run.

    persona bench sft [--persona teto] [--steps 6] [--base-model gemma-3-270m|PATH]

Every configuration trains a fresh LoRA adapter on the same dialogues, in the
same order, for the same number of steps; the first step (warm-up) is not
timed. Prints seconds per step, answer-plus-prompt tokens per second, and
each configuration's speed relative to our recipe.
"""

from __future__ import annotations

import argparse
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--persona", default="teto")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--base-model", help="a built-in model name or a model folder (default: PERSONA_BASE_MODEL)")


def configurations(recipe):
    """(label, recipe, lean loss) for each variant."""
    trl_lora = replace(recipe, lora=replace(recipe.lora, dropout=0.05), float32_matmul_precision="highest")
    return [
        ("ours", recipe, True),
        ("ours, full fp32 matmuls", replace(recipe, float32_matmul_precision="highest"), True),
        ("ours, TRL's fused loss", recipe, False),
        ("ours, padded batches", replace(recipe, padding_free=False), True),
        ("ours, LoRA dropout 0.05", replace(recipe, lora=trl_lora.lora), True),
        ("TRL defaults", replace(trl_lora, padding_free=False, bf16="on", gradient_checkpointing="on"), False),
    ]


def time_steps(trainer) -> list[float]:
    from transformers import TrainerCallback

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

        def on_train_end(self, args, state, control, **kw):
            stamps.append(time.perf_counter())

    trainer.add_callback(Clock())
    trainer.train()
    return [b - a for a, b in zip(stamps, stamps[1:])]


def main(args: argparse.Namespace) -> None:
    from bench import ready
    from train import base_model, sft
    from train.data import load_files
    from train.evaluate import tokenize_examples
    from train.personas import load_persona
    from train.recipes import load_recipe, sft_languages
    from train.trainer_common import matmul_precision

    from bench.serve_speed import model_label

    persona = load_persona(args.persona)
    recipe = load_recipe(persona.recipe)
    base = base_model.resolve(args.base_model) if args.base_model else ready.base_model()
    tokenizer = base_model.load_tokenizer(base)
    languages = sft_languages(recipe, base)
    files = [(persona.resolve(f.path), f.language) for f in persona.files("train", languages)]
    tokenized = tokenize_examples(tokenizer, load_files(files, languages), persona.system_prompt)
    steps = args.steps + 1
    random.Random(0).shuffle(tokenized)
    sample = tokenized[: steps * recipe.batch_size]
    tokens_per_step = sum(len(t.input_ids) for t in sample[recipe.batch_size:]) / args.steps

    rows = []
    for label, variant, lean in configurations(recipe):
        console.print(f"[bold]{label}[/]: {steps} steps ...")
        model = sft.attach_lora(base_model.load_model(base), variant, qlora=False)
        with tempfile.TemporaryDirectory() as tmp:
            config = sft.sft_config(replace(variant, max_steps=steps, logging_steps=steps), variant.bf16 == "on",
                                    False, Path(tmp), train_sampling_strategy="sequential", disable_tqdm=True)
            trainer = sft.make_trainer(model, tokenizer, sample, config, lean_loss=lean)
            with matmul_precision(variant.float32_matmul_precision):
                times = time_steps(trainer)
        per_step = sum(times[1:]) / len(times[1:])
        rows.append((label, per_step))

    table = Table("configuration", "s/step", "tokens/s", "speed vs ours",
                  title=f"SFT steps on {args.persona} with {model_label(base)} ({'+'.join(languages)} data): "
                        f"batch {recipe.batch_size}, "
                        f"{tokens_per_step:.0f} tokens/step, {args.steps} timed steps",
                  caption="ours: fp32 weights with bf16 matmul products, padding-free batches, lean loss "
                          "(logits at answer positions only), no LoRA dropout. TRL defaults: bf16 autocast, "
                          "gradient checkpointing, padded batches, fused loss with metrics, LoRA dropout 0.05.")
    ours = rows[0][1]
    for label, per_step in rows:
        table.add_row(label, f"{per_step:.2f}", f"{tokens_per_step / per_step:.0f}", f"{ours / per_step:.2f}x")
    console.print(table)
