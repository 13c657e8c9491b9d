"""Preference retraining: DPO (or KTO) on a persona's active adapter, a pure step.

    persona train dpo --persona teto --data teto-dpo.parquet [--recipe FILE] [--max-steps N] [--force]

Preference data in (the Parquet or JSONL that ``persona feedback export`` and
the retrain loop write, with its ``split`` column), a candidate adapter
folder with ``metrics.json`` out, registered as the next version but not
activated. It never opens the feedback store, never calls an engine and makes
no HTTP request: the loop (``train/loop.py``) does the snapshot, the records,
the gate and the promotion around it.

The active adapter is trained further, and a frozen copy of it is the
reference (TRL adds it as the ``ref`` adapter), so the implicit reward
measures the change against what is being served. After training the run
measures what the gate needs: held-out reward accuracy and margin, held-out
persona SFT loss of the candidate and of the active adapter, and answers to a
fixed prompt set.

    version, metrics = run(persona, "teto-dpo.parquet", load_recipe("dpo", DPORecipe), base)
"""

from __future__ import annotations

import argparse
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from rich.console import Console

from train import base_model, registry
from train.config import ConfigError
from train.data import load_files
from train.evaluate import mean_nll, tokenize_examples
from train.personas import Persona, load_persona
from train.recipes import DPORecipe, load_recipe
from train.trainer_common import (add_common_arguments, apply_arguments, load_base, matmul_precision,
                                  schedule_fields, staged, switch, utc_stamp, write_json)

console = Console(stderr=True)

