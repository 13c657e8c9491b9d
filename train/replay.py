"""Bounded replay: a run trains on the pairs new since the active version plus a few earlier ones.

A pair is new (on-policy) when one of its answers was spoken by the active
version: the votes the active version earned. Earlier pairs (answers of older
versions) were learned by the runs before; a run replays at most ``limit`` of
them, chosen at random (seeded), and at most ``max_new`` new ones (a version
that stays active long, a challenger that lost, gathers many), so a run's size,
and its time, stays flat however many votes were ever cast, while old lessons
are still rehearsed.
Held-out rows are all kept: judging costs little and more of them make the
gate's verdict firmer.

    rows, figures = bound_replay(rows, active_version=3, limit=48, seed=0, max_new=96)
"""

from __future__ import annotations

import random


def bound_replay(rows: list[dict], active_version: int, limit: int, seed: int = 0,
                 max_new: int | None = None) -> tuple[list[dict], dict]:
    """``rows`` with the earlier pairs cut to ``limit`` (and the new ones to ``max_new``, a
    version that stays active long gathers many), drawn at random with ``seed``."""
    held = [r for r in rows if r.get("split") == "heldout"]
    train = [r for r in rows if r.get("split") != "heldout"]
    new = [r for r in train if active_version in list(r.get("versions") or [])]
    old = [r for r in train if active_version not in list(r.get("versions") or [])]
    rng = random.Random(seed)
    kept = new if max_new is None or len(new) <= max_new else rng.sample(new, max_new)
    replay = rng.sample(old, min(limit, len(old)))
    return kept + replay + held, {"new": len(new), "new_kept": len(kept), "replayed": len(replay),
                                  "earlier": len(old)}
