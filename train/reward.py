"""A reward model fitted on the human pairs, and the extra on-policy pairs it makes.

A run has a few dozen human pairs. DPO on those alone memorises them: the policy
learns which of two particular answers won, not why. Following the RLHF Workflow
recipe (iterative online DPO), a Bradley–Terry reward model is fitted on the
human pairs, the active adapter samples several answers to many more prompts,
and the reward model ranks them: the best against the worst of each prompt is
an extra pair. The human pairs stay in the data and weigh more.

The reward model is a linear Bradley–Terry head on frozen features of the base
model (no adapter): the mean of the last hidden state over the answer's tokens,
the last answer token's hidden state, and the log of the answer's length.
P(chosen beats rejected) = sigmoid(w . (f_chosen - f_rejected)), fitted by
L2-regularised logistic regression (Newton steps), the L2 strength chosen by
cross-validation on the training pairs. Why linear on frozen features rather
than a LoRA reward model (TRL's RewardTrainer): with 30-100 pairs a fine-tuned
reward model memorises just as the policy does, and fitting it would cost a
training run of its own; a regularised linear head fits in a second, and its
cross-validated accuracy says honestly whether the taste is learnable from the
features. Below ``rm_min_accuracy`` the run adds no extra pairs (a reward model
that cannot rank would only add noise), and says so.

    rows, report = augment(model, tokenizer, persona, data, recipe)
    report["heldout_accuracy"], report["cv_accuracy"], report["pairs_added"]
"""

from __future__ import annotations

import hashlib
import math
import os
from contextlib import contextmanager, nullcontext
import random
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

L2_GRID = (0.3, 3.0, 30.0, 300.0)
FOLDS = 5


@dataclass
class RewardModel:
    mean: np.ndarray
    scale: np.ndarray
    weights: np.ndarray

    def score(self, features: np.ndarray) -> np.ndarray:
        return ((features - self.mean) / self.scale) @ self.weights


def fit_bt(chosen: np.ndarray, rejected: np.ndarray, weights: np.ndarray, l2: float, steps: int = 25) -> RewardModel:
    """Bradley–Terry by weighted logistic regression on feature differences (no intercept:
    which answer is called "chosen" carries no information).

    Newton's method in the pairs' space: with the L2 term the weights stay in the span of
    the (scaled) differences X, w = X^T a, so each step solves an n x n system (n pairs,
    a few dozen) instead of a d x d one (d = 2 x hidden size + 1: 1153 on SmolLM2), with
    the same iterates. Cross-validation fits 20 models: 8-9 s -> well under a second."""
    both = np.concatenate([chosen, rejected])
    mean, scale = both.mean(0), both.std(0) + 1e-6
    diff = (chosen - rejected) / scale
    gram = diff @ diff.T
    sample = weights / weights.mean()
    a = np.zeros(len(diff))
    for _ in range(steps):
        p = 1 / (1 + np.exp(-(gram @ a)))
        # primal: (X^T S X + l2 I) X^T step = X^T (s (p - 1) + l2 a)  <=  (S K + l2 I) step = s (p - 1) + l2 a
        hess = (sample * p * (1 - p))[:, None] * gram + l2 * np.eye(len(a))
        step = np.linalg.solve(hess, sample * (p - 1) + l2 * a)
        a -= step
        if np.abs(diff.T @ step).max() < 1e-6:
            break
    return RewardModel(mean, scale, diff.T @ a)


def accuracy(model: RewardModel, chosen: np.ndarray, rejected: np.ndarray) -> float | None:
    if not len(chosen):
        return None
    margin = model.score(chosen) - model.score(rejected)
    return float(np.mean(np.where(margin == 0, 0.5, margin > 0)))


def cross_validate(chosen: np.ndarray, rejected: np.ndarray, weights: np.ndarray) -> tuple[float, float]:
    """(best L2, its cross-validated accuracy) over ``L2_GRID``, folds assigned in turn."""
    folds = np.arange(len(chosen)) % FOLDS
    best = (L2_GRID[0], -1.0)
    for l2 in L2_GRID:
        right = 0.0
        for k in range(FOLDS):
            test = folds == k
            if not test.any() or test.all():
                continue
            model = fit_bt(chosen[~test], rejected[~test], weights[~test], l2)
            right += accuracy(model, chosen[test], rejected[test]) * test.sum()
        score = right / len(chosen)
        if score > best[1]:
            best = (l2, score)
    return best


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    return tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]


