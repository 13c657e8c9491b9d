"""Per-run voter rules: the share cap and the held-out split by voter, on rows with known answers."""

from __future__ import annotations

import random

import pytest

from feedback.voters import apply_run_rules, cap_shares, contributions, split_by_voter


def rows_of(weights: dict[str, int], contexts_per_voter: bool = True) -> list[dict]:
    """One row of weight 1 per vote; each voter on contexts of their own."""
    return [{"weight": 1.0, "voters": [v], "context": f"{v}-{i}" if contexts_per_voter else f"c{i}"}
            for v, n in weights.items() for i in range(n)]


def shares(rows) -> dict[str, float]:
    totals = contributions(rows)
    return {v: t / sum(totals.values()) for v, t in totals.items()}


def test_one_heavy_voter_is_capped_at_the_share_of_the_new_total():
    rows = cap_shares(rows_of({"attacker": 500, "a": 20, "b": 30, "c": 10, "d": 25, "e": 15}), 0.25)
    got = shares(rows)
    assert got["attacker"] == pytest.approx(0.25)
    assert got["b"] == pytest.approx(30 / (100 / 0.75))  # the others keep their weights: total = 100 / 0.75
    assert sum(r["weight"] for r in rows) == pytest.approx(100 / 0.75)


def test_several_voters_over_the_cap():
    rng = random.Random(0)
    for _ in range(200):
        weights = {f"v{i}": rng.randint(1, 300) for i in range(rng.randint(4, 9))}
        got = shares(cap_shares(rows_of(weights), 0.25))
        assert max(got.values()) <= 0.25 + 1e-9
        # nobody under the cap is touched relative to the others under it
        under = [v for v in weights if got[v] < 0.25 - 1e-9]
        if len(under) >= 2:
            a, b = under[:2]
            assert got[a] / got[b] == pytest.approx(weights[a] / weights[b])


def test_cap_needs_enough_voters_to_be_possible():
    rows = rows_of({"a": 90, "b": 5, "c": 5})  # 3 voters cannot each hold at most 25%
    assert cap_shares(rows, 0.25) == rows


def test_shared_rows_split_their_weight_among_their_voters():
    rows = [{"weight": 2.0, "voters": ["a", "b"], "context": "x"}, {"weight": 1.0, "voters": ["a"], "context": "y"}]
    assert contributions(rows) == {"a": 2.0, "b": 1.0}


def test_split_by_voter_keeps_voters_and_contexts_apart():
    rng = random.Random(3)
    rows = [{"weight": 1.0, "voters": [f"v{rng.randint(0, 7)}"], "context": f"c{rng.randint(0, 150)}"}
            for _ in range(400)]
    rows += [{"weight": 1.0, "voters": ["v1", "v2"], "context": f"c{i}"} for i in range(10)]
    split = split_by_voter(rows, 10)
    held = [r for r in split.rows if r["split"] == "heldout"]
    train = [r for r in split.rows if r["split"] == "train"]
    held_voters = {v for r in held for v in r["voters"]}
    assert held_voters == set(split.heldout_voters)
    assert not held_voters & {v for r in train for v in r["voters"]}
    assert not {r["context"] for r in held} & {r["context"] for r in train}
    assert 0.04 <= len(held) / len(rows) <= 0.25
    assert split.dropped == len(rows) - len(split.rows)


def test_a_heavy_voter_is_never_the_judge():
    rows = rows_of({"attacker": 500, "a": 20, "b": 30, "c": 10, "d": 40})
    for salt in range(20):  # whatever the ids hash to
        renamed = [{**r, "voters": [f"{r['voters'][0]}-{salt}"]} for r in rows]
        split = split_by_voter(renamed, 10)
        assert f"attacker-{salt}" not in split.heldout_voters
        assert split.heldout_voters


def test_split_by_voter_needs_three_voters():
    assert split_by_voter(rows_of({"a": 10, "b": 10}), 10) is None
    assert split_by_voter(rows_of({"a": 10, "b": 10, "c": 10}), 10) is not None


def test_run_rules_cap_the_training_rows_after_the_split():
    """The split comes first, on the votes' own weights (so the heavy voter never judges), and the
    cap then holds on the training rows it kept, whatever the split dropped."""
    rng = random.Random(5)
    for _ in range(50):
        rows = [{"weight": 1.0, "voters": [f"v{rng.randint(0, 6)}"], "context": f"c{rng.randint(0, 80)}",
                 "split": "train"} for _ in range(300)]
        rows += [{"weight": 1.0, "voters": ["heavy"], "context": f"c{rng.randint(0, 80)}", "split": "train"}
                 for _ in range(400)]
        kept, figures = apply_run_rules(rows, 0.25, 10)
        assert max(shares([r for r in kept if r["split"] == "train"]).values()) <= 0.25 + 1e-9
        assert "heavy" not in figures["heldout_voters"]
        assert figures["largest_share_before"] > 0.5 and figures["largest_share_after"] <= 0.25 + 1e-9
        assert figures["split"] == "voter" and figures["dropped_rows"] == len(rows) - len(kept)
        held = {v for r in kept if r["split"] == "heldout" for v in r["voters"]}
        assert held == set(figures["heldout_voters"])
        assert not held & {v for r in kept if r["split"] == "train" for v in r["voters"]}
