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
measures what the gate needs: held-out reward accuracy and margin, the mean
NLL of the persona's held-out dialogues and of its held-out refusals (safety
dialogues) under the candidate and under the active adapter, and answers to a
fixed prompt set.

Each pair or KTO example carries the ``weight`` the pair builder gave it (its
net votes after the voter caps; 1.0 when the file has none), and the loss is
weighted by it (``normalised_weights`` says how), in the lean DPO loss, in
TRL's other DPO losses and in KTO's.

    version, metrics = run(persona, "teto-dpo.parquet", load_recipe("dpo", DPORecipe), base)
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from decimal import Decimal
from pathlib import Path

from rich.console import Console

from train import base_model, registry, reward
from train.config import ConfigError
from train.evaluate import adapters_nll, split_hash
from train.pair_logps import completion_logps, pair_logps
from train.personas import Persona, load_persona
from train.recipes import DPORecipe, SFTRecipe, load_recipe, sft_languages
from train.timing import Phases
from train.trainer_common import (add_common_arguments, apply_arguments, load_base, matmul_precision,
                                  schedule_fields, staged, switch, utc_stamp, write_json)

console = Console(stderr=True)

# The gate's fixed prompt set, per language: every answer must be non-empty and not degenerate.
# A run asks those in English and in the other languages the persona's SFT recipe trains (the
# languages its adapter answers in).
SANITY_PROMPTS = {
    "en": [
        "Hi! How are you today?",
        "I have an exam tomorrow and I have not studied.",
        "Can you give me one tip for sleeping better?",
        "What should I cook tonight?",
    ],
    "ko": [
        "안녕! 오늘 기분 어때?",
        "내일 시험인데 공부를 하나도 못 했어.",
        "잠을 더 잘 자려면 뭐 하나만 해볼까?",
        "오늘 저녁 뭐 해 먹지?",
    ],
}


def sanity_prompts(languages: list[str]) -> list[str]:
    """The fixed prompts in English and in ``languages`` (those the set has)."""
    return [p for lang in dict.fromkeys(["en", *languages]) for p in SANITY_PROMPTS.get(lang, [])]


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
    train: list[dict]      # each row with its "weight"
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
    for number, row in enumerate(rows, 1):
        row["weight"] = _weight(row["weight"], path, number) if "weight" in columns else 1.0
    keep.append("weight")
    train = [{k: r[k] for k in keep} for r in rows if r.get("split", "train") != "heldout"]
    heldout = [{k: r[k] for k in keep} for r in rows if r.get("split") == "heldout"]
    return PreferenceData(path, kind, train, heldout)


def _weight(value, path: Path, row: int) -> float:
    """A row's weight as a float: a finite number, 0 or more (0: the row teaches nothing)."""
    if isinstance(value, str):  # DuckDB reads a JSON field of mixed types as JSON text ('2.5', '"x"')
        try:
            value = json.loads(value)
        except ValueError:
            pass
    numeric = isinstance(value, (int, float, Decimal)) and not isinstance(value, bool)  # true is no weight
    number = float(value) if numeric else math.nan
    if not math.isfinite(number) or number < 0:
        raise ConfigError(f"{path}: row {row}: 'weight' must be a finite number of at least 0, got {value!r}")
    return number


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
    if not any(row["weight"] > 0 for row in data.train):
        raise ConfigError(f"{path}: every training {data.kind} example has weight 0, so there is nothing to learn")
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


def make_trainer(model, tokenizer, train_rows: list[dict], config, kind: str, lean: bool = True,
                 rpo_alpha: float = 0.0, pack_pairs: bool = True):
    """TRL's trainer for ``kind``, with each row's weight in the loss; ``lean`` swaps in the
    lean DPO loss where it applies (sigmoid loss, precomputed reference log-probs), with
    ``rpo_alpha`` x the chosen answers' NLL per token added (RPO's anchor) and each pair's
    prompt computed once (``pack_pairs``, train/pair_logps.py)."""
    from datasets import Dataset

    if kind == "dpo":
        lean = lean and list(config.loss_type) == ["sigmoid"] and config.precompute_ref_log_probs \
            and config.ld_alpha is None
        cls = _lean_dpo_class(pack_pairs) if lean else _weighted_dpo_class()
    else:
        cls = _weighted_kto_class()
    if rpo_alpha and kind == "dpo" and not lean:
        raise ConfigError("rpo_alpha needs the lean DPO loss (loss_type sigmoid, precompute_ref true)")
    rpo_alpha = rpo_alpha if kind == "dpo" else 0.0  # an anchor of the DPO loss; KTO has none
    model.config.use_cache = False
    trainer = cls(model=model, args=config, train_dataset=Dataset.from_list(normalised_weights(train_rows)),
                  processing_class=tokenizer)
    trainer.rpo_alpha = rpo_alpha
    return trainer