# Asked of every candidate; an answer must be non-empty and not degenerate.
SANITY_PROMPTS = [
    "Hi! How are you today?",
    "I have an exam tomorrow and I have not studied.",
    "Can you give me one tip for sleeping better?",
    "What should I cook tonight?",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_common_arguments(parser, "recipe name or YAML path (default: train/recipes/dpo.yaml)")
    parser.add_argument("--data", required=True, help="preference data (.parquet or .jsonl): DPO pairs or KTO examples")
    parser.add_argument("--force", action="store_true", help="train even with fewer examples than min_pairs")


def main(args: argparse.Namespace) -> int:
    persona = load_persona(args.persona)
    recipe = apply_arguments(load_recipe(args.recipe or "dpo", DPORecipe), args)
    data = load_data(args.data, recipe, args.force)  # a bad file fails before the model loads
    version, metrics = train(persona, data, recipe, base_model.resolve(args.base_model))
    accuracy = metrics.get("reward_accuracy")
    console.print(f"[bold green]Saved[/] {version.name} in {version.path} (not activated; held-out reward "
                  f"accuracy {'-' if accuracy is None else f'{accuracy:.2f}'}, {metrics['train_steps']} steps)")
    return 0


@dataclass
class PreferenceData:
    path: Path
    kind: str              # "dpo" (prompt/chosen/rejected) or "kto" (prompt/completion/label)
    train: list[dict]
    heldout: list[dict]


def read_preferences(path: str | Path) -> PreferenceData:
    """The train and held-out rows of an exported file: DPO pairs or KTO examples."""
    import duckdb

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no preference data at {path}")
    reader = "read_parquet" if path.suffix == ".parquet" else "read_json_auto"
    con = duckdb.connect(":memory:")
    try:
        rel = con.sql(f"SELECT * FROM {reader}(?)", params=[str(path)])
        columns = set(rel.columns)
        if {"prompt", "chosen", "rejected"} <= columns:
            kind, keep = "dpo", ["prompt", "chosen", "rejected"]
        elif {"prompt", "completion", "label"} <= columns:
            kind, keep = "kto", ["prompt", "completion", "label"]
        else:
            raise ConfigError(f"{path}: expected prompt/chosen/rejected (DPO) or prompt/completion/label (KTO) "
                              f"columns, found {sorted(columns)}")
        rows = [dict(zip(rel.columns, r)) for r in rel.fetchall()]
    except duckdb.Error as exc:
        raise ConfigError(f"{path}: cannot read it ({str(exc).splitlines()[0]})") from None
    finally:
        con.close()
    train = [{k: r[k] for k in keep} for r in rows if r.get("split", "train") != "heldout"]
    heldout = [{k: r[k] for k in keep} for r in rows if r.get("split") == "heldout"]
    return PreferenceData(path, kind, train, heldout)


def check_method(recipe: DPORecipe, kind: str) -> None:
    """The data's kind must be the one the recipe asks for (any, with ``method: auto``)."""
    if recipe.method != "auto" and recipe.method != kind:
        raise ConfigError(f"the recipe asks for {recipe.method} but the data holds {kind} examples")


def load_data(path: str | Path, recipe: DPORecipe, force: bool = False) -> PreferenceData:
    """``read_preferences``, checked against the recipe: its method, and its min_pairs
    unless ``force`` (then one training example is enough)."""
    data = read_preferences(path)
    check_method(recipe, data.kind)
    needed = 1 if force else recipe.min_pairs
    if len(data.train) < needed:
        raise ConfigError(f"{path}: {len(data.train)} training {data.kind} examples; the recipe needs at least "
                          f"{needed}" + ("" if force else " (min_pairs; --force trains on fewer)"))
    return data


def trainer_config(recipe: DPORecipe, kind: str, cuda: bool, output_dir: Path, **overrides):
    """TRL's DPOConfig/KTOConfig for a recipe (``overrides``: config fields, for the benchmark)."""
    from trl import DPOConfig, KTOConfig

    fields = dict(
        schedule_fields(recipe, cuda, output_dir),
        per_device_eval_batch_size=recipe.precompute_batch_size,
        beta=recipe.beta,
        max_length=recipe.max_length,
        bf16=switch(recipe.bf16, cuda) and cuda,
        precompute_ref_log_probs=recipe.precompute_ref,
        precompute_ref_batch_size=recipe.precompute_batch_size,
    )
    if kind == "dpo":
        fields["loss_type"] = [recipe.loss_type]
    fields.update(overrides)
    return (DPOConfig if kind == "dpo" else KTOConfig)(**fields)


def make_trainer(model, tokenizer, train_rows: list[dict], config, kind: str, lean: bool = True):
    """TRL's trainer for ``kind``; ``lean`` swaps in the lean DPO loss where it applies
    (sigmoid loss, precomputed reference log-probs)."""
    from datasets import Dataset
    from trl import DPOTrainer, KTOTrainer

    cls = DPOTrainer if kind == "dpo" else KTOTrainer
    if lean and kind == "dpo" and list(config.loss_type) == ["sigmoid"] and config.precompute_ref_log_probs \
            and config.ld_alpha is None:
        cls = _lean_dpo_class()
    model.config.use_cache = False
    return cls(model=model, args=config, train_dataset=Dataset.from_list(train_rows), processing_class=tokenizer)


def completion_logps(model, inputs):
    """Summed log-probs of each sequence's completion tokens, with the LM head applied only
    at completion positions (TRL's fused head computes log-probs, entropy and top-1 for
    every position over the whole vocabulary)."""
    import torch

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    hidden = base.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                        use_cache=False).last_hidden_state
    mask = inputs["completion_mask"][:, 1:].bool()
    rows = torch.arange(mask.size(0), device=mask.device).unsqueeze(1).expand_as(mask)[mask]
    logits = base.lm_head(hidden[:, :-1][mask]).float()
    token_logps = -torch.nn.functional.cross_entropy(logits, inputs["input_ids"][:, 1:][mask], reduction="none")
    return torch.zeros(mask.size(0), dtype=token_logps.dtype, device=mask.device).index_add(0, rows, token_logps)


