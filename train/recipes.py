"""Training recipes: YAML files of defaults that command-line flags override.

A recipe is named (``sft`` means ``train/recipes/sft.yaml``) or given as a
path. Unknown keys are an error; ``tests/test_config_files.py`` parses every
recipe so the files cannot drift from this code.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from feedback.pairs import PairRules
from train.config import ConfigError, build, read_yaml

RECIPES_DIR = Path(__file__).resolve().parent / "recipes"


@dataclass
class LoraSpec:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    )
    # Adapt only the top N transformer layers (None: all). The backward pass
    # then stops at the lowest adapted layer, so each step is cheaper.
    top_layers: int | None = None


@dataclass
class TrainingRecipe:
    """The fields every training recipe has, read the same way by both trainers
    (``train/trainer_common.py``). The defaults are SFT's; a recipe whose default differs
    re-declares the field (``DPORecipe``: learning_rate, batch_size)."""

    epochs: float = 1.0
    max_steps: int = -1  # > 0 overrides epochs
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.05
    batch_size: int = 8
    grad_accum: int = 1
    max_length: int = 384  # SFT: longer examples are dropped, never cut mid-answer
    seed: int = 0
    # QLoRA (bitsandbytes nf4, double quantization): "auto" turns it on only on CUDA.
    qlora: Literal["auto", "on", "off"] = "auto"
    # bf16 autocast and gradient checkpointing make a small model several times
    # slower on a CPU; "auto" enables them only on CUDA.
    bf16: Literal["auto", "on", "off"] = "auto"
    gradient_checkpointing: Literal["auto", "on", "off"] = "auto"
    # torch's float32 matmul precision while training: "medium" lets the CPU
    # (avx512_bf16) or GPU multiply in bf16 with fp32 accumulation while the
    # weights stay fp32 (about 1.3x per step here; `persona bench sft`). Evaluation always runs
    # at "highest".
    float32_matmul_precision: Literal["highest", "high", "medium"] = "medium"
    logging_steps: int = 5


@dataclass
class SFTRecipe(TrainingRecipe):
    # Languages of the persona data to train on; none given: the languages the base model
    # speaks (a built-in model's record, or its model card's; train/base_model.languages), so
    # SmolLM2 trains English and Gemma 3 English and Korean.
    languages: list[str] | None = None
    lora: LoraSpec = field(default_factory=LoraSpec)
    weight_decay: float = 0.0
    # Padding-free batches: a batch's dialogues are concatenated into one row
    # with restarting position ids (no compute spent on padding; measured 1.4x
    # on the CPU). Needs SDPA or flash attention, whose masks keep the
    # dialogues apart; tests/test_sft.py checks that they stay independent.
    padding_free: bool = True
    # Without padding-free, samples of similar length share a batch instead.
    group_by_length: bool = False


@dataclass
class DPORecipe(TrainingRecipe):
    """Preference retraining of a persona's active adapter (continued, with the active
    adapter frozen as the reference), the pair rules of its data, and the gate its
    candidate must pass."""

    learning_rate: float = 5e-5
    batch_size: int = 4
    # dpo: pairs; kto: unpaired thumbs; auto: kto when unpaired examples outnumber pairs 2:1
    method: Literal["auto", "dpo", "kto"] = "auto"
    beta: float = 0.1
    loss_type: str = "sigmoid"
    # Reference log-probs computed once, before training, in no-grad batches of this size:
    # each step is then one forward and one backward of the policy only.
    precompute_ref: bool = True
    precompute_batch_size: int = 16
    # ---- the data and the gate ----
    heldout_percent: int = 20             # share of prompt contexts held out to judge the candidate
    voter_cap: float = 200.0              # the most weight one voter's votes carry, all together
    drop_outliers: bool = True            # voters far more against the others than chance weigh 0
    outlier_min_shared: int = 20          # shared contexts before the outlier rule judges a voter
    include_own_system_prompt: bool = False  # train on turns where the caller replaced the persona's prompt
    share_cap: float = 0.25               # the most of a run's total weight one voter carries
    min_voters: int = 3                   # fewer distinct voters in a run's data: no run (unless forced)
    min_pairs: int = 8                    # fewer training pairs than this: no run
    min_reward_accuracy: float = 0.55     # held-out implicit reward accuracy the candidate must reach
    max_sft_nll_increase: float = 0.10    # relative rise of held-out persona SFT loss allowed
    max_safety_nll_increase: float = 0.05  # relative rise of the held-out refusals' loss allowed
    sanity_max_tokens: int = 48           # answers to the fixed prompt set
    max_consistency_drop: float = 0.05    # persona-consistency score may fall this much below the active's
    # ---- learning more from each vote ----
    # Replay: each run trains on the pairs new since the active version (its own answers) plus
    # at most this many earlier pairs, so a run's time stays flat as votes accumulate.
    replay_pairs: int = 24
    max_new_pairs: int = 64               # new pairs a run trains on, at most (drawn at random)
    max_heldout_pairs: int = 48           # held-out pairs the gate judges, at most (the active version's first)
    # Anchor (RPO): rpo_alpha x the chosen answers' NLL per token added to the DPO loss.
    rpo_alpha: float = 0.5
    # Anchor (persona): persona_anchor x the NLL per token of anchor_batch_size of the persona's
    # own training dialogues, added every step (train/dpo.py PersonaAnchor); 0: off.
    persona_anchor: float = 1.0
    anchor_batch_size: int = 2
    # Reward model (train/reward.py): a Bradley-Terry head on frozen base-model features,
    # fitted on the human pairs, ranks rm_samples answers the active adapter samples for
    # rm_prompts prompts; best against worst become extra pairs of weight rm_pair_weight.
    reward_model: Literal["linear", "none"] = "linear"
    rm_prompts: int = 32
    rm_samples: int = 4
    rm_max_tokens: int = 48
    rm_temperature: float = 1.0
    rm_pair_weight: float = 0.5           # relative to a human pair's mean weight (1)
    rm_min_accuracy: float = 0.6          # below this held-out (or cross-validated) accuracy: no extra pairs
    # ---- promotion ----
    # gate: promote once the gate passes; ab: the candidate runs as a challenger and users'
    # side-by-side verdicts decide (an A/B experiment); auto: ab where the persona has
    # side-by-side votes, else gate.
    promotion: Literal["auto", "gate", "ab"] = "auto"
    ab_share: float = 0.1                 # share of API clients (sticky) the challenger serves
    ab_min_votes: int = 40                # decisive side-by-side verdicts before a promotion
    ab_alpha: float = 0.05                # error rate of each A/B decision
    ab_max_hours: float = 72.0            # a challenger undecided after this long is retired

    def pair_rules(self) -> PairRules:
        """The pair builder's rules for this recipe's data (the loop and the scheduler's count)."""
        return PairRules(voter_cap=self.voter_cap, heldout_percent=self.heldout_percent,
                         drop_outliers=self.drop_outliers, outlier_min_shared=self.outlier_min_shared,
                         include_own_system_prompt=self.include_own_system_prompt)


def sft_languages(recipe: SFTRecipe, base: str) -> list[str]:
    """The languages an SFT recipe trains on the base model at ``base``: its own list, or the
    languages the base model speaks."""
    from train.base_model import languages

    return list(recipe.languages) if recipe.languages else languages(base)


def recipe_path(name_or_path: str) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return RECIPES_DIR / f"{name_or_path}.yaml"


def load_recipe(name_or_path: str, cls: type = SFTRecipe):
    path = recipe_path(name_or_path)
    if not path.is_file():
        known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
        raise ConfigError(f"recipe {name_or_path!r} not found (no {path}; built-in recipes: {known})")
    recipe = build(cls, read_yaml(path), str(path))
    _check(recipe, path)
    return recipe


def override(recipe, **changes):
    """Apply command-line flags (None means "not given") on top of a recipe."""
    given = {k: v for k, v in changes.items() if v is not None}
    return dataclasses.replace(recipe, **given)


def _check(recipe, path: Path) -> None:
    positive = {"batch_size": recipe.batch_size, "grad_accum": recipe.grad_accum,
                "max_length": recipe.max_length}
    if isinstance(recipe, DPORecipe):
        positive.update(beta=recipe.beta, min_pairs=recipe.min_pairs, min_voters=recipe.min_voters,
                        outlier_min_shared=recipe.outlier_min_shared, share_cap=recipe.share_cap,
                        anchor_batch_size=recipe.anchor_batch_size, max_new_pairs=recipe.max_new_pairs,
                        max_heldout_pairs=recipe.max_heldout_pairs)
        if recipe.persona_anchor < 0 or recipe.rpo_alpha < 0:
            raise ConfigError(f"{path}: keys 'persona_anchor' and 'rpo_alpha' are weights, 0 or more")
        if recipe.share_cap > 1:
            raise ConfigError(f"{path}: key 'share_cap' is a share of the run's weight, at most 1")
        if not 0 <= recipe.min_reward_accuracy <= 1:
            raise ConfigError(f"{path}: key 'min_reward_accuracy' must be between 0 and 1")
    else:
        positive["lora.r"] = recipe.lora.r
    for key, value in positive.items():
        if value <= 0:
            raise ConfigError(f"{path}: key {key!r} must be positive, got {value}")
    if not 0 < recipe.learning_rate < 1:
        raise ConfigError(f"{path}: key 'learning_rate' must be between 0 and 1, got {recipe.learning_rate}")
    if isinstance(recipe, SFTRecipe) and recipe.languages is not None and not recipe.languages:
        raise ConfigError(f"{path}: key 'languages' lists no language (leave it out for the base model's)")
