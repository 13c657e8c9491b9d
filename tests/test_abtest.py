"""The A/B rule run on simulated voters with known preferences, its error rates measured.

Each simulated experiment is read after every verdict, as the gateway reads it, and
stops at the first decision. The decision on whole arrays of paths is the rule's
closed form (``excludes`` at 0.5 on the side of the observed rate), which
``test_closed_form_matches_interval`` and ``test_simulation_matches_analyse`` tie to
``analyse`` itself. ``pytest -s tests/test_abtest.py`` prints the figures.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from feedback.abtest import (PROMOTE_WITHIN, ABRules, Verdict, analyse, bootstrap_interval,
                             confidence_sequence, decision_boundaries, excludes, length_controlled_rate,
                             promotion_chance, promotion_chances)
from feedback.stats import Z95, wilson

RULES = ABRules()
EXPERIMENTS = 1000
HORIZON = 1000  # verdicts per experiment, ties included
TIES = 0.2


def simulate(p_win: float, experiments: int = EXPERIMENTS, horizon: int = HORIZON,
             ties: float = TIES, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Cumulative (wins, decisive votes, outcome codes) after each verdict of each experiment.

    A verdict is a tie with probability ``ties``, else a challenger win with ``p_win``.
    Outcome codes: 1 win, 0 loss, -1 tie."""
    rng = np.random.default_rng(seed)
    tie = rng.random((experiments, horizon)) < ties
    win = (rng.random((experiments, horizon)) < p_win) & ~tie
    codes = np.where(tie, -1, win.astype(int))
    return np.cumsum(win, axis=1), np.cumsum(~tie, axis=1), codes


def decisions(wins: np.ndarray, votes: np.ndarray, rules: ABRules = RULES
              ) -> tuple[np.ndarray, np.ndarray]:
    """Per experiment: the decision at its first deciding look ("continue" if none by the
    horizon), and the decisive votes counted at that look."""
    rejects = excludes(wins, votes, 0.5, rules.alpha)
    promote = rejects & (2 * wins > votes) & (votes >= rules.min_votes)
    retire = rejects & (2 * wins < votes)
    decided = promote | retire
    first = decided.argmax(axis=1)
    rows = np.arange(len(wins))
    outcome = np.where(~decided.any(axis=1), "continue",
                       np.where(promote[rows, first], "promote", "retire"))
    at = np.where(decided.any(axis=1), votes[rows, first], np.iinfo(np.int64).max)
    return outcome, at


def rates(outcome: np.ndarray) -> dict[str, float]:
    return {d: float(np.mean(outcome == d)) for d in ("promote", "retire", "continue")}


def test_indifferent_voters_rarely_promote():
    outcome, _ = decisions(*simulate(0.5, seed=1)[:2])
    r = rates(outcome)
    print(f"\np=0.50, {EXPERIMENTS} experiments read after every verdict up to {HORIZON}: "
          f"promoted {r['promote']:.3f}, retired {r['retire']:.3f}")
    assert r["promote"] <= RULES.alpha
    # Under p = 0.5 the sequence decides either way with probability <= alpha in all.
    assert r["promote"] + r["retire"] <= RULES.alpha


def test_better_challenger_promotes_within_bound():
    wins, votes, _ = simulate(0.65, seed=2)
    outcome, at = decisions(wins, votes)
    within = float(np.mean((outcome == "promote") & (at <= RULES.min_votes + PROMOTE_WITHIN)))
    median = float(np.median(at[outcome == "promote"]))
    print(f"\np=0.65: promoted within {RULES.min_votes}+{PROMOTE_WITHIN} decisive votes "
          f"{within:.3f}, promoted at all {rates(outcome)['promote']:.3f}, "
          f"retired {rates(outcome)['retire']:.3f}, median decisive votes to promote {median:.0f}")
    assert within >= 0.90
    assert rates(outcome)["retire"] <= RULES.alpha


def test_worse_challenger_is_retired():
    outcome, at = decisions(*simulate(0.35, seed=3)[:2])
    r = rates(outcome)
    print(f"\np=0.35: retired {r['retire']:.3f}, promoted {r['promote']:.3f}, "
          f"median decisive votes to retire {np.median(at[outcome == 'retire']):.0f}")
    assert r["retire"] >= 0.90
    assert r["promote"] <= RULES.alpha


BUDGET = 128  # decisive verdicts a simulated A/B round plays at most (persona simulate's default)
LOOK = 16  # verdicts between two looks at the experiment, as the simulator plays them
FUTILITY = 0.03  # persona simulate's --ab-futility default


