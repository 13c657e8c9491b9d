"""Agreement figures and the outlier rule, on data with known answers.

Alpha and kappa are checked against published worked examples and on simulated
raters (identical raters give 1, independent coin flips about 0). The outlier
rule's error rates are measured over many simulated panels: how often it flags
an honest voter (noisy, position-biased, lazy), and how often it catches one
who votes against the others.
"""

from __future__ import annotations

import random

import pytest

from feedback.agreement import (
    binomial_tail, cohen_kappa, disagreeing_voters, krippendorff_alpha, voter_disagreements,
)


def test_alpha_matches_krippendorffs_worked_example():
    """Krippendorff (2011), 'Computing Krippendorff's alpha-reliability', nominal data: 0.743."""
    rows = {"A": "1 2 3 3 2 1 4 1 2 . . .", "B": "1 2 3 3 2 2 4 1 2 5 . 3",
            "C": ". 3 3 3 2 3 4 2 2 5 1 .", "D": "1 2 3 3 2 4 4 1 2 5 1 ."}
    units: dict = {}
    for voter, values in rows.items():
        for unit, value in enumerate(values.split()):
            if value != ".":
                units.setdefault(unit, {})[voter] = value
    assert krippendorff_alpha(units) == pytest.approx(0.743, abs=5e-4)


def test_kappa_matches_the_textbook_example():
    """20 yes/yes, 5 yes/no, 10 no/yes, 15 no/no: observed 0.7, chance 0.5, kappa 0.4."""
    table = [("yes", "yes")] * 20 + [("yes", "no")] * 5 + [("no", "yes")] * 10 + [("no", "no")] * 15
    units = {i: {"a": a, "b": b} for i, (a, b) in enumerate(table)}
    assert cohen_kappa(units, "a", "b") == pytest.approx(0.4)
    assert cohen_kappa(units, "a", "nobody") is None


def simulate(n_units: int, voters: dict[str, float], rng: random.Random, truth_p: float = 0.5,
             coverage: float = 1.0) -> dict:
    """Units with a hidden true value (x or y); each voter reports it, flipped with their
    probability (1.0: always against it, 0.5: a coin flip), and judges a unit with
    probability ``coverage``."""
    units = {}
    for u in range(n_units):
        truth = "x" if rng.random() < truth_p else "y"
        other = "y" if truth == "x" else "x"
        ratings = {v: (other if rng.random() < flip else truth) for v, flip in voters.items()
                   if rng.random() < coverage}
        units[u] = ratings
    return units


def test_identical_raters_agree_perfectly_and_coin_flips_do_not():
    rng = random.Random(0)
    identical = simulate(100, {"a": 0.0, "b": 0.0, "c": 0.0}, rng)
    assert krippendorff_alpha(identical) == pytest.approx(1.0)
    assert cohen_kappa(identical, "a", "b") == pytest.approx(1.0)
    alphas = [krippendorff_alpha(simulate(200, {"a": 0.5, "b": 0.5, "c": 0.5}, rng)) for _ in range(50)]
    assert abs(sum(alphas) / len(alphas)) < 0.02
    assert max(abs(a) for a in alphas) < 0.15
    noisy = krippendorff_alpha(simulate(400, {"a": 0.1, "b": 0.1, "c": 0.1}, rng))
    assert 0.55 < noisy < 0.8  # each pair agrees 0.82 of the time: alpha = (0.82 - 0.5) / 0.5 = 0.64


def test_alpha_is_undefined_without_variation_or_overlap():
    assert krippendorff_alpha({1: {"a": "x", "b": "x"}, 2: {"a": "x", "b": "x"}}) is None
    assert krippendorff_alpha({1: {"a": "x"}, 2: {"b": "y"}}) is None


def test_binomial_tail():
    assert binomial_tail(0, 10, 0.5) == 1.0
    assert binomial_tail(10, 10, 0.5) == pytest.approx(0.5 ** 10)
    assert binomial_tail(15, 20, 0.5) == pytest.approx(0.020694, abs=1e-6)


def flagged(units) -> set[str]:
    return {d.voter for d in disagreeing_voters(units)}


def test_outlier_rule_error_rates():
    """200 panels of 6 voters on 120 contexts (each voter judges 70% of them, so about 84
    shared). Honest voters of every kind (accurate, noisy, coin-flipping, or always picking
    'x') must almost never be flagged; a voter who goes against the truth 90% of the time
    must almost always be, though the consensus he is measured against is itself noisy."""
    rng = random.Random(1)
    honest_flags = caught = 0
    trials = 200
    for _ in range(trials):
        panel = {"good": 0.1, "noisy": 0.3, "coin": 0.5, "fair": 0.2, "bad": 0.9}
        units = simulate(120, panel, rng, coverage=0.7)
        for ratings in units.values():  # a lazy voter: always 'x', whatever the answers
            if rng.random() < 0.7:
                ratings["lazy"] = "x"
        found = flagged(units)
        honest_flags += bool(found - {"bad"})
        caught += "bad" in found
    assert honest_flags / trials <= 0.02
    assert caught / trials >= 0.85  # measured 0.905: the noisy and coin voters blur the consensus