def normalised_weights(rows: list[dict]) -> list[dict]:
    """The rows with their weights (1.0 where a row has none) divided by the mean weight.

    The loss is the batch's mean of weight x per-example loss. Dividing by the data set's
    mean weight, not by each batch's weight sum, keeps a pair's pull proportional to its
    weight wherever it lands: with the batch sum a batch of four weak pairs would pull as
    hard as four strong ones, and a pair alone in its batch would lose its weight. And the
    recipe's learning rate means the same whatever the weights' scale (net votes: 1, 3, 17).
    All weights equal gives exactly the unweighted loss; a weight of 0 contributes nothing."""
    weights = [float(row.get("weight", 1.0)) for row in rows]
    mean = sum(weights) / len(weights) if weights else 1.0
    if mean <= 0:
        raise ConfigError("every training example has weight 0, so there is nothing to learn")
    return [{**row, "weight": w / mean} for row, w in zip(rows, weights)]


class WeightCollator:
    """TRL's collator, plus the rows' weights as a tensor ``weight`` (when the rows have them)."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, examples: list[dict]) -> dict:
        import torch

        batch = self.inner(examples)
        if "weight" in examples[0]:
            batch["weight"] = torch.tensor([float(e["weight"]) for e in examples], dtype=torch.float32)
        return batch


class _WeightColumn:
    """Mixin for TRL's preference trainers: the ``weight`` column reaches the loss. TRL keeps
    only its signature columns (``remove_unused_columns``) and its collator only the token
    ids, so both are extended; the loss must take ``inputs["weight"]`` out before TRL passes
    the rest to the model."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.data_collator = WeightCollator(self.data_collator)  # after TRL set its own up

    def _set_signature_columns_if_needed(self):
        super()._set_signature_columns_if_needed()
        if "weight" not in self._signature_columns:
            self._signature_columns = [*self._signature_columns, "weight"]


def _without_weight(inputs: dict) -> tuple[dict, object]:
    """(the batch without its weights, the weights or None)."""
    rest = dict(inputs)
    return rest, rest.pop("weight", None)


def _pairs(inputs: dict, rows, n: int) -> dict:
    """The batch of ``n`` pairs narrowed to the pairs ``rows``: sequence tensors hold the n
    chosen rows and then the n rejected ones, per-pair tensors (reference log-probs) n rows."""
    import torch

    both, out = torch.cat([rows, rows + n]), {}
    for key, value in inputs.items():
        size = value.size(0) if torch.is_tensor(value) and value.dim() else None
        out[key] = value[both] if size == 2 * n else value[rows] if size == n else value
    return out


def _weighted_dpo_class():
    """TRL's DPOTrainer (any loss type) with each pair's weight in the loss."""
    from trl import DPOTrainer

    class WeightedDPOTrainer(_WeightColumn, DPOTrainer):
        def compute_ref_log_probs(self, model, inputs):
            return super().compute_ref_log_probs(model, _without_weight(inputs)[0])

        def _compute_loss(self, model, inputs, return_outputs):
            # TRL averages its per-pair losses inside; pairs of equal weight share one call, so
            # the loss is sum over weights w of w * (their share of the batch) * their mean loss
            # (one call in the usual batch of equal weights; a loss that sorts the batch, aot,
            # then sorts within each weight).
            inputs, weight = _without_weight(inputs)
            if weight is None:
                return super()._compute_loss(model, inputs, return_outputs)
            n, loss = weight.numel(), 0.0
            for w in weight.unique():
                rows = (weight == w).nonzero().flatten()
                part = inputs if rows.numel() == n else _pairs(inputs, rows, n)
                loss = loss + super()._compute_loss(model, part, False) * (w * rows.numel() / n)
            return (loss, {}) if return_outputs else loss

    return WeightedDPOTrainer


def _weighted_kto_class():
    """TRL's KTOTrainer with each example's weight in the loss. TRL multiplies the desirable
    and the undesirable per-example losses by ``desirable_weight`` / ``undesirable_weight``
    (in batch order) before averaging, so for one batch those become per-example tensors."""
    from trl import KTOTrainer

    class WeightedKTOTrainer(_WeightColumn, KTOTrainer):
        def _compute_loss(self, model, inputs, return_outputs):
            inputs, weight = _without_weight(inputs)
            if weight is None:
                return super()._compute_loss(model, inputs, return_outputs)
            desirable, undesirable = self.desirable_weight, self.undesirable_weight
            labels = inputs["label"].bool().to(weight.device)
            self.desirable_weight, self.undesirable_weight = desirable * weight[labels], undesirable * weight[~labels]
            try:
                return super()._compute_loss(model, inputs, return_outputs)
            finally:
                self.desirable_weight, self.undesirable_weight = desirable, undesirable

    return WeightedKTOTrainer