def test_boundaries_are_the_rule():
    promote_at, retire_at = decision_boundaries(BUDGET, RULES)
    for n in (1, 20, 40, 77, BUDGET):
        for w in range(n + 1):
            low, high = confidence_sequence(w, n, RULES.alpha)
            assert (w >= promote_at[n]) == (low > 0.5), (w, n)
            assert (w <= retire_at[n]) == (high < 0.5), (w, n)


@pytest.mark.parametrize("wins,votes", [(36, 64), (40, 64), (30, 50), (10, 30)])
def test_promotion_chance_matches_paths(wins, votes):
    """The exact chance against paths drawn from its model: a win probability from the
    posterior Beta(1 + wins, 1 + losses), then the verdicts, read by the rule itself."""
    rng = np.random.default_rng(wins * 1000 + votes)
    paths = 20_000
    p = rng.beta(1 + wins, 1 + votes - wins, size=(paths, 1))
    more = rng.random((paths, BUDGET - votes)) < p
    counts = np.broadcast_to(votes + np.arange(1, BUDGET - votes + 1), more.shape)
    outcome, _ = decisions(wins + np.cumsum(more, axis=1), counts)
    drawn = float(np.mean(outcome == "promote"))
    exact = promotion_chance(wins, votes, BUDGET, RULES)
    assert abs(drawn - exact) <= 4 * math.sqrt(exact * (1 - exact) / paths) + 1e-3, (drawn, exact)


def test_promotion_chance_edges():
    assert promotion_chance(0, BUDGET, BUDGET) == 0.0  # the budget is spent
    promote_at, _ = decision_boundaries(BUDGET, RULES)
    assert promotion_chance(int(promote_at[60]), 60, BUDGET) == 1.0  # the rule promotes already
    assert promotion_chance(5, 60, BUDGET) == 0.0  # retired already
    assert promotion_chance(30, 60, 61) == 0.0  # one verdict cannot get there
    chances = promotion_chances(BUDGET)
    assert np.all(np.diff(chances[64, :65]) >= -1e-12)  # more wins, more chance


def futility_play(p_win: float, cut: float, seed: int) -> tuple[float, float]:
    """Experiments of decisive verdicts at ``p_win`` played to ``BUDGET``, looked at every
    ``LOOK``, and stopped at a look whose promotion chance is below ``cut``: the share
    promoted, and the mean verdicts played."""
    wins, votes, _ = simulate(p_win, experiments=2000, horizon=BUDGET, ties=0.0, seed=seed)
    outcome, at = decisions(wins, votes)
    chances = promotion_chances(BUDGET, RULES)
    looks = np.arange(LOOK, BUDGET, LOOK)
    hopeless = chances[looks, wins[:, looks - 1]] < cut if cut else np.zeros((len(wins), len(looks)), bool)
    stop = np.where(hopeless.any(axis=1), looks[hopeless.argmax(axis=1)], BUDGET)
    promoted = (outcome == "promote") & (at <= stop)
    played = np.minimum(np.where(outcome == "continue", BUDGET, at), stop)
    return float(promoted.mean()), float(played.mean())


def test_futility():
    """Stopping a budgeted round when its promotion chance falls below 3% saves verdicts
    where the challenger is not (or barely) better, and costs a better one little."""
    print(f"\nbudget {BUDGET} decisive verdicts, a look every {LOOK}, stop below {FUTILITY:.0%}:")
    for p_win, seed, saves, loses in ((0.5, 11, 0.5, 1.0), (0.56, 12, 0.35, 0.02), (0.65, 13, 0.05, 0.03)):
        full_promoted, full_played = futility_play(p_win, 0.0, seed)
        promoted, played = futility_play(p_win, FUTILITY, seed)
        print(f"p={p_win}: promoted {full_promoted:.3f} -> {promoted:.3f}, "
              f"verdicts played {full_played:.0f} -> {played:.0f}")
        assert promoted <= full_promoted
        assert full_promoted - promoted <= loses
        assert played <= (1 - saves) * full_played


def wilson_low(wins: np.ndarray, votes: np.ndarray, z: float = Z95) -> np.ndarray:
    """``feedback.stats.wilson``'s lower end, on arrays."""
    n = np.maximum(votes, 1)
    p = wins / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return np.where(votes > 0, np.maximum(0.0, centre - half), 0.0)


def test_naive_repeated_looks_would_promote_too_often():
    wins, votes, _ = simulate(0.5, seed=4)
    for w, n in ((3, 10), (31, 45), (0, 7)):
        assert wilson_low(np.array(w), np.array(n)) == pytest.approx(wilson(w, n)[0])
    naive = (wilson_low(wins, votes) > 0.5) & (votes >= RULES.min_votes)
    naive_rate = float(np.mean(naive.any(axis=1)))
    once = float(np.mean(wilson_low(wins[:, -1], votes[:, -1]) > 0.5))
    sequence_rate = rates(decisions(wins, votes)[0])["promote"]
    print(f"\np=0.50, read after every verdict: 95% Wilson interval promotes {naive_rate:.3f} "
          f"(read once at the horizon {once:.3f}); confidence sequence {sequence_rate:.3f}")
    assert naive_rate > 0.05
    assert sequence_rate <= 0.05


