"""The gate a retrained candidate must pass before it serves.

* held-out preference pairs: its implicit reward accuracy (against the active
  adapter it started from, the reference) reaches the recipe's minimum and
  beats the active adapter's own, which is 0.5 (a model against itself is a
  coin flip), with a positive mean margin; for a candidate that will run as an
  A/B challenger, only "not shown worse" (a dozen held-out pairs cannot tell a
  better version from a lucky one: users' side-by-side verdicts decide);
* the persona's held-out SFT dialogues: its loss rises by at most the
  recipe's bound over the persona's SFT version's (not the active one's, so that
  drift cannot add up round after round; the active one's where no SFT version is
  registered);
* persona consistency (``train.consistency``): its "sounds like itself" score
  falls at most ``max_consistency_drop`` below the active adapter's;
* the persona's held-out safety dialogues (refusals of harmful requests, in the
  languages its SFT recipe trains, English at least): their loss rises by at
  most ``max_safety_nll_increase`` over the active adapter's, so votes cannot
  train the refusals away;
* a fixed prompt set (in English and the other languages its SFT recipe trains):
  its answers are non-empty and not degenerate repetition (no more of them are than
  of the active adapter's answers to the same prompts); a phrase said three times in
  a row counts as repetition, as a repeated word does.

    reasons = check(metrics, recipe)      # [] when it passes
"""

from __future__ import annotations

import re
from collections import Counter

from feedback.stats import wilson
from train.recipes import DPORecipe


# A phrase of 6 or more characters, from a non-space to a non-space, said three times or more
# in a row ("I am here. I am here. I am here."; "오늘 아침 7시에 일어나고, 오늘 아침 ..."). Shorter
# repeats ("Go. Go. Go.", "ㅋㅋㅋ") are how people write, not a loop.
REPEATED_PHRASE = re.compile(r"(\S.{4,}?\S)(?:\s*\1){2,}", re.S)


def degenerate(text: str) -> bool:
    """Empty, or a loop: a phrase repeated three times in a row, few distinct word trigrams,
    or one word being most of the text."""
    words = text.split()
    if not words:
        return True
    if REPEATED_PHRASE.search(" ".join(words)):
        return True
    if len(words) < 8:
        return False
    trigrams = list(zip(words, words[1:], words[2:]))
    if len(set(trigrams)) / len(trigrams) < 0.5:
        return True
    return Counter(words).most_common(1)[0][1] / len(words) > 0.5


def check(metrics: dict, recipe: DPORecipe, challenger: bool = False) -> list[str]:
    """The reasons to refuse the candidate ([] when it passes). ``challenger``: it will run as
    an A/B challenger, so users' verdicts, not a few held-out pairs, decide whether it is
    better; the preference check then only refuses a candidate the held-out pairs show worse
    (the upper end of the 95% Wilson interval of its accuracy below 0.5). The other checks
    (persona, refusals, consistency, sanity) hold either way: users never see a candidate
    that fails them."""
    reasons = []
    accuracy, margin = metrics.get("reward_accuracy"), metrics.get("reward_margin")
    if accuracy is None:
        reasons.append("no held-out pairs to judge it on")
    elif challenger:
        n = int(metrics.get("heldout_examples") or 0)
        high = wilson(accuracy * n, n)[1]
        if high < 0.5:
            reasons.append(f"held-out reward accuracy {accuracy:.2f} on {n} pairs: worse than the active version "
                           f"(95% interval up to {high:.2f})")
    else:
        floor = max(recipe.min_reward_accuracy, 0.5)
        if accuracy <= floor:
            reasons.append(f"held-out reward accuracy {accuracy:.2f} is not above {floor:.2f}")
        if margin is not None and margin <= 0:
            reasons.append(f"held-out reward margin {margin:.4f} is not positive")
    rise = _rise(metrics, "sft_nll", "sft" if metrics.get("sft_nll_sft") else "active")
    if rise is not None and rise[0] > recipe.max_sft_nll_increase:
        against = f"the SFT version v{metrics['sft_version']}" if metrics.get("sft_nll_sft") else "the active version"
        reasons.append(f"held-out persona loss is {rise[0]:.1%} above {against}'s ({rise[1]:.3f} -> {rise[2]:.3f}); "
                       f"the bound is {recipe.max_sft_nll_increase:.0%}")
    drop = _drop(metrics, "consistency")
    if drop is not None and drop[0] > recipe.max_consistency_drop:
        reasons.append(f"persona consistency fell {drop[0] * 100:.0f} points ({drop[1]:.0%} -> {drop[2]:.0%}); "
                       f"the bound is {recipe.max_consistency_drop * 100:g} points")
    rise = _rise(metrics, "safety_nll")
    if rise is not None and rise[0] > recipe.max_safety_nll_increase:
        reasons.append(f"held-out refusals lost likelihood: +{rise[0]:.1%} ({rise[1]:.3f} -> {rise[2]:.3f}); "
                       f"the bound is {recipe.max_safety_nll_increase * 100:g}%")
    bad = [a for a in metrics.get("sanity_answers", []) if degenerate(a)]
    before = sum(degenerate(a) for a in metrics.get("sanity_answers_active", []))
    if len(bad) > before:
        reasons.append(f"{len(bad)} of {len(metrics['sanity_answers'])} answers to the fixed prompts are empty "
                       f"or degenerate (e.g. {bad[0][:60]!r}), against {before} of the active adapter's")
    return reasons


def _drop(metrics: dict, prefix: str) -> tuple[float, float, float] | None:
    """(fall, active, candidate) of a score the run measured for both adapters, or None."""
    cand, active = metrics.get(f"{prefix}_candidate"), metrics.get(f"{prefix}_active")
    if cand is None or active is None:
        return None
    return active - cand, active, cand


def _rise(metrics: dict, prefix: str, against: str = "active") -> tuple[float, float, float] | None:
    """(relative rise, baseline, candidate) of a mean NLL the run measured for the candidate
    and the baseline adapter (the active one, or the SFT version); None when it measured
    none (the persona has no such dialogues)."""
    cand, active = metrics.get(f"{prefix}_candidate"), metrics.get(f"{prefix}_{against}")
    if cand is None or not active:
        return None
    return (cand - active) / active, active, cand