class FeatureCache:
    """Features of answers already computed, kept between runs: the base model's features of
    an answer never change, and a run sees its held-out pairs and replayed pairs again (most
    of a run's answers are new, though: the third run of a simulation computed 242 of its
    answers' features). One file per persona and base model under ``PERSONA_HOME/cache/reward-features``,
    at most ``limit`` answers (the least recently used go), written atomically."""

    def __init__(self, path: Path | None, limit: int = 4000):
        self.path, self.limit, self.rows, self.computed = path, limit, {}, 0
        if path is not None and path.is_file():
            try:
                with np.load(path) as data:
                    self.rows = dict(zip(data["keys"].tolist(), data["features"]))
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
                self.rows = {}  # unreadable: computed again, and written anew

    @classmethod
    def for_run(cls, persona, base: str | None) -> FeatureCache:
        if base is None:
            return cls(None)
        from feedback.settings import home

        name = hashlib.sha1(str(base).encode()).hexdigest()[:12]
        return cls(home() / "cache" / "reward-features" / f"{persona.name}-{name}.npz")

    @staticmethod
    def key(messages: list[dict], answer: str) -> str:
        return hashlib.sha1(f"{_context(messages)}\0{answer}".encode()).hexdigest()

    def features(self, model, tokenizer, items: list[tuple[list[dict], str]]) -> np.ndarray:
        """``answer_features`` of ``items``, computing only the ones not known."""
        keys = [self.key(list(m), a) for m, a in items]
        first: dict[str, tuple] = {}
        for item, k in zip(items, keys):
            first.setdefault(k, item)
        missing = [k for k in first if k not in self.rows]
        if missing:
            self.rows.update(zip(missing, answer_features(model, tokenizer, [first[k] for k in missing])))
        self.computed += len(missing)
        for k in first:  # most recently used last
            self.rows[k] = self.rows.pop(k)
        return np.stack([self.rows[k] for k in keys])

    def save(self) -> None:
        if self.path is None or not self.rows:
            return
        keep = list(self.rows)[-self.limit :]
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_name(self.path.name + ".partial.npz")
        np.savez(partial, keys=np.array(keep), features=np.stack([self.rows[k] for k in keep]))
        os.replace(partial, self.path)


def answer_features(model, tokenizer, items: list[tuple[list[dict], str]], max_width: int = 512,
                    batch_rows: int = 8) -> np.ndarray:
    """Features of (prompt messages, answer) pairs from the base model with adapters off.
    The answers to one prompt share a row (train/pair_logps.py ``packed_rows``: the prompt
    once, each answer seeing the prompt and itself only), so the prompt, longer than most
    answers, is computed once per prompt instead of once per answer."""
    import torch

    from train.pair_logps import float_dtype, packed_rows

    encoded: dict[str, tuple[list[int], list[tuple[int, list[int]]]]] = {}
    for index, (messages, answer) in enumerate(items):
        key = _context(messages)
        if key not in encoded:
            encoded[key] = (prompt_ids(tokenizer, messages), [])
        answer_ids = tokenizer(answer, add_special_tokens=False)["input_ids"][:256] or [tokenizer.eos_token_id]
        encoded[key][1].append((index, answer_ids))
    groups = []  # (prompt, [(item index, answer ids)]): a prompt's answers, split to fit max_width
    for prompt, answers in encoded.values():
        chunk, width = [], len(prompt)
        for index, ids in answers:
            if chunk and width + len(ids) > max_width:
                groups.append((prompt, chunk))
                chunk, width = [], len(prompt)
            chunk.append((index, ids))
            width += len(ids)
        groups.append((prompt, chunk))
    groups.sort(key=lambda g: len(g[0]) + sum(len(ids) for _, ids in g[1]))  # neighbours by width: little padding
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    out = [None] * len(items)
    model.eval()
    with torch.no_grad(), (model.disable_adapter() if hasattr(model, "disable_adapter") else nullcontext()):
        for start in range(0, len(groups), batch_rows):
            batch = groups[start : start + batch_rows]
            ids, positions, mask, spans = packed_rows([(p, [a for _, a in chunk]) for p, chunk in batch],
                                                      tokenizer.pad_token_id, float_dtype(base), "cpu")
            device = next(base.parameters()).device
            hidden = base.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                                position_ids=positions.to(device), use_cache=False).last_hidden_state.float().cpu()
            for row, (_, chunk) in enumerate(batch):
                for (index, answer_ids), (begin, end) in zip(chunk, spans[row]):
                    answer = hidden[row, begin:end]
                    out[index] = torch.cat([answer.mean(0), answer[-1],
                                            torch.tensor([math.log1p(len(answer_ids))])]).numpy()
    return np.stack(out)