@pytest.mark.parametrize("p", [0.2, 0.5, 0.65, 0.9])
def test_sequence_covers_true_p_at_all_times(p):
    rng = np.random.default_rng(int(p * 100))
    wins = np.cumsum(rng.random((EXPERIMENTS, HORIZON)) < p, axis=1)
    votes = np.broadcast_to(np.arange(1, HORIZON + 1), wins.shape)
    missed = float(np.mean(excludes(wins, votes, p, 0.05).any(axis=1)))
    print(f"\np={p}: sequence missed the true p at some n <= {HORIZON} in {missed:.3f}")
    assert missed <= 0.05


def test_closed_form_matches_interval():
    """``low > 0.5`` (bisection) and the direct test of 0.5 agree, as do their mirrors."""
    rng = np.random.default_rng(5)
    for _ in range(2000):
        votes = int(rng.integers(0, 400))
        wins = int(rng.binomial(votes, rng.uniform(0.3, 0.7)))
        alpha = float(rng.choice([0.01, 0.05, 0.1]))
        low, high = confidence_sequence(wins, votes, alpha)
        rejects = bool(excludes(wins, votes, 0.5, alpha))
        assert (low > 0.5) == (rejects and 2 * wins > votes)
        assert (high < 0.5) == (rejects and 2 * wins < votes)


def test_interval_ends_are_the_boundary():
    for wins, votes in ((31, 45), (3, 60), (500, 1000), (1, 2)):
        low, high = confidence_sequence(wins, votes, 0.05)
        assert 0 <= low <= wins / votes <= high <= 1
        assert excludes(wins, votes, low, 0.05) and not excludes(wins, votes, low + 1e-9, 0.05)
        assert excludes(wins, votes, high, 0.05) and not excludes(wins, votes, high - 1e-9, 0.05)
    assert confidence_sequence(0, 0, 0.05) == (0.0, 1.0)
    assert confidence_sequence(0, 30, 0.05)[0] == 0.0
    assert confidence_sequence(30, 30, 0.05)[1] == 1.0


def test_interval_narrows_with_votes():
    widths = []
    for n in (10, 40, 160, 640, 2560, 100_000):
        low, high = confidence_sequence(int(0.6 * n), n, 0.05)
        assert 0 <= low <= 0.6 <= high <= 1
        widths.append(high - low)
    assert widths == sorted(widths, reverse=True) and len(set(widths)) == len(widths)


def test_prior_choice():
    """Beta(10, 10) promotes a 65/35 challenger sooner than a flat or a tight prior."""
    wins, votes, _ = simulate(0.65, horizon=600, ties=0.0, seed=6)
    medians = {}
    for prior in (1.0, 10.0, 50.0):
        rejects = excludes(wins, votes, 0.5, 0.05, prior) & (2 * wins > votes) & (votes >= 40)
        first = np.where(rejects.any(axis=1), rejects.argmax(axis=1) + 1, 10**6)
        medians[prior] = float(np.median(first))
    print(f"\nmedian votes to promote at 65/35 by prior: {medians}")
    assert medians[10.0] < medians[1.0] and medians[10.0] < medians[50.0]


def replay(codes: np.ndarray, rules: ABRules = RULES) -> tuple[str, int | None]:
    """``analyse`` after every verdict of one path: the first decision and its vote count."""
    verdicts = []
    for code in codes:
        verdicts.append(Verdict(None if code < 0 else bool(code)))
        result = analyse(verdicts, rules)
        if result.decision != "continue":
            return result.decision, result.votes
    return "continue", None


def test_simulation_matches_analyse():
    for p, seed in ((0.65, 7), (0.35, 8), (0.8, 9), (0.5, 13)):
        wins, votes, codes = simulate(p, experiments=2, horizon=250, seed=seed)
        outcome, at = decisions(wins, votes)
        expected = [(d, int(n) if d != "continue" else None) for d, n in zip(outcome, at)]
        assert [replay(c) for c in codes] == expected


def test_no_votes_continue():
    result = analyse([Verdict(None)] * 3)
    assert (result.decision, result.votes, result.ties, result.win_rate) == ("continue", 0, 3, None)
    assert (result.low, result.high) == (0.0, 1.0)
    assert result.boot_low is None and result.length_controlled is None
    assert "no decisive verdicts" in result.reason