def _lean_dpo_class(pack_pairs: bool = True):
    """DPOTrainer with the sigmoid DPO loss, each pair's times its weight, computed from
    completion positions only (and each pair's prompt once, with ``pack_pairs``)."""
    import torch.nn.functional as F
    from trl import DPOTrainer

    logps_of = pair_logps if pack_pairs else completion_logps

    class LeanDPOTrainer(_WeightColumn, DPOTrainer):
        def compute_ref_log_probs(self, model, inputs):
            """The precomputed reference: the frozen "ref" adapter, same lean log-probs."""
            import torch
            from trl.trainer.utils import use_adapter

            unwrapped = self.accelerator.unwrap_model(self.model)
            with torch.no_grad(), use_adapter(unwrapped, adapter_name="ref" if "ref" in unwrapped.peft_config
                                               else None):
                return logps_of(self.model, inputs).chunk(2, dim=0)

        def _compute_loss(self, model, inputs, return_outputs):
            mode = "train" if self.model.training else "eval"
            logps, tokens = logps_of(model, inputs, per_token=True)
            (chosen, rejected), chosen_tokens = logps.chunk(2, dim=0), tokens.chunk(2, dim=0)[0]
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
            chosen_rewards = self.beta * (chosen - ref_chosen)
            rejected_rewards = self.beta * (rejected - ref_rejected)
            losses = -F.logsigmoid(chosen_rewards - rejected_rewards)
            if getattr(self, "rpo_alpha", 0.0):  # RPO: the chosen answers' NLL per token anchors the policy
                losses = losses - self.rpo_alpha * chosen / chosen_tokens
            weight = inputs.get("weight")   # normalised to mean 1 over the data set (normalised_weights)
            loss = (losses * weight.to(losses)).mean() if weight is not None else losses.mean()
            metrics = self._metrics[mode]
            anchor = getattr(self, "anchor", None)
            if anchor is not None and mode == "train":  # the persona's own dialogues keep it itself
                nll = anchor.nll(model)
                loss = loss + anchor.weight * nll
                metrics["anchor/nll"].append(nll.item())
            metrics["rewards/chosen"].append(chosen_rewards.mean().item())
            metrics["rewards/rejected"].append(rejected_rewards.mean().item())
            metrics["rewards/accuracies"].append((chosen_rewards > rejected_rewards).float().mean().item())
            metrics["rewards/margins"].append((chosen_rewards - rejected_rewards).mean().item())
            metrics["logps/chosen"].append(chosen.mean().item())
            metrics["logps/rejected"].append(rejected.mean().item())
            return (loss, {}) if return_outputs else loss

    return LeanDPOTrainer