def test_outlier_rule_catches_a_contrarian_among_careful_voters():
    """Careful voters (10-20% noise) and one who always votes against the truth, 50 contexts."""
    rng = random.Random(2)
    trials, caught, honest_flags = 200, 0, 0
    for _ in range(trials):
        found = flagged(simulate(50, {"a": 0.1, "b": 0.15, "c": 0.2, "bad": 1.0}, rng, coverage=0.8))
        caught += "bad" in found
        honest_flags += bool(found - {"bad"})
    assert caught / trials >= 0.99
    assert honest_flags / trials <= 0.02


def test_outlier_rule_needs_enough_shared_contexts():
    """A voter always against the others on 19 shared contexts is not judged yet; on 20 it is."""
    base = {u: {"a": "x", "b": "x", "c": "x", "bad": "y"} for u in range(19)}
    assert not flagged(base)
    base[19] = {"a": "x", "b": "x", "c": "x", "bad": "y"}
    assert flagged(base) == {"bad"}
    (bad,) = [d for d in voter_disagreements(base) if d.voter == "bad"]
    assert bad.shared == 20 and bad.disagreed == 20 and "20 of 20" in bad.reason


def test_no_consensus_no_judgement():
    """Two voters who always disagree: neither is the outlier (one other voter is no consensus)."""
    units = {u: {"a": "x", "b": "y"} for u in range(40)}
    assert voter_disagreements(units) == []
    assert not flagged(units)


def test_binomial_tail_of_a_heavy_voter_does_not_overflow():
    assert binomial_tail(1500, 2000, 0.5) < 1e-100
    assert binomial_tail(1000, 2000, 0.5) == pytest.approx(0.5, abs=0.01)


def test_units_from_the_store_give_the_same_figures_in_sql_and_in_python(tmp_path):
    """Voters of known tastes vote through the store (thumbs and side by side, some twice,
    some on answers with the same text); the SQL counts of the outlier rule and alpha's
    sums equal the pure functions on the units read back."""
    from feedback import units
    from feedback.agreement import alpha_from_sums
    from feedback.store import Store, Turn
    from feedback.votes import record_comparison, record_vote

    store = Store.open(tmp_path / "f.duckdb")
    rng = random.Random(4)
    panel = {"good": 0.1, "noisy": 0.3, "coin": 0.5, "bad": 0.9}

    def turn(tid, voter, question, answer):
        store.add_turn(Turn(id=tid, requested_model="teto", messages=[{"role": "user", "content": question}],
                            answers=[answer], finish_reasons=["stop"], sampling={}, stream=False, latency_ms=1.0,
                            client=voter, persona="teto", adapter="teto-v1", adapter_version=1))

    for u in range(40):
        truth = rng.random() < 0.5
        for voter, flip in panel.items():
            if rng.random() < 0.8:
                vote = "up" if truth != (rng.random() < flip) else "down"
                turn(f"{voter}-t{u}", voter, f"thumbs {u}", f"answer {u}")
                record_vote(store, f"{voter}-t{u}", vote, voter)
            if rng.random() < 0.8:
                turn(f"{voter}-a{u}", voter, f"pair {u}", f"zebra {u}")
                turn(f"{voter}-b{u}", voter, f"pair {u}", f"apple {u}")
                wins_b = truth != (rng.random() < flip)          # b's text 'apple' sorts first: x
                left = rng.choice("ab")
                choice = rng.choice(["tie", "both_bad"]) if rng.random() < 0.1 else ("b" if wins_b else "a")
                record_comparison(store, f"{voter}-a{u}", f"{voter}-b{u}", choice, left=left, client=voter)
    judged = units.read(store, "teto")
    sbs = judged["teto", "side_by_side"]
    assert {v for r in sbs.values() for v in r.values()} <= {"x", "y", "tie", "both_bad"}
    decisive = {}
    for (_, kind), by_unit in judged.items():
        for key, ratings in by_unit.items():
            decisive[kind, key] = {v: x for v, x in ratings.items() if x in ("x", "y", "up", "down")}
    assert units.disagreements(store, "teto")["teto"] == voter_disagreements(decisive)
    for row in units.alpha_sums(store, "teto"):
        shared = {k: r for k, r in judged["teto", row["kind"]].items() if len(r) >= 2}
        assert row["contexts"] == len(shared) and row["voters"] == len({v for r in shared.values() for v in r})
        assert alpha_from_sums(row["n"], row["observed"], row["expected"]) == pytest.approx(krippendorff_alpha(shared))
    store.close()
