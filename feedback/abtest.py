"""The A/B test between a persona's active adapter and a challenger, on users' pairwise verdicts.

A gate-passing candidate first runs as a blind challenger (DESIGN.md, "The loop", 7).
Every side-by-side verdict between the two is one Bernoulli trial: the challenger
won, or it lost. Ties (and "both bad") are counted but dropped from the test, since
they say nothing about which version is better. ``p`` is the challenger's win
probability; it is better when ``p > 0.5``.

The gateway re-runs ``analyse`` after every vote, so the interval must stay valid
however often it is looked at, and stopping at the first look that decides must not
raise the error rate. A fixed-horizon interval (Wilson, normal, bootstrap) looked at
after every vote promotes an indifferent challenger far more often than 5% (see
``tests/test_abtest.py``). The rule therefore uses a *confidence sequence*: the
beta-binomial mixture martingale (Robbins 1970; Howard et al. 2021, "Time-uniform,
nonparametric, nonasymptotic confidence sequences"). After ``n`` decisive verdicts
with ``S`` challenger wins, for a hypothesised ``p``::

    M_n(p) = B(a + S, b + n - S) / B(a, b) / (p^S (1 - p)^(n - S))

is a non-negative martingale with ``M_0 = 1`` when ``p`` is the true win probability,
so by Ville's inequality ``P(M_n(p) >= 1/alpha for some n) <= alpha``. The set
``{p : M_n(p) < 1/alpha}`` is an interval that holds the true ``p`` at every ``n`` at
once with probability at least ``1 - alpha``; ``low`` and ``high`` are its ends, found
by bisection on ``log M`` (``math.lgamma``, stable for any ``n``).

The decision, at every look:

* **promote** when at least ``min_votes`` decisive verdicts are in and ``low > 0.5``;
* **retire** when ``high < 0.5`` (at any count), or when the experiment's time limit
  has passed (``expired``) and the challenger was not promoted;
* **continue** otherwise.

A challenger that is not better (``p <= 0.5``) is promoted only if the sequence misses
its ``p``, so with probability at most ``alpha`` whenever and however often the test
is read; a better one is retired by the sequence with probability at most ``alpha``
too. (Retiring on the time limit is a choice to keep the active version when the
evidence is not in, not an error the sequence controls.) ``min_votes`` keeps the
first promotions from resting on a handful of early voters.

Shown beside the sequence, not used for the decision: a percentile bootstrap interval
(fixed-horizon, valid only at a horizon chosen in advance) and the win rate with
answer length controlled (FastChat's "style control": longer answers win more votes
whatever their content, so a challenger that merely talks more should not look better).

    from feedback.abtest import ABRules, Verdict, analyse

    verdicts = [Verdict(True, length_diff=12), Verdict(None), Verdict(False, -3), ...]
    result = analyse(verdicts, ABRules(alpha=0.05, min_votes=40), expired=False)
    result.decision   # "promote" | "retire" | "continue"
    result.reason     # "challenger won 31 of 45 decisive verdicts (69%, 95% interval
                      #  0.46-0.86 includes 0.5); continue"
    result.as_dict()  # JSON-safe, for the store and the dashboard

``tests/test_abtest.py`` runs the rule on simulated voters with known preferences and
measures its error rates; ``-s`` prints the figures.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

# Mixing prior Beta(PRIOR, PRIOR) of the martingale. A mixture is tightest where the
# effect it can detect at that sample size matches the prior's spread: Beta(r, r) has
# standard deviation 1 / (2 sqrt(2r + 1)), about 0.11 for r = 10, which is the distance
# from 0.5 that about 100 verdicts can resolve. Simulated over r = 1..100, r = 5..10
# needed the fewest votes to promote a 65/35 challenger (median 84 against 90 for r = 1
# and 121 for r = 50) and gave the narrowest interval at an observed rate of 0.65 for
# n = 50..400. A flat prior (r = 1) spends its evidence on win rates of 0.9 and more,
# which a retrained adapter never reaches; a tight one (r = 50) only believes in
# effects too small to matter. tests/test_abtest.py::test_prior_choice keeps the check.
PRIOR = 10.0

# With voters preferring the challenger 65/35, at least 90% of experiments promote
# within min_votes + PROMOTE_WITHIN decisive verdicts (the default rules; measured in
# tests/test_abtest.py). A sizing figure for how long an A/B round needs to run.
PROMOTE_WITHIN = 200

# Fewer decisive verdicts than this and the length-controlled rate is not estimated.
LENGTH_MIN_VOTES = 10
# Ridge penalty on the slope of length (in root-mean-square units of length_diff):
# small beside the data, it keeps the slope finite when wins are split by length alone.
LENGTH_L2 = 1.0

BISECTION_STEPS = 64  # halves [0, 1] down to below double precision


@dataclass(frozen=True)
class ABRules:
    """When an A/B round may decide."""

    alpha: float = 0.05  # error rate of each decision, valid however often the test is read
    min_votes: int = 40  # decisive (non-tie) verdicts before any promotion

    def __post_init__(self) -> None:
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be between 0 and 1, got {self.alpha}")
        if self.min_votes < 0:
            raise ValueError(f"min_votes must be >= 0, got {self.min_votes}")


@dataclass(frozen=True)
class Verdict:
    """One side-by-side verdict between the challenger and the active version."""

    challenger_won: bool | None  # None: a tie (or both bad), counted but not evidence
    length_diff: float = 0.0  # challenger answer's words minus the active answer's


@dataclass
class ABResult:
    """The test's figures after the verdicts so far, and what to do."""

    votes: int  # decisive verdicts
    ties: int
    wins: int  # challenger wins
    win_rate: float | None  # wins / votes (None with no votes)
    low: float  # confidence sequence (always valid) of the challenger's win probability
    high: float
    boot_low: float | None  # percentile bootstrap interval (fixed-horizon, for display)
    boot_high: float | None
    length_controlled: float | None  # win rate at equal answer length
    decision: str  # "promote" | "retire" | "continue"
    reason: str

    def as_dict(self) -> dict:
        """All fields as plain JSON types."""
        return {k: float(v) if isinstance(v, float) else v for k, v in asdict(self).items()}