class PersonaAnchor:
    """An SFT term on the persona's own training dialogues: each training step adds
    ``weight`` x the mean NLL per answer token of the next ``batch_size`` of them (in the
    languages its SFT recipe trains), so the persona loss cannot drift however many
    rounds of votes pull the adapter towards a taste; the gate's bound against the SFT
    version then holds by construction rather than by refusal."""

    def __init__(self, tokenized: list, weight: float, batch_size: int, pad_id: int, seed: int = 0):
        import random

        self.tokenized, self.weight, self.batch_size, self.pad_id = tokenized, weight, batch_size, pad_id
        self.order = list(range(len(tokenized)))
        random.Random(seed).shuffle(self.order)
        self.at = 0

    @classmethod
    def for_persona(cls, persona: Persona, tokenizer, recipe: DPORecipe,
                    languages: list[str]) -> PersonaAnchor | None:
        from train.data import load_files
        from train.evaluate import split_files, tokenize_examples

        if recipe.persona_anchor <= 0:
            return None
        files = split_files(persona, "train", languages)
        examples = load_files(files, languages) if files else []
        tokenized = [t for t in tokenize_examples(tokenizer, examples, persona.system_prompt)
                     if t.n_answer_tokens and len(t.input_ids) <= recipe.max_length]
        if not tokenized:
            return None
        return cls(tokenized, recipe.persona_anchor, recipe.anchor_batch_size, tokenizer.pad_token_id, recipe.seed)

    def nll(self, model):
        """Mean NLL per answer token of the next batch of dialogues, with its graph."""
        from train.evaluate import labelled_nll

        batch = []
        for _ in range(min(self.batch_size, len(self.order))):
            batch.append(self.tokenized[self.order[self.at % len(self.order)]])
            self.at += 1
        total, count = labelled_nll(model, batch, self.pad_id)
        return total / max(count, 1)


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
    # The languages its SFT recipe trains on this base model: the anchor, the refusals and
    # the sanity prompts use them.
    languages = sft_languages(load_recipe(persona.recipe, SFTRecipe), base)
    phases = Phases()
    with phases("load"):
        tokenizer = base_model.load_tokenizer(base)
        model, qlora = load_policy(base, active.path, recipe, cuda)
    console.print(f"[bold]{data.kind.upper()}[/] persona={persona.name} from {active.name}: {len(data.train)} "
                  f"train, {len(data.heldout)} held-out examples; beta={recipe.beta} lr={recipe.learning_rate}")
    with phases("reward_model"):
        extra, rm_report = reward.augment(model, tokenizer, persona, data, recipe, base)
    if extra:
        console.print(f"reward model (held-out accuracy {rm_report['heldout_accuracy']}, cross-validated "
                      f"{rm_report['cv_accuracy']}): {len(extra)} extra pairs from {rm_report['prompts']} prompts")
    with staged(persona.name) as staging:
        config = trainer_config(recipe, data.kind, cuda, staging / "trainer")
        # TRL computes the reference log-probs as it builds the trainer: in the training's
        # precision, so that before the first step the policy's equal them
        with matmul_precision(recipe.float32_matmul_precision), phases("reference"):
            trainer = make_trainer(model, tokenizer, data.train + extra, config, data.kind,
                                   rpo_alpha=recipe.rpo_alpha)
        if data.kind == "dpo":  # read by the lean DPO loss (the default), as rpo_alpha is
            trainer.anchor = PersonaAnchor.for_persona(persona, tokenizer, recipe, languages)
        with matmul_precision(recipe.float32_matmul_precision), phases("train"):
            trainer.train()
        metrics = {"kind": data.kind, "train_examples": len(data.train), "heldout_examples": len(data.heldout),
                   "reward_model": rm_report, "extra_pairs": len(extra),
                   "train_seconds": round(time.time() - started, 1), **_train_metrics(trainer.state.log_history),
                   **measure(trainer, model, tokenizer, persona, data, recipe, languages, phases, active),
                   "phase_seconds": phases.seconds}
        shutil.rmtree(staging / "trainer", ignore_errors=True)
        model.save_pretrained(str(staging), selected_adapters=["default"])
        write_json(staging / "metrics.json", {**metrics, "log_history": trainer.state.log_history})
        meta = {"kind": data.kind, "base_model": base, "recipe": asdict(recipe), "data_file": str(data.path),
                "metrics": {k: v for k, v in metrics.items() if not k.startswith("sanity_answers")},
                "parent_version": active.version, "qlora": qlora, "created_at": utc_stamp()}
        version = registry.commit(persona.name, staging, meta)
    return version, metrics


def measure(trainer, model, tokenizer, persona: Persona, data: PreferenceData, recipe: DPORecipe,
            languages: list[str], phases: Phases | None = None, active: registry.AdapterVersion | None = None) -> dict:
    """What the gate reads: held-out rewards, the losses of the persona's held-out dialogues
    and refusals, and the sanity answers of the candidate ("default") and of the active
    adapter it started from ("ref")."""
    phases = phases or Phases()
    metrics = {}
    # both sides of each held-out pair in the training's precision: the candidate and the
    # active adapter are compared with each other, not with a figure of an earlier run
    with matmul_precision(recipe.float32_matmul_precision), phases("heldout_pairs"):
        metrics.update(heldout_rewards(trainer, model, tokenizer, data, recipe))
    with phases("persona_loss"):
        metrics.update(sft_losses(model, tokenizer, persona, active))
        metrics.update(safety_losses(model, tokenizer, persona, languages, active))
    from train.consistency import consistency_scores, data_fingerprint, judge_versions, known_scores

    with phases("consistency"):
        scores = consistency_scores(model, tokenizer, persona, {"candidate": "default", "active": "ref"},
                                    known_scores(active, persona))
    metrics.update({f"consistency_{label}": score for label, score in scores.items()})
    if scores:
        metrics["consistency_judges"] = judge_versions(persona)
        metrics["consistency_data"] = data_fingerprint(persona)
    with phases("sanity"):
        prompts = sanity_prompts(languages)
        metrics["sanity_prompts"] = prompts
        metrics["sanity_answers"] = sanity_answers(model, tokenizer, persona, prompts, recipe.sanity_max_tokens)
        metrics["sanity_answers_active"] = sanity_answers(model, tokenizer, persona, prompts,
                                                          recipe.sanity_max_tokens, "ref")
    return metrics


