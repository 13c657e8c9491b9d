"""Preference retraining: DPO (or KTO) on a persona's active adapter, a pure step.

Preference data in (the Parquet or JSONL that ``persona feedback export``
writes, with its ``split`` column), a candidate adapter folder with
``metrics.json`` out, registered as the next version but not activated. It
never opens the live database and never calls an engine.

The active adapter is trained further, and a frozen copy of it is the
reference (TRL adds it as the ``ref`` adapter), so the implicit reward
measures the change against what is being served. After training the run
measures what the gate needs: held-out reward accuracy and margin, held-out
persona SFT loss of the candidate and of the active adapter, and answers to a
fixed prompt set.

    version, metrics = run(persona, "teto-dpo.parquet", load_recipe("dpo", DPORecipe), base)
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from pathlib import Path

from rich.console import Console

from train import base_model, registry
from train.config import ConfigError
from train.data import load_files
from train.evaluate import mean_nll, tokenize_examples
from train.personas import Persona
from train.recipes import DPORecipe
from train.sft import _switch, _write_json, matmul_precision, schedule_fields

console = Console(stderr=True)

# Asked of every candidate; an answer must be non-empty and not degenerate.
SANITY_PROMPTS = [
    "Hi! How are you today?",
    "I have an exam tomorrow and I have not studied.",
    "Can you give me one tip for sleeping better?",
    "What should I cook tonight?",
]


def read_preferences(path: str | Path) -> tuple[list[dict], list[dict], str]:
    """(train rows, held-out rows, kind) of an exported file: DPO pairs or KTO examples."""
    import duckdb

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"no preference data at {path}")
    reader = "read_parquet" if path.suffix == ".parquet" else "read_json_auto"
    con = duckdb.connect(":memory:")
    try:
        rel = con.sql(f"SELECT * FROM {reader}(?)", params=[str(path)])
    except duckdb.Error as exc:
        raise ConfigError(f"{path}: cannot read it ({str(exc).splitlines()[0]})") from None
    columns = set(rel.columns)
    if {"prompt", "chosen", "rejected"} <= columns:
        kind, keep = "dpo", ["prompt", "chosen", "rejected"]
    elif {"prompt", "completion", "label"} <= columns:
        kind, keep = "kto", ["prompt", "completion", "label"]
    else:
        raise ConfigError(f"{path}: expected prompt/chosen/rejected (DPO) or prompt/completion/label (KTO) "
                          f"columns, found {sorted(columns)}")
    names = rel.columns
    rows = [dict(zip(names, r)) for r in rel.fetchall()]
    con.close()
    train = [{k: r[k] for k in keep} for r in rows if r.get("split", "train") != "heldout"]
    heldout = [{k: r[k] for k in keep} for r in rows if r.get("split") == "heldout"]
    return train, heldout, kind


def trainer_config(recipe: DPORecipe, kind: str, cuda: bool, output_dir: Path, **overrides):
    """TRL's DPOConfig/KTOConfig for a recipe (``overrides``: config fields, for the benchmark)."""
    from trl import DPOConfig, KTOConfig

    fields = dict(
        schedule_fields(recipe, cuda, output_dir),
        per_device_eval_batch_size=recipe.precompute_batch_size,
        beta=recipe.beta,
        max_length=recipe.max_length,
        bf16=_switch(recipe.bf16, cuda) and cuda,
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
    """The base model with the adapter to continue, trainable."""
    import torch
    from peft import PeftModel

    qlora = _switch(recipe.qlora, cuda)
    dtype = torch.bfloat16 if _switch(recipe.bf16, cuda) and cuda else torch.float32
    model = base_model.load_model(base, device="cuda" if cuda else "cpu", dtype=dtype, qlora=qlora)
    return PeftModel.from_pretrained(model, str(adapter), is_trainable=True), qlora


def choose_kind(recipe: DPORecipe, kind: str) -> str:
    if recipe.method != "auto" and recipe.method != kind:
        raise ConfigError(f"the recipe asks for {recipe.method} but the data holds {kind} examples")
    return kind


def run(persona: Persona, data: str | Path, recipe: DPORecipe, base: str) -> tuple[registry.AdapterVersion, dict]:
    """Train a candidate from the persona's active adapter; returns it (registered, not active)
    and its metrics (everything the gate reads)."""
    import torch

    started = time.time()
    active = registry.active(persona.name)
    if active is None:
        raise ConfigError(f"{persona.name} has no active adapter to retrain (run: persona train sft --persona "
                          f"{persona.name})")
    train_rows, heldout_rows, kind = read_preferences(data)
    kind = choose_kind(recipe, kind)
    if len(train_rows) < recipe.min_pairs:
        raise ConfigError(f"{data}: {len(train_rows)} training {kind} examples; the recipe needs at least "
                          f"{recipe.min_pairs} (min_pairs)")
    cuda = torch.cuda.is_available()
    tokenizer = base_model.load_tokenizer(base)
    model, qlora = load_policy(base, active.path, recipe, cuda)
    console.print(f"[bold]{kind.upper()}[/] persona={persona.name} from {active.name}: {len(train_rows)} train, "
                  f"{len(heldout_rows)} held-out examples; beta={recipe.beta} lr={recipe.learning_rate}")
    staging = registry.staging_dir(persona.name)
    try:
        config = trainer_config(recipe, kind, cuda, staging / "trainer")
        trainer = make_trainer(model, tokenizer, train_rows, config, kind)
        with matmul_precision(recipe.float32_matmul_precision):
            trainer.train()
        metrics = {"kind": kind, "train_examples": len(train_rows), "heldout_examples": len(heldout_rows),
                   "train_seconds": round(time.time() - started, 1), **_train_metrics(trainer.state.log_history)}
        if heldout_rows:
            from datasets import Dataset

            if kind == "dpo":
                evaluated = trainer.evaluate(Dataset.from_list(heldout_rows))
                metrics["reward_accuracy"] = evaluated.get("eval_rewards/accuracies")
                metrics["reward_margin"] = evaluated.get("eval_rewards/margins")
                metrics["heldout_loss"] = evaluated.get("eval_loss")
            else:
                metrics.update(kto_heldout(model, tokenizer, heldout_rows, recipe.beta))
        metrics.update(sft_losses(model, tokenizer, persona))
        metrics["sanity_answers"] = sanity_answers(model, tokenizer, persona, recipe.sanity_max_tokens)
        metrics["sanity_answers_active"] = sanity_answers(model, tokenizer, persona, recipe.sanity_max_tokens, "ref")
        shutil.rmtree(staging / "trainer", ignore_errors=True)
        model.save_pretrained(str(staging), selected_adapters=["default"])
        _write_json(staging / "metrics.json", {**metrics, "log_history": trainer.state.log_history})
        meta = {"kind": kind, "base_model": base, "recipe": asdict(recipe), "data_file": str(data),
                "metrics": {k: v for k, v in metrics.items() if not k.startswith("sanity_answers")},
                "parent_version": active.version, "qlora": qlora,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        version = registry.commit(persona.name, staging, meta)
    except BaseException:
        registry.discard(staging)
        raise
    return version, metrics


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