def analyse(verdicts: list[Verdict], rules: ABRules = ABRules(), expired: bool = False,
            seed: int = 0) -> ABResult:
    """The figures and the decision after ``verdicts`` (the round's, in any order).

    ``expired``: the experiment's time limit has passed, so anything not promoted
    now is retired. ``seed`` fixes the bootstrap, so the same votes read the same."""
    decisive = [v for v in verdicts if v.challenger_won is not None]
    votes = len(decisive)
    wins = sum(1 for v in decisive if v.challenger_won)
    low, high = confidence_sequence(wins, votes, rules.alpha)
    boot = bootstrap_interval(wins, votes, rules.alpha, seed=seed)
    decision, reason = decide(wins, votes, low, high, rules, expired)
    return ABResult(
        votes=votes, ties=len(verdicts) - votes, wins=wins,
        win_rate=wins / votes if votes else None, low=low, high=high,
        boot_low=boot[0] if boot else None, boot_high=boot[1] if boot else None,
        length_controlled=length_controlled_rate(decisive),
        decision=decision, reason=reason)


def decide(wins: int, votes: int, low: float, high: float, rules: ABRules,
           expired: bool) -> tuple[str, str]:
    """The decision rule (see the module docstring) and its one-sentence reason."""
    level = f"{100 * (1 - rules.alpha):g}%"
    if votes == 0:
        figures = "no decisive verdicts yet"
    else:
        figures = (f"challenger won {wins} of {votes} decisive verdicts "
                   f"({wins / votes:.0%}, {level} interval {low:.2f}-{high:.2f}")
    if votes >= rules.min_votes and low > 0.5:
        return "promote", f"{figures} > 0.5): better than the active version; promote"
    if high < 0.5:
        return "retire", f"{figures} < 0.5): worse than the active version; retire"
    if votes and low > 0.5:
        figures += f" > 0.5) but promotion needs {rules.min_votes} decisive verdicts"
    elif votes:
        figures += " includes 0.5)"
    if expired:
        return "retire", (f"time limit passed before the challenger was shown better: "
                          f"{figures}; retire")
    return "continue", f"{figures}; continue"


def confidence_sequence(wins: int, votes: int, alpha: float, prior: float = PRIOR
                        ) -> tuple[float, float]:
    """The always-valid ``1 - alpha`` interval ``{p : M_n(p) < 1/alpha}`` of the win probability.

    ``(0, 1)`` with no votes. The ends are the last points bisection found *outside*
    the set, so the interval returned contains the exact one: ``low > 0.5`` implies
    ``excludes(wins, votes, 0.5, alpha)``."""
    if votes == 0:
        return 0.0, 1.0
    threshold = math.log(1 / alpha)
    mixture = log_mixture(wins, votes, prior)
    rate = wins / votes  # M_n(rate) <= 1, so rate is always inside

    def outside(p: float) -> bool:
        return mixture - _loglik(wins, votes, p) >= threshold

    low = 0.0 if wins == 0 else _boundary(outside, out=0.0, inside=rate)
    high = 1.0 if wins == votes else _boundary(outside, out=1.0, inside=rate)
    return low, high


