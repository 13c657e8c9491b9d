"""DPO step time: our recipe (each pair packed with its prompt computed once), the same
with every pair unpacked (prompt computed for chosen and rejected), TRL's default
DPOConfig, and a plain forward + backward of the unpacked tokens.

    persona bench train [--steps 4] [--batch-size 4] [--base-model PATH]

All runs train the same preference pairs (a persona's answers as chosen,
another persona's as rejected) from the same LoRA adapter, in one process, one
after another. "plain fwd+bwd" runs the LoRA model forward and backward over
exactly the sequences one DPO step sees (chosen and rejected of each pair,
padded as TRL pads them), without any DPO machinery: the floor a step can get
near. The FLOP estimate is 6 x parameters x tokens (forward 2, backward 4).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(width=170)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=4, help="timed steps per configuration (after one warm-up)")
    parser.add_argument("--batch-size", type=int, default=4, help="pairs per step")
    parser.add_argument("--base-model", help="base model (default: PERSONA_BASE_MODEL)")


def bench_pairs(count: int) -> list[dict]:
    """teto's answers chosen over egen's, to teto's prompts (conversational DPO rows)."""
    from train.data import load_files
    from train.personas import load_persona

    teto, egen = load_persona("teto"), load_persona("egen")
    mine = load_files([(teto.resolve(f.path), f.language) for f in teto.files("train", ["en"])], ["en"])
    other = load_files([(egen.resolve(f.path), f.language) for f in egen.files("train", ["en"])], ["en"])
    rows = []
    for a, b in zip(mine, other):
        if len(a.messages) != 2 or len(b.messages) != 2:
            continue  # single-turn dialogues only
        rows.append({"prompt": [{"role": "system", "content": teto.system_prompt}, a.messages[0]],
                     "chosen": [a.messages[1]], "rejected": [b.messages[1]]})
        if len(rows) == count:
            break
    return rows


class StepTimer:
    """A trainer callback that records the wall time of each optimizer step."""

    def __new__(cls):
        from transformers import TrainerCallback

        class _Timer(TrainerCallback):
            def __init__(self):
                self.times, self._start = [], None

            def on_step_begin(self, args, state, control, **kw):
                self._start = time.perf_counter()

            def on_step_end(self, args, state, control, **kw):
                self.times.append(time.perf_counter() - self._start)

        return _Timer()


def run_trainer(base: str, adapter: Path, rows: list[dict], steps: int, batch: int, ours: bool,
                packed: bool = True) -> dict:
    import torch

    from train import base_model, dpo
    from train.recipes import DPORecipe, load_recipe
    from train.trainer_common import matmul_precision

    recipe = load_recipe("dpo", DPORecipe)
    recipe = DPORecipe(**{**recipe.__dict__, "batch_size": batch, "max_steps": steps + 1, "logging_steps": 1000})
    model, _ = dpo.load_policy(base, adapter, recipe, cuda=False)
    tokenizer = base_model.load_tokenizer(base)
    out = Path(tempfile.mkdtemp(prefix="bench-dpo-"))
    if ours:
        config = dpo.trainer_config(recipe, "dpo", False, out, disable_tqdm=True)
    else:  # TRL's defaults, with only what must match: data, steps, batch, learning rate, no saving
        from trl import DPOConfig

        config = DPOConfig(output_dir=str(out), per_device_train_batch_size=batch, max_steps=steps + 1,
                           learning_rate=recipe.learning_rate, report_to="none", save_strategy="no",
                           use_cpu=True, logging_steps=1000, disable_tqdm=True)
    started = time.perf_counter()
    trainer = dpo.make_trainer(model, tokenizer, rows, config, "dpo", pack_pairs=packed)
    prepared = time.perf_counter() - started
    timer = StepTimer()
    trainer.add_callback(timer)
    with matmul_precision(recipe.float32_matmul_precision if ours else torch.get_float32_matmul_precision()):
        trainer.train()
    return {"step": statistics.median(timer.times[1:]), "prepare": prepared,
            "bf16": config.bf16, "checkpointing": config.gradient_checkpointing,
            "precompute": config.precompute_ref_log_probs}