def test_expired_retires_with_time_limit():
    verdicts = [Verdict(i % 2 == 0) for i in range(60)]
    assert analyse(verdicts).decision == "continue"
    result = analyse(verdicts, expired=True)
    assert result.decision == "retire" and "time limit" in result.reason
    # A challenger shown better is promoted even when the time is up.
    assert analyse([Verdict(True)] * 60, expired=True).decision == "promote"


def test_min_votes_respected():
    assert analyse([Verdict(True)] * 10).decision == "continue"
    streak = analyse([Verdict(True)] * 20)
    assert streak.low > 0.5 and streak.decision == "continue" and "needs 40" in streak.reason
    assert analyse([Verdict(True)] * 20, ABRules(min_votes=20)).decision == "promote"


def test_reason_and_dict():
    verdicts = [Verdict(True, 5.0)] * 31 + [Verdict(False, -2.0)] * 14 + [Verdict(None)] * 4
    result = analyse(verdicts)
    assert (result.votes, result.ties, result.wins) == (45, 4, 31)
    assert "won 31 of 45 decisive verdicts (69%, 95% interval" in result.reason
    assert json.loads(json.dumps(result.as_dict())) == result.as_dict()
    assert set(result.as_dict()) == set(result.__dataclass_fields__)
    assert analyse([Verdict(False)] * 30).decision == "retire"


def test_bad_rules_rejected():
    with pytest.raises(ValueError):
        ABRules(alpha=0)
    with pytest.raises(ValueError):
        ABRules(min_votes=-1)


def length_data(n: int, p_longer: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Length differences, normal with the challenger longer ``p_longer`` of the time."""
    rng = np.random.default_rng(seed)
    sd = 30.0
    shift = sd * math.sqrt(2) * _erfinv(2 * p_longer - 1)
    return rng.normal(shift, sd, n), rng


def _erfinv(y: float) -> float:
    lo, hi = -10.0, 10.0
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if math.erf(mid) < y else (lo, mid)
    return lo


def test_length_explains_wins():
    diff, _ = length_data(600, 0.8, seed=10)
    verdicts = [Verdict(bool(d > 0), float(d)) for d in diff]
    raw = float(np.mean(diff > 0))
    controlled = length_controlled_rate(verdicts)
    print(f"\nwins iff longer, longer 80%: raw {raw:.3f}, length-controlled {controlled:.3f}")
    assert raw == pytest.approx(0.8, abs=0.05)
    assert controlled == pytest.approx(0.5, abs=0.15)


def test_length_soft_preference():
    """Voters who only like length (win odds rising with it) and no real preference."""
    diff, rng = length_data(2000, 0.8, seed=11)
    won = rng.random(len(diff)) < 1 / (1 + np.exp(-diff / 15))
    controlled = length_controlled_rate([Verdict(bool(w), float(d)) for w, d in zip(won, diff)])
    assert np.mean(won) > 0.65
    assert controlled == pytest.approx(0.5, abs=0.05)


def test_real_preference_survives_length_control():
    diff, rng = length_data(2000, 0.8, seed=12)
    won = rng.random(len(diff)) < 0.7
    raw = float(np.mean(won))
    controlled = length_controlled_rate([Verdict(bool(w), float(d)) for w, d in zip(won, diff)])
    print(f"\npreference 70/30 independent of length: raw {raw:.3f}, controlled {controlled:.3f}")
    assert controlled == pytest.approx(raw, abs=0.04)


def test_length_controlled_edge_cases():
    assert length_controlled_rate([Verdict(True, 3.0), Verdict(False, 1.0)] * 4) is None
    assert length_controlled_rate([Verdict(True, float(i)) for i in range(50)]) is None
    same = [Verdict(True, 7.0)] * 30 + [Verdict(False, 7.0)] * 10 + [Verdict(None, 50.0)] * 5
    assert length_controlled_rate(same) == pytest.approx(0.75, abs=0.01)
    equal = [Verdict(True)] * 30 + [Verdict(False)] * 10
    assert length_controlled_rate(equal) == pytest.approx(0.75, abs=1e-6)
    # Separated by length at a point other than 0: finite, between 0 and 1.
    split = [Verdict(d > 20, float(d)) for d in range(-50, 100, 3)]
    assert 0 < length_controlled_rate(split) < 1


@pytest.mark.parametrize("wins,votes", [(31, 45), (0, 12), (12, 12), (1, 3), (480, 1000)])
def test_bootstrap_interval(wins, votes):
    low, high = bootstrap_interval(wins, votes, 0.05)
    assert 0 <= low <= wins / votes <= high <= 1
    again = bootstrap_interval(wins, votes, 0.05, seed=3)
    assert again == bootstrap_interval(wins, votes, 0.05, seed=3)
    assert bootstrap_interval(0, 0, 0.05) is None