def _lean_dpo_class():
    """DPOTrainer with the sigmoid DPO loss computed from completion positions only."""
    import torch.nn.functional as F
    from trl import DPOTrainer

    class LeanDPOTrainer(DPOTrainer):
        def compute_ref_log_probs(self, model, inputs):
            """The precomputed reference: the frozen "ref" adapter, same lean log-probs."""
            import torch
            from trl.trainer.utils import use_adapter

            unwrapped = self.accelerator.unwrap_model(self.model)
            with torch.no_grad(), use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config
                                               else None):
                return completion_logps(self.model, inputs).chunk(2, dim=0)

        def _compute_loss(self, model, inputs, return_outputs):
            mode = "train" if self.model.training else "eval"
            chosen, rejected = completion_logps(model, inputs).chunk(2, dim=0)
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            chosen_rewards = self.beta * (chosen - ref_chosen)
            rejected_rewards = self.beta * (rejected - ref_rejected)
            loss = -F.logsigmoid(chosen_rewards - rejected_rewards).mean()
            metrics = self._metrics[mode]
            metrics["rewards/chosen"].append(chosen_rewards.mean().item())
            metrics["rewards/rejected"].append(rejected_rewards.mean().item())
            metrics["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
            metrics["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
            metrics["logps/chosen"].append(chosen.mean().item())
            metrics["logps/rejected"].append(rejected.mean().item())
            return (loss, {}) if return_outputs else loss

    return LeanDPOTrainer


def load_policy(base: str, adapter: Path, recipe: DPORecipe, cuda: bool):
    """The base model with the adapter to continue, trainable; (model, qlora)."""
    from peft import PeftModel

    model, qlora, _ = load_base(base, recipe, cuda)
    return PeftModel.from_pretrained(model, str(adapter), is_trainable=True), qlora


def run(persona: Persona, data: str | Path, recipe: DPORecipe, base: str,
        force: bool = False) -> tuple[registry.AdapterVersion, dict]:
    """Train a candidate from the persona's active adapter on a preference file; returns it
    (registered, not active) and its metrics (everything the gate reads)."""
    return train(persona, load_data(data, recipe, force), recipe, base)


def train(persona: Persona, data: PreferenceData, recipe: DPORecipe,
          base: str) -> tuple[registry.AdapterVersion, dict]:
    """``run`` on data already read and checked (``load_data``)."""
    import torch

    started = time.time()
    active = registry.active(persona.name)
    if active is None:
        raise ConfigError(f"{persona.name} has no active adapter to retrain (run: persona train sft --persona "
                          f"{persona.name})")
    cuda = torch.cuda.is_available()
    tokenizer = base_model.load_tokenizer(base)
    model, qlora = load_policy(base, active.path, recipe, cuda)
    console.print(f"[bold]{data.kind.upper()}[/] persona={persona.name} from {active.name}: {len(data.train)} "
                  f"train, {len(data.heldout)} held-out examples; beta={recipe.beta} lr={recipe.learning_rate}")
    with staged(persona.name) as staging:
        config = trainer_config(recipe, data.kind, cuda, staging / "trainer")
        trainer = make_trainer(model, tokenizer, data.train, config, data.kind)
        with matmul_precision(recipe.float32_matmul_precision):
            trainer.train()
        metrics = {"kind": data.kind, "train_examples": len(data.train), "heldout_examples": len(data.heldout),
                   "train_seconds": round(time.time() - started, 1), **_train_metrics(trainer.state.log_history),
                   **measure(trainer, model, tokenizer, persona, data, recipe)}
        shutil.rmtree(staging / "trainer", ignore_errors=True)
        model.save_pretrained(str(staging), selected_adapters=["default"])
        write_json(staging / "metrics.json", {**metrics, "log_history": trainer.state.log_history})
        meta = {"kind": data.kind, "base_model": base, "recipe": asdict(recipe), "data_file": str(data.path),
                "metrics": {k: v for k, v in metrics.items() if not k.startswith("sanity_answers")},
                "parent_version": active.version, "qlora": qlora, "created_at": utc_stamp()}
        version = registry.commit(persona.name, staging, meta)
    return version, metrics


def measure(trainer, model, tokenizer, persona: Persona, data: PreferenceData, recipe: DPORecipe) -> dict:
    """What the gate reads: held-out rewards, persona SFT losses and the sanity answers of the
    candidate ("default") and of the active adapter it started from ("ref")."""
    metrics = {}
    if data.heldout and data.kind == "dpo":
        from datasets import Dataset

        evaluated = trainer.evaluate(Dataset.from_list(data.heldout))
        metrics["reward_accuracy"] = evaluated.get("eval_rewards/accuracies")
        metrics["reward_margin"] = evaluated.get("eval_rewards/margins")
        metrics["heldout_loss"] = evaluated.get("eval_loss")
    elif data.heldout:
        metrics.update(kto_heldout(model, tokenizer, data.heldout, recipe.beta))
    metrics.update(sft_losses(model, tokenizer, persona))
    metrics["sanity_answers"] = sanity_answers(model, tokenizer, persona, recipe.sanity_max_tokens)
    metrics["sanity_answers_active"] = sanity_answers(model, tokenizer, persona, recipe.sanity_max_tokens, "ref")
    return metrics


def _train_metrics(history: list[dict]) -> dict:
    steps = [h for h in history if "loss" in h]
    last = steps[-1] if steps else {}
    done = next((h for h in history if "train_loss" in h), {})
    return {"train_loss": done.get("train_loss"), "train_steps": done.get("step"),
            "train_reward_accuracy": last.get("rewards/accuracies"), "train_reward_margin": last.get("rewards/margins")}


def kto_heldout(model, tokenizer, rows: list[dict], beta: float) -> dict:
    """Held-out KTO examples scored like DPO's: the implicit reward of a completion is
    ``beta * (log p_candidate - log p_active)``; it is right when its sign matches the
    label. The margin is the mean reward of desirable completions less that of the
    undesirable ones (0 for the active adapter against itself)."""
    import torch

    from train.chat_tokens import assistant_spans

    rewards, labels = [], []
    model.eval()
    for row in rows:
        text, spans = assistant_spans(tokenizer, list(row["prompt"]) + list(row["completion"]))
        start, end = spans[-1]
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, return_tensors="pt")
        offsets = enc.pop("offset_mapping")[0]
        mask = ((offsets[:, 0] >= start) & (offsets[:, 1] <= end) & (offsets[:, 1] > offsets[:, 0]))
        inputs = {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                  "completion_mask": mask.long().unsqueeze(0)}
        logps = []
        for adapter in ("default", "ref"):
            model.set_adapter(adapter)
            with torch.no_grad():
                logps.append(completion_logps(model, inputs).item())
        rewards.append(beta * (logps[0] - logps[1]))
        labels.append(bool(row["label"]))
    model.set_adapter("default")
    good = [r for r, y in zip(rewards, labels) if y]
    bad = [r for r, y in zip(rewards, labels) if not y]
    mean = lambda xs: sum(xs) / len(xs) if xs else 0.0  # noqa: E731
    return {"reward_accuracy": sum((r > 0) == y for r, y in zip(rewards, labels)) / len(rewards),
            "reward_margin": mean(good) - mean(bad), "rewards_desirable": mean(good),
            "rewards_undesirable": mean(bad)}


def sft_losses(model, tokenizer, persona: Persona) -> dict:
    """Held-out persona SFT loss (mean NLL per answer token) of the candidate ("default")
    and of the active adapter it started from (the frozen "ref" copy)."""
    files = [(persona.resolve(f.path), f.language) for f in persona.files("heldout", ["en"])]
    examples = load_files(files, ["en"]) if files else []
    if not examples:
        return {}
    tokenized = tokenize_examples(tokenizer, examples, persona.system_prompt)
    out = {"sft_nll_candidate": mean_nll(model, tokenized, tokenizer.pad_token_id)["mean_nll"]}
    if "ref" in model.peft_config:
        model.set_adapter("ref")
        try:
            out["sft_nll_active"] = mean_nll(model, tokenized, tokenizer.pad_token_id)["mean_nll"]
        finally:
            model.set_adapter("default")
    return out


def sanity_answers(model, tokenizer, persona: Persona, max_tokens: int, adapter: str = "default") -> list[str]:
    """Greedy answers to the fixed prompt set, of the candidate ("default") or of the
    active adapter it started from ("ref")."""
    import torch

    if adapter not in model.peft_config:
        return []
    answers = []
    model.eval()
    model.set_adapter(adapter)
    for prompt in SANITY_PROMPTS:
        messages = [{"role": "system", "content": persona.system_prompt}, {"role": "user", "content": prompt}]
        ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                            return_dict=True)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_tokens, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    model.set_adapter("default")
    return answers
