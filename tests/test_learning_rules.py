"""The learning rules that need no model: the gate's consistency and SFT-version bounds, the
bounded replay, and the reward model's Bradley-Terry fit on simulated preferences."""

from __future__ import annotations

import numpy as np

from train.gate import check
from train.recipes import DPORecipe
from train.replay import bound_replay
from train.reward import accuracy, cross_validate, fit_bt

PASSING = {"reward_accuracy": 0.8, "reward_margin": 0.3, "sft_nll_candidate": 3.0, "sft_nll_active": 3.0,
           "sanity_answers": ["Sleep early. Then run."]}


def test_gate_refuses_a_candidate_that_stops_sounding_like_itself():
    recipe = DPORecipe(max_consistency_drop=0.05)
    assert check({**PASSING, "consistency_candidate": 0.88, "consistency_active": 0.92}, recipe) == []
    reasons = check({**PASSING, "consistency_candidate": 0.80, "consistency_active": 0.92}, recipe)
    assert len(reasons) == 1 and "consistency fell 12 points (92% -> 80%)" in reasons[0]


def test_persona_loss_is_bounded_against_the_sft_version_so_drift_cannot_add_up():
    recipe = DPORecipe(max_sft_nll_increase=0.10)
    # Each round is 6% above the one before: against the active version every round passes,
    # against the SFT version (3.0) the second one (3.0 * 1.06 * 1.06 = 3.37, +12%) does not.
    first = {**PASSING, "sft_nll_candidate": 3.18, "sft_nll_active": 3.0, "sft_nll_sft": 3.0, "sft_version": 1}
    second = {**PASSING, "sft_nll_candidate": 3.37, "sft_nll_active": 3.18, "sft_nll_sft": 3.0, "sft_version": 1}
    assert check(first, recipe) == []
    reasons = check(second, recipe)
    assert len(reasons) == 1 and "above the SFT version v1's" in reasons[0] and "12.3%" in reasons[0]
    assert check({**second, "sft_nll_sft": None}, recipe) == []   # no SFT version: against the active one


def test_replay_keeps_new_pairs_and_heldout_and_bounds_the_rest():
    rows = ([{"versions": [3, 3], "split": "train", "n": i} for i in range(10)]
            + [{"versions": [1, 2], "split": "train", "n": 100 + i} for i in range(200)]
            + [{"versions": [1, 1], "split": "heldout", "n": 500 + i} for i in range(30)])
    kept, figures = bound_replay(rows, active_version=3, limit=48, seed=0)
    assert figures == {"new": 10, "new_kept": 10, "replayed": 48, "earlier": 200, "heldout": 30, "heldout_kept": 30}
    assert sum(r["split"] == "heldout" for r in kept) == 30
    assert {r["n"] for r in kept if 3 in r["versions"]} == set(range(10))
    again, _ = bound_replay(rows, active_version=3, limit=48, seed=0)
    assert [r["n"] for r in again] == [r["n"] for r in kept]               # seeded: the same replay
    assert bound_replay(rows, 3, 1000, 0)[1]["replayed"] == 200            # fewer earlier pairs than the bound
    kept, figures = bound_replay(rows, active_version=1, limit=48, seed=0, max_new=96)   # v1 stayed active
    assert figures["new_kept"] == 96 and figures["replayed"] == 10 and len(kept) == 96 + 10 + 30


def test_heldout_pairs_are_bounded_with_the_active_versions_own_first():
    rows = ([{"versions": [1, 2], "split": "heldout", "n": i} for i in range(60)]
            + [{"versions": [3, 2], "split": "heldout", "n": 100 + i} for i in range(20)]
            + [{"versions": [3, 3], "split": "train", "n": 200 + i} for i in range(5)])
    kept, figures = bound_replay(rows, active_version=3, limit=48, seed=0, max_heldout=48)
    held = [r["n"] for r in kept if r["split"] == "heldout"]
    assert figures["heldout"] == 80 and figures["heldout_kept"] == 48 == len(held) == len(set(held))
    assert set(range(100, 120)) <= set(held)                               # every pair of v3's own answers
    assert bound_replay(rows, 3, 48, 0, max_heldout=48)[0] == kept         # seeded
    kept, figures = bound_replay(rows, active_version=3, limit=48, seed=0, max_heldout=10)
    assert {r["n"] for r in kept if r["split"] == "heldout"} <= set(range(100, 120)) and figures["heldout_kept"] == 10
    assert bound_replay(rows, 3, 48, 0)[1]["heldout_kept"] == 80           # no bound: all judged


def simulated_pairs(n, dim, rng, noise=0.0):
    """Answers with random features; the true taste is a direction in feature space."""
    taste = rng.normal(size=dim)
    a, b = rng.normal(size=(n, dim)), rng.normal(size=(n, dim))
    a_wins = (a - b) @ taste > 0
    flip = rng.random(n) < noise
    a_wins ^= flip
    chosen, rejected = np.where(a_wins[:, None], a, b), np.where(a_wins[:, None], b, a)
    return chosen, rejected


def test_bradley_terry_learns_a_taste_from_few_pairs_and_cross_validation_says_so():
    held, cv = [], []
    for seed in range(6):   # 60 pairs, 10 features, 10% of the verdicts turned round (best possible: 90%)
        chosen, rejected = simulated_pairs(300, 10, np.random.default_rng(seed), noise=0.1)
        l2, score = cross_validate(chosen[:60], rejected[:60], np.ones(60))
        held.append(accuracy(fit_bt(chosen[:60], rejected[:60], np.ones(60), l2), chosen[60:], rejected[60:]))
        cv.append(score)
    assert np.mean(held) > 0.7 and min(held) > 0.65
    assert abs(np.mean(cv) - np.mean(held)) < 0.08   # the cross-validated figure predicts held-out accuracy