def sample_answers(model, tokenizer, prompts: list[list[dict]], samples: int, max_tokens: int,
                   temperature: float, batch_prompts: int = 16, seed: int = 0, label: str = "") -> list[list[str]]:
    """``samples`` answers of the model's current adapter to each prompt (greedy at
    temperature 0); ``label``: show a progress bar."""
    import torch
    from rich.console import Console
    from rich.progress import Progress

    torch.manual_seed(seed)
    answers: list[list[str]] = []
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    model.eval()
    try:
        with Progress(console=Console(stderr=True), transient=True, disable=not label) as progress, \
                generation_mode(model, sampling=temperature > 0):
            task = progress.add_task(label, total=len(prompts))
            for start in range(0, len(prompts), batch_prompts):
                chunk = prompts[start : start + batch_prompts]
                answers.extend(_generate(model, tokenizer, chunk, samples, max_tokens, temperature))
                progress.advance(task, len(chunk))
    finally:
        tokenizer.padding_side = side
    return answers


@contextmanager
def generation_mode(model, sampling: bool):
    """Faster generation on a CPU: the active LoRA adapter merged into the base weights for
    the duration (one matrix product per projection instead of three), and, when sampling,
    bf16 autocast (the CPU's avx512_bf16). Together about 1.6x on SmolLM2 (64 answers of 48
    tokens: 29 s -> 16-18 s). Greedy answers stay in fp32, so they match what the same
    adapter said in earlier runs. Elsewhere (CUDA, a 4-bit base whose merge would be
    lossy, a model without adapters) nothing changes."""
    import torch

    quantized = any(getattr(model, flag, None) for flag in ("is_loaded_in_4bit", "is_loaded_in_8bit", "hf_quantizer"))
    if (not hasattr(model, "merge_adapter") or quantized
            or next(model.parameters()).device.type != "cpu"):
        yield
        return
    model.merge_adapter()
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16) if sampling else nullcontext():
            yield
    finally:
        model.unmerge_adapter()


def _generate(model, tokenizer, prompts, samples: int, max_tokens: int, temperature: float) -> list[list[str]]:
    import torch

    texts = [tokenizer.apply_chat_template(list(m), add_generation_prompt=True, tokenize=False) for m in prompts]
    enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    sampling = dict(do_sample=True, temperature=temperature, top_p=1.0) if temperature > 0 else dict(do_sample=False)
    with torch.no_grad():
        out = model.generate(**enc, **sampling, max_new_tokens=max_tokens, num_return_sequences=samples,
                             pad_token_id=tokenizer.pad_token_id)
    decoded = tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [[d.strip() for d in decoded[i * samples : (i + 1) * samples]] for i in range(len(prompts))]


def _context(messages: list[dict]) -> str:
    return hashlib.md5(repr([(m["role"], m["content"]) for m in messages]).encode()).hexdigest()


def generation_prompts(persona, data, limit: int, seed: int) -> list[list[dict]]:
    """The prompts to sample on: those of the human training pairs first, then the persona's
    training prompts, never a held-out pair's prompt; at most ``limit``."""
    from train.data import load_files

    held = {_context(list(r["prompt"])) for r in data.heldout}
    seen, prompts = set(held), []
    for row in data.train:
        messages = [dict(m) for m in row["prompt"]]
        if (key := _context(messages)) not in seen:
            seen.add(key)
            prompts.append(messages)
    files = [(persona.resolve(f.path), f.language) for f in persona.files("train", ["en"])]
    extra = []
    for example in load_files(files, ["en"]) if files else []:
        user = next((m["content"] for m in example.messages if m["role"] == "user"), None)
        messages = [{"role": "system", "content": persona.system_prompt}, {"role": "user", "content": user}]
        if user and (key := _context(messages)) not in seen:
            seen.add(key)
            extra.append(messages)
    random.Random(seed).shuffle(extra)
    return (prompts + extra)[:limit]