def heldout_rewards(trainer, model, tokenizer, data: PreferenceData, recipe: DPORecipe) -> dict:
    """Held-out reward accuracy and margin of the candidate against the active adapter."""
    metrics = {}
    if data.heldout and data.kind == "dpo":
        from datasets import Dataset

        # Unweighted: the gate asks how many of the held-out judgements the candidate gets right.
        evaluated = trainer.evaluate(Dataset.from_list([_without_weight(row)[0] for row in data.heldout]))
        metrics["reward_accuracy"] = evaluated.get("eval_rewards/accuracies")
        metrics["reward_margin"] = evaluated.get("eval_rewards/margins")
        metrics["heldout_loss"] = evaluated.get("eval_loss")
    elif data.heldout:
        metrics.update(kto_heldout(model, tokenizer, data.heldout, recipe.beta))
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


def sft_losses(model, tokenizer, persona: Persona, active: registry.AdapterVersion | None = None) -> dict:
    """Held-out persona SFT loss (mean NLL per answer token) of the candidate ("default"),
    of the active adapter it started from (the frozen "ref" copy) and of the persona's SFT
    version; what the active version's own run measured on the same dialogues is reused."""
    data = split_hash(persona, "heldout", ["en"])
    nll = adapters_nll(model, tokenizer, persona, "heldout", ["en"], active=recorded(active, "sft_nll_candidate", data))
    out = {f"sft_nll_{adapter}": value for adapter, value in nll.items()}
    sft = registry.sft_version(persona.name)
    if not nll or sft is None:
        return out
    out["sft_nll_data"], out["sft_version"] = data, sft.version
    earlier = (active.meta.get("metrics") or {}) if active is not None else {}
    if active is not None and active.version == sft.version and "active" in nll:
        out["sft_nll_sft"] = nll["active"]
    elif earlier.get("sft_version") == sft.version and recorded(active, "sft_nll_sft", data) is not None:
        out["sft_nll_sft"] = recorded(active, "sft_nll_sft", data)
    else:  # the bound that cannot drift: against the persona's SFT version
        model.load_adapter(str(sft.path), adapter_name="sft-version", is_trainable=False)
        try:
            out["sft_nll_sft"] = adapters_nll(model, tokenizer, persona, "heldout", ["en"],
                                              adapter="sft-version")["candidate"]
        finally:
            model.set_adapter("default")
            model.delete_adapter("sft-version")
    return out


def safety_losses(model, tokenizer, persona: Persona, trained: list[str],
                  active: registry.AdapterVersion | None = None) -> dict:
    """The same for the persona's held-out refusals (its ``safety`` files) in English and the
    other languages its SFT recipe trains (those its adapter answers in); {} without any."""
    languages = ["en", *(lang for lang in trained if lang != "en")]
    data = split_hash(persona, "safety", languages)
    nll = adapters_nll(model, tokenizer, persona, "safety", languages,
                       active=recorded(active, "safety_nll_candidate", data, "safety_nll_data"))
    if not nll:
        return {}
    return {**{f"safety_nll_{adapter}": value for adapter, value in nll.items()}, "safety_languages": languages,
            "safety_nll_data": data}


def recorded(active: registry.AdapterVersion | None, key: str, data: str | None,
             data_key: str = "sft_nll_data") -> float | None:
    """A loss of the active version measured by the run that made it (its candidate's), when
    that run measured it on the same files; None for an SFT version or other data (then it is
    measured again). The same adapter on the same dialogues gives the same loss, so a run
    measures only its candidate."""
    metrics = (active.meta.get("metrics") or {}) if active is not None else {}
    if data is None or metrics.get(data_key) != data or not isinstance(metrics.get(key), (int, float)):
        return None
    return float(metrics[key])


def sanity_answers(model, tokenizer, persona: Persona, prompts: list[str], max_tokens: int,
                   adapter: str = "default") -> list[str]:
    """Greedy answers to the fixed prompts (``sanity_prompts``), of the candidate ("default")
    or of the active adapter it started from ("ref"), in one batch."""
    if adapter not in model.peft_config:
        return []
    prompts = [[{"role": "system", "content": persona.system_prompt}, {"role": "user", "content": prompt}]
               for prompt in prompts]
    model.set_adapter(adapter)
    try:
        return [group[0] for group in reward.sample_answers(model, tokenizer, prompts, 1, max_tokens, 0.0)]
    finally:
        model.set_adapter("default")