def _boundary(outside, out: float, inside: float) -> float:
    """Bisection between a point outside the (convex) set and one inside; returns the
    outside end, so the set found is never narrower than the true one."""
    for _ in range(BISECTION_STEPS):
        mid = (out + inside) / 2
        if mid in (out, inside):
            break
        if outside(mid):
            out = mid
        else:
            inside = mid
    return out


def excludes(wins, votes, p: float, alpha: float, prior: float = PRIOR):
    """Whether ``p`` lies outside the confidence sequence: ``M_n(p) >= 1/alpha``.

    Works on integer arrays (simulated paths) as well as single counts; ``0 < p < 1``."""
    return log_martingale(wins, votes, p, prior) >= math.log(1 / alpha)


def log_martingale(wins, votes, p: float, prior: float = PRIOR):
    """``log M_n(p)``: the log of the mixture's likelihood over ``p``'s. Arrays or counts."""
    return log_mixture(wins, votes, prior) - _loglik(wins, votes, p)


def log_mixture(wins, votes, prior: float = PRIOR):
    """``log B(a + S, b + n - S) - log B(a, b)`` with ``a = b = prior``: the log likelihood
    of the verdicts under a win probability drawn from Beta(prior, prior).

    Takes counts or integer arrays; ``log Gamma`` comes from a table over ``0..max(n)``,
    so a whole simulation costs one ``math.lgamma`` per distinct count."""
    wins = np.asarray(wins, dtype=np.int64)
    votes = np.asarray(votes, dtype=np.int64)
    top = int(votes.max(initial=0))
    side = np.array([math.lgamma(prior + k) for k in range(top + 1)])
    both = np.array([math.lgamma(2 * prior + k) for k in range(top + 1)])
    prior_beta = 2 * math.lgamma(prior) - math.lgamma(2 * prior)
    value = side[wins] + side[votes - wins] - both[votes] - prior_beta
    return float(value) if value.ndim == 0 else value


def _loglik(wins, votes, p: float):
    """Log likelihood of ``wins`` out of ``votes`` in that order at win probability ``p``."""
    return np.asarray(wins) * math.log(p) + (np.asarray(votes) - np.asarray(wins)) * math.log1p(-p)