def augment(model, tokenizer, persona, data, recipe, base: str | None = None) -> tuple[list[dict], dict]:
    """The extra pairs the reward model makes (DPO rows with a ``weight``) and its report;
    ``base``: the base model's path, to keep its answers' features between runs."""
    from train.gate import degenerate

    started = time.time()
    if recipe.reward_model == "none" or data.kind != "dpo" or len(data.train) < FOLDS:
        return [], {"used": False, "why": "off" if recipe.reward_model == "none" else "too few pairs"}
    text = lambda side: side[0]["content"] if isinstance(side, (list, tuple)) else str(side)  # noqa: E731
    cache = FeatureCache.for_run(persona, base)
    feats = cache.features(model, tokenizer, [(list(r["prompt"]), text(r[s])) for s in ("chosen", "rejected")
                                              for r in data.train + data.heldout])
    n, h = len(data.train), len(data.heldout)
    total = n + h
    chosen, rejected = feats[:n], feats[total : total + n]
    held_c, held_r = feats[n:total], feats[total + n :]
    weights = np.array([max(float(r["weight"]), 1e-6) for r in data.train])
    l2, cv = cross_validate(chosen, rejected, weights)
    rm = fit_bt(chosen, rejected, weights, l2)
    held = accuracy(rm, held_c, held_r)
    report = {"used": False, "kind": "linear Bradley-Terry on base features", "train_pairs": n, "heldout_pairs": h,
              "l2": l2, "cv_accuracy": round(cv, 3), "heldout_accuracy": None if held is None else round(held, 3)}
    pooled = (cv * n + (held or 0) * h) / total
    if pooled < recipe.rm_min_accuracy:
        report["why"] = f"its accuracy {pooled:.2f} (cross-validated and held-out) is below {recipe.rm_min_accuracy}"
        cache.save()
        return [], {**report, "features_computed": cache.computed, "seconds": round(time.time() - started, 1)}
    prompts = generation_prompts(persona, data, recipe.rm_prompts, recipe.seed)
    answers = sample_answers(model, tokenizer, prompts, recipe.rm_samples, recipe.rm_max_tokens,
                             recipe.rm_temperature, seed=recipe.seed,
                             label=f"sampling {recipe.rm_samples} answers to {len(prompts)} prompts for the reward model")
    rows = _best_against_worst(cache, model, tokenizer, rm, prompts, answers, degenerate)
    cache.save()
    mean_weight = float(weights.mean())
    for row in rows:
        row["weight"] = recipe.rm_pair_weight * mean_weight
    report.update(used=True, prompts=len(prompts), samples=recipe.rm_samples, pairs_added=len(rows),
                  features_computed=cache.computed,
                  seconds=round(time.time() - started, 1))
    return rows, report


def _best_against_worst(cache: FeatureCache, model, tokenizer, rm: RewardModel, prompts, answers,
                        degenerate) -> list[dict]:
    items = [(p, a) for p, group in zip(prompts, answers) for a in dict.fromkeys(group) if a and not degenerate(a)]
    if not items:
        return []
    scores = rm.score(cache.features(model, tokenizer, items))
    by_prompt: dict[str, list[tuple[float, list[dict], str]]] = {}
    for (prompt, answer), score in zip(items, scores):
        by_prompt.setdefault(_context(prompt), []).append((float(score), prompt, answer))
    rows = []
    for group in by_prompt.values():
        if len(group) < 2:
            continue
        group.sort(key=lambda g: g[0])
        (low, prompt, worst), (high, _, best) = group[0], group[-1]
        if high - low > 0.5:  # the reward model is fairly sure (P >= 0.62)
            rows.append({"prompt": prompt, "chosen": [{"role": "assistant", "content": best}],
                         "rejected": [{"role": "assistant", "content": worst}]})
    return rows
