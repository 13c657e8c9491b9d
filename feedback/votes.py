"""Votes and side-by-side comparisons on served turns.

Checked before anything is written: the turn exists, the caller is the client
it was served to, the answer index exists, and compared turns share the same
prompt context. A refused vote changes nothing and raises ``APIError`` with the
HTTP status the gateway answers with.

    from feedback.votes import record_vote, record_comparison
    record_vote(store, turn_id, "up", client="key:ab12...", reason="helpful")
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from feedback.errors import APIError
from feedback.store import Store, utc_now

VOTES = ("up", "down", "retract")
CHOICES = ("a", "b", "tie", "both_bad")
MAX_REASON, MAX_COMMENT = 200, 2000


def _own_turn(store: Store, turn_id: str, client: str, param: str) -> tuple[int, str]:
    """(number of answers, messages JSON) of a turn served to ``client``."""
    rows = store.query("SELECT client, json_array_length(answers), messages FROM turns WHERE id = ?", [turn_id])
    if not rows:
        raise APIError(404, f"No turn with id {turn_id!r}.", param)
    owner, answers, messages = rows[0]
    if owner != client:
        raise APIError(403, f"Turn {turn_id!r} was not served to this key or session.", param)
    return answers, messages


@dataclass(frozen=True)
class Vote:
    turn_id: str
    vote: str
    client: str
    choice_index: int = 0
    reason: str | None = None
    comment: str | None = None
    user_name: str | None = None


def _check(v: Vote, owners: dict) -> None:
    if v.vote not in VOTES:
        raise APIError(400, f"vote must be one of {', '.join(VOTES)}, not {v.vote!r}.", "vote")
    for name, value, limit in (("reason", v.reason, MAX_REASON), ("comment", v.comment, MAX_COMMENT)):
        if value is not None and len(value) > limit:
            raise APIError(400, f"{name} is {len(value)} characters; the limit is {limit}.", name)
    if v.turn_id not in owners:
        raise APIError(404, f"No turn with id {v.turn_id!r}.", "turn_id")
    owner, answers = owners[v.turn_id]
    if owner != v.client:
        raise APIError(403, f"Turn {v.turn_id!r} was not served to this key or session.", "turn_id")
    if not 0 <= v.choice_index < answers:
        raise APIError(400, f"Turn {v.turn_id!r} has {answers} answer(s); "
                            f"choice_index {v.choice_index} does not exist.", "choice_index")


def record_votes(store: Store, votes: list[Vote]) -> list[str | APIError]:
    """Check and write many votes with one lookup and one insert (a group commit); each
    result is what happened to that vote, or why it was refused. Refused votes write nothing.

    Votes are appended: a change or a retraction is a new row, so the history stays."""
    ids = sorted({v.turn_id for v in votes})
    owners = {tid: (client, n) for tid, client, n in store.query(
        "SELECT id, client, json_array_length(answers) FROM turns WHERE id IN (SELECT unnest(?))", [ids])}
    results: list[str | APIError] = []
    rows = []
    for v in votes:
        try:
            _check(v, owners)
        except APIError as exc:
            results.append(exc)
            continue
        if v.vote == "retract":
            current = store.query("SELECT vote FROM current_votes WHERE turn_id = ? AND choice_index = ? "
                                  "AND client = ?", [v.turn_id, v.choice_index, v.client])
            pending = [r for r in rows if r[:3] == [v.turn_id, v.choice_index, v.client]]
            if (pending and pending[-1][3] == "retract") or (not pending and not current):
                results.append("nothing to retract")
                continue
        rows.append([v.turn_id, v.choice_index, v.client, v.vote, v.reason, v.comment, v.user_name, utc_now()])
        results.append("retracted" if v.vote == "retract" else "recorded")
    if rows:
        columns = list(zip(*rows))
        store.execute("INSERT INTO votes SELECT unnest(?), unnest(?), unnest(?), unnest(?), unnest(?), unnest(?), "
                      "unnest(?), unnest(?)", [list(c) for c in columns])
    return results


def record_vote(store: Store, turn_id: str, vote: str, client: str, choice_index: int = 0,
                reason: str | None = None, comment: str | None = None, user_name: str | None = None) -> str:
    """Record, change or retract one thumbs vote; returns what happened."""
    result = record_votes(store, [Vote(turn_id, vote, client, choice_index, reason, comment, user_name)])[0]
    if isinstance(result, APIError):
        raise result
    return result


def record_comparison(store: Store, turn_a: str, turn_b: str, choice: str, left: str, client: str,
                      user_name: str | None = None) -> str:
    """Record which of two answers to the same context won; returns the comparison id."""
    if choice not in CHOICES:
        raise APIError(400, f"choice must be one of {', '.join(CHOICES)}, not {choice!r}.", "choice")
    if left not in ("a", "b"):
        raise APIError(400, f"left must be 'a' or 'b' (the answer shown on the left), not {left!r}.", "left")
    if turn_a == turn_b:
        raise APIError(400, "turn_a and turn_b are the same turn.", "turn_b")
    _, a_messages = _own_turn(store, turn_a, client, "turn_a")
    _, b_messages = _own_turn(store, turn_b, client, "turn_b")
    if a_messages != b_messages:
        raise APIError(400, "turn_a and turn_b answer different prompt contexts; only answers to the "
                            "same messages can be compared.", "turn_b")
    comparison_id = f"cmp-{uuid.uuid4().hex}"
    store.execute("INSERT INTO comparisons VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                  [comparison_id, turn_a, turn_b, choice, turn_a if left == "a" else turn_b, client, user_name,
                   utc_now()])
    return comparison_id