def plain_forward_backward(base: str, adapter: Path, rows: list[dict], steps: int, batch: int) -> dict:
    """The LoRA model's forward + backward over each step's chosen and rejected sequences."""
    import torch

    from train import base_model, dpo
    from train.recipes import DPORecipe
    from train.trainer_common import matmul_precision

    tokenizer = base_model.load_tokenizer(base)
    model, _ = dpo.load_policy(base, adapter, DPORecipe(), cuda=False)
    model.train()
    params = sum(p.numel() for n, p in model.named_parameters() if "embed" not in n)
    times, tokens = [], []
    for step in range(steps + 1):
        seqs = []
        for row in rows[step * batch:(step + 1) * batch]:
            for side in ("chosen", "rejected"):
                seqs.append(tokenizer.apply_chat_template(row["prompt"] + row[side], tokenize=True,
                                                          return_dict=True)["input_ids"])
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, :len(s)], mask[i, :len(s)] = torch.tensor(s), 1
        with matmul_precision("medium"):
            start = time.perf_counter()
            loss = model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss
            loss.backward()
            times.append(time.perf_counter() - start)
        model.zero_grad(set_to_none=True)
        tokens.append(int(mask.sum()))
    step_tokens = statistics.median(tokens[1:])
    return {"step": statistics.median(times[1:]), "tokens": step_tokens, "flops": 6 * params * step_tokens}


def start_adapter(base: str) -> Path:
    """teto's active adapter when there is one, else a fresh LoRA (r=16 on every projection)."""
    from train import registry

    active = registry.active("teto")
    if active is not None:
        return active.path
    from peft import LoraConfig, get_peft_model

    from train import base_model

    out = Path(tempfile.mkdtemp(prefix="bench-adapter-"))
    model = get_peft_model(base_model.load_model(base), LoraConfig(
        r=16, lora_alpha=32, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.save_pretrained(out)
    return out


def main(args: argparse.Namespace) -> None:
    from bench import ready
    from train import base_model

    base = base_model.resolve(args.base_model) if args.base_model else ready.base_model()
    adapter = start_adapter(base)
    rows = bench_pairs(args.batch_size * (args.steps + 1))
    console.print(f"{len(rows)} pairs, {args.steps} timed steps of {args.batch_size} pairs, from {adapter}")
    plain = plain_forward_backward(base, adapter, rows, args.steps, args.batch_size)
    results = [("ours (recipe dpo.yaml)",
                run_trainer(base, adapter, rows, args.steps, args.batch_size, ours=True)),
               ("ours, each pair's prompt computed twice",
                run_trainer(base, adapter, rows, args.steps, args.batch_size, ours=True, packed=False)),
               ("TRL's default DPOConfig", run_trainer(base, adapter, rows, args.steps, args.batch_size, ours=False))]
    ours = results[0][1]["step"]
    table = Table("configuration", "bf16", "grad. checkpointing", "ref. precomputed", "s / step", "speed vs ours",
                  "vs plain fwd+bwd", "GFLOP/s",
                  title=f"DPO step, {args.batch_size} pairs ({plain['tokens']:.0f} tokens) on {Path(base).name}",
                  caption="vs plain fwd+bwd: step time over a plain forward + backward of the same tokens "
                          "(lower is better); GFLOP/s from 6 x parameters x tokens")
    for label, r in results:
        table.add_row(label, str(r["bf16"]), str(r["checkpointing"]), str(r["precompute"]), f"{r['step']:.2f}",
                      f"{ours / r['step']:.2f}x", f"{r['step'] / plain['step']:.2f}x",
                      f"{plain['flops'] / r['step'] / 1e9:.1f}")
    table.add_row("plain fwd+bwd (no DPO)", "-", "-", "-", f"{plain['step']:.2f}",
                  f"{ours / plain['step']:.2f}x", "1.00x", f"{plain['flops'] / plain['step'] / 1e9:.1f}")
    console.print(table)
    console.print(f"reference log-probs, precomputed once before training: {results[0][1]['prepare']:.1f} s "
                  f"for {len(rows)} pairs (ours; {results[1][1]['prepare']:.1f} s with each prompt computed twice)")
