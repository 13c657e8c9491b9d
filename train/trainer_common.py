"""What the training steps (``train/sft.py``, ``train/dpo.py``) share: their common
command-line flags, the recipe switches, the base model in the recipe's precision, the
TrainingArguments fields both set the same way, the matmul precision while training,
and the staging folder a new adapter version is written into.

    with staged("teto") as staging:        # removed if anything fails: never half-registered
        ...
        registry.commit("teto", staging, meta)
"""

from __future__ import annotations

import argparse
import json
import time
from contextlib import contextmanager
from pathlib import Path

from train import base_model, registry
from train.recipes import TrainingRecipe, override


def add_common_arguments(parser: argparse.ArgumentParser, recipe_help: str) -> None:
    """The flags every ``persona train KIND`` takes; they override the recipe."""
    parser.add_argument("--persona", required=True, help="persona name, e.g. teto")
    parser.add_argument("--recipe", help=recipe_help)
    parser.add_argument("--qlora", action="store_true", default=None,
                        help="load the base model in 4-bit nf4 with double quantization (QLoRA)")
    parser.add_argument("--base-model", help="base model folder or hub id (default: PERSONA_BASE_MODEL)")
    parser.add_argument("--epochs", type=float, help="override the recipe's epochs")
    parser.add_argument("--max-steps", type=int, help="override the recipe's max_steps")
    parser.add_argument("--learning-rate", type=float, help="override the recipe's learning_rate")


def apply_arguments(recipe: TrainingRecipe, args: argparse.Namespace, **changes) -> TrainingRecipe:
    """The recipe with the common flags (and ``changes``) that were given applied."""
    return override(recipe, epochs=args.epochs, max_steps=args.max_steps, learning_rate=args.learning_rate,
                    qlora="on" if args.qlora else None, **changes)


def switch(value: str, cuda: bool) -> bool:
    """A recipe's "auto"/"on"/"off" switch: "auto" means on only on CUDA."""
    return value == "on" or (value == "auto" and cuda)


def load_base(base: str, recipe: TrainingRecipe, cuda: bool):
    """The base model in the recipe's precision: (model, qlora, bf16). bf16 needs CUDA (on a
    CPU it slows a small model down several times)."""
    import torch

    qlora, bf16 = switch(recipe.qlora, cuda), switch(recipe.bf16, cuda) and cuda
    model = base_model.load_model(base, device="cuda" if cuda else "cpu",
                                  dtype=torch.bfloat16 if bf16 else torch.float32, qlora=qlora)
    return model, qlora, bf16


def schedule_fields(recipe: TrainingRecipe, cuda: bool, output_dir: Path) -> dict:
    """The TrainingArguments fields every recipe (SFT, DPO/KTO) sets the same way."""
    return dict(
        output_dir=str(output_dir),
        num_train_epochs=recipe.epochs,
        max_steps=recipe.max_steps,
        per_device_train_batch_size=recipe.batch_size,
        gradient_accumulation_steps=recipe.grad_accum,
        learning_rate=recipe.learning_rate,
        lr_scheduler_type=recipe.lr_scheduler,
        warmup_steps=recipe.warmup_ratio,  # a float below 1 is a ratio of total steps
        seed=recipe.seed,
        gradient_checkpointing=switch(recipe.gradient_checkpointing, cuda),
        use_cpu=not cuda,
        logging_steps=recipe.logging_steps,
        save_strategy="no",
        report_to="none",
        dataloader_num_workers=0,
    )


@contextmanager
def matmul_precision(value: str):
    """Set torch's float32 matmul precision for the duration of a block."""
    import torch

    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(value)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(previous)


@contextmanager
def staged(persona: str):
    """A staging folder for the persona's next version; on any failure (a kill included,
    where the folder stays but the registry never lists it) nothing is registered."""
    staging = registry.staging_dir(persona)
    try:
        yield staging
    except BaseException:
        registry.discard(staging)
        raise


def write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2), encoding="utf-8")


def utc_stamp() -> str:
    """The ``created_at`` of an adapter's metadata."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
