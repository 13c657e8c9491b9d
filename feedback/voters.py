"""Per-run voter rules on preference rows (DPO pairs or KTO examples).

Each row carries a ``weight`` and the ``voters`` behind it; a row's weight
counts equally for each of its voters.

* ``cap_shares(rows, share)``: no single voter carries more than ``share`` of
  the run's total weight. Voters over the cap are scaled down to exactly the
  cap of the new total (the cap is solved for, not applied once: scaling a
  voter down lowers the total too). Applied only when there are enough voters
  for the share to be possible (``voters * share >= 1``).
* ``split_by_voter(rows, heldout_percent)``: the held-out rows come from voters
  who have no row in training, so a candidate is judged on other people's
  votes. Held-out voters are picked in a fixed order (md5 of the voter id)
  until their rows reach about ``heldout_percent`` of the weight, never past
  1.5 times it, so a voter whose rows alone are far more is never picked (one
  heavy voter would otherwise be the only judge), and training keeps
  ``min_train_voters`` (enough for the share cap to be possible). Rows of voters on both sides are dropped, and
  so are training rows whose context is held out. With fewer than three voters
  it returns None: the caller keeps the split by context.

    rows = cap_shares(rows, 0.25)
    split = split_by_voter(rows, 10)   # None, or the rows with 'split' set and a count of dropped rows

``apply_run_rules`` is both, in the order the loop applies them (``train/loop.py``).
"""

from __future__ import annotations

import hashlib
import math
from collections import defaultdict
from dataclasses import dataclass


def contributions(rows: list[dict]) -> dict[str, float]:
    """Total weight each voter carries (a row's weight split equally among its voters)."""
    totals: dict[str, float] = defaultdict(float)
    for row in rows:
        voters = row["voters"] or ["?"]
        for voter in voters:
            totals[voter] += row["weight"] / len(voters)
    return dict(totals)


def share_factors(totals: dict[str, float], share: float) -> dict[str, float]:
    """The factor for each voter's weight so that none is above ``share`` of the new total.

    With the top k voters capped, the new total T solves T = rest + k * share * T, so
    T = rest / (1 - k * share); k grows until the next voter is under the cap.
    """
    if len(totals) * share < 1 or share >= 1:
        return {v: 1.0 for v in totals}
    order = sorted(totals, key=totals.get, reverse=True)
    rest, k = sum(totals.values()), 0
    total = rest
    # k < len - 1: with len * share >= 1 the last voter is never over the cap.
    while k < len(order) - 1 and totals[order[k]] > share * total:
        rest -= totals[order[k]]
        k += 1
        total = rest / (1 - k * share)
    capped = set(order[:k])
    return {v: (share * total / totals[v] if v in capped else 1.0) for v in totals}


def largest_share(rows: list[dict]) -> float:
    """The largest share of the total weight one voter carries (0 without rows)."""
    totals = contributions(rows)
    total = sum(totals.values())
    return max(totals.values()) / total if total > 0 else 0.0


def cap_shares(rows: list[dict], share: float) -> list[dict]:
    """``rows`` with weights scaled so that no voter carries more than ``share`` of the total."""
    factors = share_factors(contributions(rows), share)
    out = []
    for row in rows:
        voters = row["voters"] or ["?"]
        scale = sum(factors[v] for v in voters) / len(voters)
        out.append({**row, "weight": row["weight"] * scale})
    return out


def _order(voter: str) -> str:
    return hashlib.md5(voter.encode()).hexdigest()


@dataclass
class VoterSplit:
    rows: list[dict]            # every row kept, with 'split' set to 'train' or 'heldout'
    heldout_voters: list[str]
    dropped: int                # rows with voters on both sides, or a held-out context


def split_by_voter(rows: list[dict], heldout_percent: float, min_voters: int = 3,
                   min_train_voters: int = 2) -> VoterSplit | None:
    totals = contributions(rows)
    if len(totals) < max(min_voters, 3, min_train_voters + 1) or heldout_percent <= 0:
        return None
    target = sum(totals.values()) * heldout_percent / 100
    most_judges = len(totals) - min_train_voters
    chosen: list[str] = []
    held = 0.0
    for voter in sorted(totals, key=_order):
        if held >= target or len(chosen) == most_judges:
            break
        if held + totals[voter] <= 1.5 * target:  # near the target, never a heavy voter
            chosen.append(voter)
            held += totals[voter]
    if not chosen:  # every voter is heavy: the lightest one judges
        chosen = [min(totals, key=lambda v: (totals[v], _order(v)))]
    judges = set(chosen)
    heldout = [r for r in rows if set(r["voters"] or ["?"]) <= judges]
    contexts = {r["context"] for r in heldout}
    train = [r for r in rows if not set(r["voters"] or ["?"]) & judges and r["context"] not in contexts]
    kept = [{**r, "split": "heldout"} for r in heldout] + [{**r, "split": "train"} for r in train]
    return VoterSplit(kept, sorted(judges), len(rows) - len(kept))


def apply_run_rules(rows: list[dict], share: float, heldout_percent: float,
                    min_voters: int = 3) -> tuple[list[dict], dict]:
    """The run's rows under both rules: first the held-out split by voter when there are
    voters enough for one (rows keep their 'split' by context otherwise), chosen on the
    votes' own weights, so that a voter who cast far more than the held-out share is never
    the judge; then the share cap on the training rows (the cap bounds what trains; the
    held-out rows only judge). Returns the rows and the figures for the run's metrics."""
    train_voters = max(2, math.ceil(1 / share - 1e-9)) if share > 0 else 2  # enough for the cap to be possible
    split = split_by_voter(rows, heldout_percent, min_voters, train_voters)
    rows_split = split.rows if split else rows
    train = cap_shares([r for r in rows_split if r["split"] == "train"], share)
    kept = train + [r for r in rows_split if r["split"] != "train"]
    return kept, {"voters": len(contributions(rows)), "largest_share_before": largest_share(rows),
                  "largest_share_after": largest_share(train), "split": "voter" if split else "context",
                  "heldout_voters": split.heldout_voters if split else [],
                  "dropped_rows": split.dropped if split else 0}