def bootstrap_interval(wins: int, votes: int, alpha: float, seed: int = 0,
                       resamples: int = 2000) -> tuple[float, float] | None:
    """Percentile bootstrap ``1 - alpha`` interval of the win rate; None with no votes.

    Resampling ``votes`` Bernoulli verdicts with replacement is a binomial draw at the
    observed rate. Fixed-horizon: right only when read once, at a count chosen ahead."""
    if votes == 0:
        return None
    rng = np.random.default_rng(seed)
    rates = rng.binomial(votes, wins / votes, size=resamples) / votes
    low, high = np.quantile(rates, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def length_controlled_rate(verdicts: list[Verdict]) -> float | None:
    """The challenger's win rate at equal answer length (style control).

    Logistic regression of ``challenger_won`` on an intercept and the length difference
    (scaled by its root mean square, not centred, so that 0 still means equal length);
    the answer is ``sigmoid(intercept)``. Ties are dropped. None with fewer than
    ``LENGTH_MIN_VOTES`` decisive verdicts, or when they are all wins or all losses
    (the intercept would be infinite). A ridge ``LENGTH_L2`` on the slope keeps it finite
    when length splits wins from losses exactly. When every verdict has the same
    length difference, length cannot be told apart from preference and the slope's
    ridge hands it all to the intercept: the controlled rate is then the raw one."""
    decisive = [v for v in verdicts if v.challenger_won is not None]
    y = np.array([1.0 if v.challenger_won else 0.0 for v in decisive])
    if len(y) < LENGTH_MIN_VOTES or y.min() == y.max():
        return None
    diff = np.array([float(v.length_diff) for v in decisive])
    scale = math.sqrt(float(np.mean(diff * diff)))
    x = diff / scale if scale > 0 else np.zeros_like(diff)
    intercept, _ = _ridge_logistic(x, y, LENGTH_L2)
    return float(1 / (1 + math.exp(-intercept)))


def _ridge_logistic(x: np.ndarray, y: np.ndarray, l2: float, steps: int = 50
                    ) -> tuple[float, float]:
    """``(intercept, slope)`` minimising the logistic loss plus ``l2 / 2 * slope^2``.

    Newton's method with step halving; the loss is strictly convex and, with both
    outcomes present, bounded below by a coercive function, so it converges."""
    design = np.column_stack([np.ones_like(x), x])
    penalty = np.diag([0.0, l2])
    beta = np.zeros(2)
    loss = _penalised_loss(design, y, beta, penalty)
    for _ in range(steps):
        prob = 1 / (1 + np.exp(-(design @ beta)))
        grad = design.T @ (prob - y) + penalty @ beta
        hess = design.T @ (design * (prob * (1 - prob))[:, None]) + penalty
        # the jitter only matters if the weights prob * (1 - prob) underflow to 0
        step = np.linalg.solve(hess + 1e-9 * np.eye(2), grad)
        for _ in range(30):  # halve until the loss does not rise
            if _penalised_loss(design, y, beta - step, penalty) <= loss:
                break
            step = step / 2
        beta = beta - step
        loss = _penalised_loss(design, y, beta, penalty)
        if float(np.abs(step).max()) < 1e-10:
            break
    return float(beta[0]), float(beta[1])


def _penalised_loss(design: np.ndarray, y: np.ndarray, beta: np.ndarray,
                    penalty: np.ndarray) -> float:
    eta = design @ beta
    # log(1 + e^eta) - y * eta, written to stay finite for large |eta|
    return float(np.sum(np.logaddexp(0.0, eta) - y * eta) + beta @ penalty @ beta / 2)


def promotion_chance(wins: int, votes: int, budget: int, rules: ABRules = ABRules()) -> float:
    """The chance that the experiment promotes before it reaches ``budget`` decisive verdicts.

    For a vote budget, not for the decision: a simulated A/B round (``persona simulate``)
    that plays at most ``budget`` decisive verdicts can stop early when this is small,
    since its challenger would almost surely end undecided anyway. The win probability
    is given a flat prior updated by the verdicts so far (Beta(1 + wins, 1 + losses)), so
    the verdicts still to come follow a Polya urn: after ``n`` verdicts with ``s`` wins
    the next is a win with probability ``(1 + s) / (2 + n)``. The chance is exact under
    that model (``promotion_chances``). Stopping on it can only lower the promotion
    rate, so an indifferent challenger is promoted no more often than without it;
    ``tests/test_abtest.py::test_futility`` measures what a better one loses, and the
    verdicts it saves."""
    if votes >= budget:
        return 0.0
    return float(promotion_chances(budget, rules)[votes, wins])


def promotion_chances(budget: int, rules: ABRules = ABRules()) -> np.ndarray:
    """``chance[n, s]``: from ``s`` wins in ``n`` decisive verdicts, the chance of a promotion
    by ``budget`` verdicts (see ``promotion_chance``). Backward induction over ``n``: 1
    where the rule promotes (``decide``), 0 where it retires or the budget is spent, else
    the urn's mix of the next verdict's two outcomes."""
    promote_at, retire_at = decision_boundaries(budget, rules)
    wins = np.arange(budget + 2)
    chance = np.zeros((budget + 1, budget + 2))
    if budget >= rules.min_votes:  # the budget's last verdict may still promote
        chance[budget, promote_at[budget]:] = 1.0
    for n in range(budget - 1, -1, -1):
        win = (1 + wins[:-1]) / (2 + n)
        chance[n, :-1] = win * chance[n + 1, 1:] + (1 - win) * chance[n + 1, :-1]
        if n >= rules.min_votes:
            chance[n, promote_at[n]:] = 1.0
        chance[n, :retire_at[n] + 1] = 0.0
    return chance[:, :-1]


def decision_boundaries(budget: int, rules: ABRules) -> tuple[np.ndarray, np.ndarray]:
    """For each decisive count ``n`` in ``0..budget``: the fewest wins whose interval lies
    above 0.5 (``n + 1``: none), and the most wins whose interval lies below it (-1: none)."""
    n = np.arange(budget + 1)[:, None]
    w = np.arange(budget + 1)[None, :]
    valid = w <= n
    safe_n, safe_w = np.broadcast_to(n, (budget + 1,) * 2), np.where(valid, w, 0)
    outside = excludes(safe_w, safe_n, 0.5, rules.alpha) & valid
    above = outside & (2 * w > n)
    below = outside & (2 * w < n)
    promote_at = np.where(above.any(axis=1), above.argmax(axis=1), n[:, 0] + 1)
    retire_at = np.where(below.any(axis=1), budget - below[:, ::-1].argmax(axis=1), -1)
    return promote_at, retire_at