def test_bradley_terry_fit_in_the_pairs_space_equals_newton_on_the_features():
    rng = np.random.default_rng(2)
    for n, dim, l2 in ((40, 300, 0.3), (40, 300, 30.0), (80, 12, 3.0)):   # more features than pairs, and fewer
        chosen, rejected = simulated_pairs(n, dim, rng, noise=0.2)
        weights = rng.uniform(0.2, 2.0, n)
        fitted = fit_bt(chosen, rejected, weights, l2)
        both = np.concatenate([chosen, rejected])
        diff = (chosen - rejected) / (both.std(0) + 1e-6)
        sample, w = weights / weights.mean(), np.zeros(dim)
        for _ in range(50):   # the textbook primal Newton iteration, d x d
            p = 1 / (1 + np.exp(-(diff @ w)))
            hess = (diff * (sample * p * (1 - p))[:, None]).T @ diff + l2 * np.eye(dim)
            w -= np.linalg.solve(hess, diff.T @ (sample * (p - 1)) + l2 * w)
        assert np.allclose(fitted.weights, w, atol=1e-5 * max(1.0, np.abs(w).max()))


def test_bradley_terry_on_coin_flips_is_no_better_than_chance():
    rng = np.random.default_rng(1)
    chosen, rejected = simulated_pairs(400, 20, rng, noise=0.5)   # verdicts unrelated to the answers
    l2, cv = cross_validate(chosen[:60], rejected[:60], np.ones(60))
    held = accuracy(fit_bt(chosen[:60], rejected[:60], np.ones(60), l2), chosen[60:], rejected[60:])
    assert cv < 0.62 and 0.4 < held < 0.6   # below rm_min_accuracy (0.6): no extra pairs from it


def test_a_challenger_is_refused_on_preference_only_when_the_heldout_pairs_show_it_worse():
    recipe = DPORecipe()
    lucky = {**PASSING, "reward_accuracy": 0.3, "reward_margin": -0.01, "heldout_examples": 10}
    assert check(lucky, recipe) and check(lucky, recipe, challenger=True) == []   # 3 of 10: could be chance
    worse = {**PASSING, "reward_accuracy": 0.1, "heldout_examples": 20}
    reasons = check(worse, recipe, challenger=True)
    assert len(reasons) == 1 and "worse than the active version" in reasons[0]
    # The other checks hold for a challenger too: users never see a candidate that fails them.
    drifted = {**PASSING, "consistency_candidate": 0.5, "consistency_active": 0.9}
    assert any("consistency" in r for r in check(drifted, recipe, challenger=True))


def test_the_wilson_bound_covers_the_true_rate_about_95_percent_of_the_time():
    from feedback.stats import wilson

    rng = np.random.default_rng(0)
    n, p = 12, 0.5
    wins = rng.binomial(n, p, size=4000)
    assert np.mean([wilson(w, n)[1] < p for w in wins]) <= 0.05   # "shown worse" when equal: rare


def test_consistency_scores_known_from_the_active_version_are_not_computed_again(monkeypatch):
    """The active version's own score and the SFT version's come from its metrics when the same
    judges computed them; an SFT active version's setup score stands for both, else it is scored
    once for both; new judges: all again."""
    from train import consistency
    from train.registry import AdapterVersion

    from train import evaluate

    monkeypatch.setattr(consistency, "judge_versions", lambda persona: {"teto": 1, "egen": 1})
    monkeypatch.setattr(evaluate, "split_hash", lambda persona, split, languages: "sha256:prompts")
    sft = AdapterVersion("teto", 1, None, {"kind": "sft"})
    assert consistency.known_scores(sft, None) == {"sft": "active"}
    metrics = {"consistency_candidate": 0.9, "consistency_sft": 0.94, "consistency_judges": {"teto": 1, "egen": 1},
               "consistency_data": f"sha256:prompts:{consistency.MAX_PROMPTS}"}
    dpo_version = AdapterVersion("teto", 3, None, {"kind": "dpo", "metrics": metrics})
    assert consistency.known_scores(dpo_version, None) == {"active": 0.9, "sft": 0.94}
    scored = AdapterVersion("teto", 1, None, {"kind": "sft", "metrics": metrics})   # scored at setup
    assert consistency.known_scores(scored, None) == {"active": 0.9, "sft": 0.9}
    stale = {**metrics, "consistency_judges": {"teto": 1}}                   # before egen had a version
    assert consistency.known_scores(AdapterVersion("teto", 1, None, {"kind": "sft", "metrics": stale}), None) \
        == {"sft": "active"}
    rejudged = {**metrics, "consistency_judges": {"teto": 1, "egen": 2}}   # egen got a new SFT version
    assert consistency.known_scores(AdapterVersion("teto", 3, None, {"kind": "dpo", "metrics": rejudged}), None) == {}
    assert consistency.known_scores(None, None) == {}
    edited = {**metrics, "consistency_data": "sha256:other"}                # held-out prompts edited
    assert consistency.known_scores(AdapterVersion("teto", 3, None, {"kind": "dpo", "metrics": edited}), None) == {}
    fewer = {**metrics, "consistency_data": "sha256:prompts:16"}            # scored on fewer of them
    assert consistency.known_scores(AdapterVersion("teto", 3, None, {"kind": "dpo", "metrics": fewer}), None) == {}
