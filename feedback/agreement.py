"""Agreement between voters, and voters who disagree with everyone.

A *unit* is one thing several voters judged: a side-by-side context (the same
two answers to the same prompt) or one answer that got thumbs. Each voter gives
a unit at most one nominal value (``x``/``y``/``tie``/``both_bad`` for a pair,
with ``x`` the answer whose text sorts first; ``up``/``down`` for an answer).

* ``krippendorff_alpha(units)``: nominal alpha for any number of voters with
  missing values (1 = perfect agreement, 0 = what chance gives, < 0 worse);
  ``alpha_from_counts`` and ``alpha_from_sums`` are the same figure from each
  unit's value counts, or from the sums SQL makes of them.
* ``cohen_kappa(units, a, b)``: the two-voter special case.
* ``disagreeing_voters(units)``: voters who disagree with the consensus of the
  others far more often than a voter picking at random would (a one-sided
  binomial test against 1/2 on at least ``min_shared`` shared units with a
  decisive value, Bonferroni-corrected over the voters tested); ``flag`` is
  that rule on per-voter counts, however they were counted.

``units`` maps a unit key to ``{voter: value}``. Pure functions: the store's
rows become units in ``feedback.units`` (which counts the disagreements in SQL
for the pair builder); ``tests/test_agreement.py`` runs the rules on simulated
raters with known answers.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

Units = dict[object, dict[str, str]]


def krippendorff_alpha(units: Units) -> float | None:
    """Nominal Krippendorff's alpha; None when fewer than two values can be paired or
    every paired value is the same (agreement is then undefined, not perfect)."""
    return alpha_from_counts(Counter(ratings.values()) for ratings in units.values())


def alpha_from_counts(units: Iterable[Mapping[str, float]]) -> float | None:
    """Nominal alpha from each unit's ``{value: how many voters gave it}``.

    With ``m`` values in a unit and ``n_c`` of them ``c``, the unit adds ``n_c`` to the
    pairable total of ``c`` and ``(m^2 - sum n_c^2) / (m - 1)`` to the observed
    disagreement (its coincidences of unequal values)."""
    totals: Counter[str] = Counter()
    observed = 0.0
    for counts in units:
        m = sum(counts.values())
        if m < 2:
            continue
        totals.update(counts)
        observed += (m * m - sum(c * c for c in counts.values())) / (m - 1)
    n = sum(totals.values())
    return alpha_from_sums(n, observed, n * n - sum(c * c for c in totals.values()))


def alpha_from_sums(n: float, observed: float, expected: float) -> float | None:
    """Alpha from its sums (what SQL can hand over): ``n`` pairable values, the observed
    disagreement, and the expected one, ``n^2 - sum totals_c^2`` over the values' totals."""
    if n < 2 or expected <= 0:
        return None
    return 1 - (n - 1) * observed / expected


def cohen_kappa(units: Units, a: str, b: str) -> float | None:
    """Cohen's kappa of voters ``a`` and ``b`` on the units both judged; None without
    such units or when chance agreement is certain."""
    both = [(r[a], r[b]) for r in units.values() if a in r and b in r]
    if not both:
        return None
    n = len(both)
    observed = sum(x == y for x, y in both) / n
    first, second = Counter(x for x, _ in both), Counter(y for _, y in both)
    chance = sum(first[c] * second[c] for c in first) / (n * n)
    return None if chance == 1 else (observed - chance) / (1 - chance)


def binomial_tail(k: int, n: int, p: float) -> float:
    """P(X >= k) for X ~ Binomial(n, p), summed in log space (a voter with thousands of
    shared contexts would overflow ``comb(n, i) * p ** i`` as floats)."""
    if k <= 0:
        return 1.0
    if k > n or p <= 0:
        return 0.0
    if p >= 1:
        return 1.0
    log_p, log_q, log_n = math.log(p), math.log1p(-p), math.lgamma(n + 1)
    terms = [log_n - math.lgamma(i + 1) - math.lgamma(n - i + 1) + i * log_p + (n - i) * log_q
             for i in range(k, n + 1)]
    top = max(terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in terms))


@dataclass(frozen=True)
class Disagreement:
    voter: str
    shared: int          # units with a consensus of the other voters that this voter also judged
    disagreed: int
    chance: float        # the disagreement rate of a voter who picks at random
    p_value: float

    @property
    def reason(self) -> str:
        return (f"disagreed with the other voters' consensus on {self.disagreed} of {self.shared} shared contexts "
                f"({self.disagreed / self.shared:.0%}; chance {self.chance:.0%}, p={self.p_value:.2g})")


def _consensus(ratings: dict[str, str], leave_out: str) -> str | None:
    """The value most of the other voters gave, when at least two did and it has no tie
    (one other voter is an opinion, not a consensus: of two voters who disagree, neither
    is the outlier)."""
    top = Counter(v for voter, v in ratings.items() if voter != leave_out).most_common(2)
    if not top or top[0][1] < 2 or (len(top) == 2 and top[0][1] == top[1][1]):
        return None
    return top[0][0]


def voter_disagreements(units: Units, chance: float = 0.5) -> list[Disagreement]:
    """For each voter: how often they disagree with the others' consensus on shared units.

    ``units`` should hold decisive values only (``x``/``y``, ``up``/``down``): a voter
    who picks at random then disagrees with any consensus half the time (``chance``),
    an honest but noisy voter less often, and one who goes against the others far more.
    """
    shared: dict[str, list[bool]] = {}
    for ratings in units.values():
        for voter, value in ratings.items():
            consensus = _consensus(ratings, voter)
            if consensus is not None:
                shared.setdefault(voter, []).append(value != consensus)
    return [Disagreement(voter, len(rows), sum(rows), chance, binomial_tail(sum(rows), len(rows), chance))
            for voter, rows in sorted(shared.items())]


def disagreeing_voters(units: Units, min_shared: int = 20, level: float = 0.01) -> list[Disagreement]:
    """Voters whose disagreement with the others is far above chance: at least
    ``min_shared`` shared units and a p-value under ``level`` divided by the number of
    voters tested (so the chance of flagging any honest voter stays under ``level``)."""
    return flag(voter_disagreements(units), min_shared, level)


def flag(disagreements: Iterable[Disagreement], min_shared: int = 20, level: float = 0.01) -> list[Disagreement]:
    """The rule of ``disagreeing_voters`` on per-voter counts: of the voters with at least
    ``min_shared`` shared units, those above chance with p under ``level / voters tested``."""
    tested = [d for d in disagreements if d.shared >= min_shared]
    return [d for d in tested if d.disagreed > d.chance * d.shared and d.p_value < level / len(tested)]
