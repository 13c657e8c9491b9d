"""Bounded replay: a run trains on the pairs new since the active version plus a few earlier ones.

A pair is new (on-policy) when one of its answers was spoken by the active
version: the votes the active version earned. Earlier pairs (answers of older
versions) were learned by the runs before; a run replays at most ``limit`` of
them, chosen at random (seeded), and at most ``max_new`` new ones (a version
that stays active long, a challenger that lost, gathers many), so a run's size,
and its time, stays flat however many votes were ever cast, while old lessons
are still rehearsed.

Held-out rows are bounded the same way (``max_heldout``): the new ones first
(the candidate is judged on answers like the ones it replaces), then earlier
ones drawn at random. Judging every held-out pair ever cast made the gate's
phase grow each round (10 -> 75 pairs, 13 -> 94 s over five runs) while the
pairs of long-retired versions say little about the next one.

    rows, figures = bound_replay(rows, active_version=3, limit=48, seed=0, max_new=96, max_heldout=48)
"""

from __future__ import annotations

import random


def _new_first(rows: list[dict], active_version: int, limit: int | None, rng: random.Random) -> list[dict]:
    """At most ``limit`` of ``rows``: the active version's own first, then earlier ones at random."""
    new = [r for r in rows if active_version in list(r.get("versions") or [])]
    old = [r for r in rows if active_version not in list(r.get("versions") or [])]
    if limit is None or len(rows) <= limit:
        return new + old
    if len(new) >= limit:
        return rng.sample(new, limit)
    return new + rng.sample(old, limit - len(new))


def bound_replay(rows: list[dict], active_version: int, limit: int, seed: int = 0,
                 max_new: int | None = None, max_heldout: int | None = None) -> tuple[list[dict], dict]:
    """``rows`` with the earlier pairs cut to ``limit`` (and the new ones to ``max_new``, a
    version that stays active long gathers many; the held-out ones to ``max_heldout``),
    drawn at random with ``seed``."""
    held = [r for r in rows if r.get("split") == "heldout"]
    train = [r for r in rows if r.get("split") != "heldout"]
    new = [r for r in train if active_version in list(r.get("versions") or [])]
    old = [r for r in train if active_version not in list(r.get("versions") or [])]
    rng = random.Random(seed)
    kept = new if max_new is None or len(new) <= max_new else rng.sample(new, max_new)
    replay = rng.sample(old, min(limit, len(old)))
    judged = _new_first(held, active_version, max_heldout, rng)
    return kept + replay + judged, {"new": len(new), "new_kept": len(kept), "replayed": len(replay),
                                    "earlier": len(old), "heldout": len(held), "heldout_kept": len(judged)}
