"""Votes and side-by-side comparisons on served turns.

Checked before anything is written: the turn exists, the caller is the client
it was served to, the answer index exists, and compared turns share the same
prompt context. A refused vote changes nothing and raises ``APIError`` with the
HTTP status the gateway answers with.

A vote counts for the turn's voter (``turns.voter``: the API key, or the UI
login, or ``ui``), recorded with it. Posting the same thumb on the same answer
again, or the same verdict on the same two turns, changes nothing: only a
changed vote is a new row (the latest one counts: the last inserted, by the
tables' insertion sequence ``seq``, not by the clock).

    from feedback.votes import record_vote, record_comparison
    record_vote(store, turn_id, "up", client="key:ab12...", reason="helpful")
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from feedback.errors import APIError
from feedback.store import Store, utc_now

# The temperature the side-by-side view samples its two answers at: two samples of one
# version must be able to differ, and a user should compare what a version typically says.
# `persona simulate` plays those votes at the same temperature.
SIDE_BY_SIDE_TEMPERATURE = 0.8

VOTES = ("up", "down", "retract")
CHOICES = ("a", "b", "tie", "both_bad")
MAX_REASON, MAX_COMMENT = 200, 2000


def _own_turn(store: Store, turn_id: str, client: str, param: str) -> tuple[str, str]:
    """(voter, messages JSON) of a turn served to ``client``."""
    rows = store.query("SELECT client, voter, messages FROM turns WHERE id = ?", [turn_id])
    if not rows:
        raise APIError(404, f"No turn with id {turn_id!r}.", param)
    owner, voter, messages = rows[0]
    if owner != client:
        raise APIError(403, f"Turn {turn_id!r} was not served to this key or session.", param)
    return voter or owner, messages


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
    owner, answers, _ = owners[v.turn_id]
    if owner != v.client:
        raise APIError(403, f"Turn {v.turn_id!r} was not served to this key or session.", "turn_id")
    if not 0 <= v.choice_index < answers:
        raise APIError(400, f"Turn {v.turn_id!r} has {answers} answer(s); "
                            f"choice_index {v.choice_index} does not exist.", "choice_index")


def _current(store: Store, turn_ids: list[str]) -> dict[tuple, tuple]:
    """(turn, answer, client) -> (vote, reason, comment) that counts now, for these turns. Read from the
    votes table with a plain filter (the current_votes view would rank every vote first)."""
    current: dict[tuple, tuple] = {}
    for t, i, c, vote, reason, comment in store.query(
            "SELECT turn_id, choice_index, client, vote, reason, comment FROM votes "
            "WHERE turn_id IN (SELECT unnest(?)) ORDER BY seq", [turn_ids]):
        current[t, i, c] = (vote, reason, comment)
    return {k: v for k, v in current.items() if v[0] != "retract"}


def record_votes(store: Store, votes: list[Vote]) -> list[str | APIError]:
    """Check and write many votes with one lookup and one insert (a group commit); each
    result is what happened to that vote, or why it was refused. Refused votes write nothing.

    Votes are appended: a change or a retraction is a new row, so the history stays; a
    vote equal to the one that counts now is ``unchanged`` and writes nothing."""
    ids = sorted({v.turn_id for v in votes})
    owners = {tid: (client, n, voter) for tid, client, n, voter in store.query(
        "SELECT id, client, json_array_length(answers), coalesce(voter, client) FROM turns "
        "WHERE id IN (SELECT unnest(?))", [ids])}
    current = _current(store, ids)
    results: list[str | APIError] = []
    rows = []
    for v in votes:
        try:
            _check(v, owners)
        except APIError as exc:
            results.append(exc)
            continue
        key = (v.turn_id, v.choice_index, v.client)
        now = current.get(key)  # what counts, this batch's earlier votes included
        if v.vote == "retract" and now is None:
            results.append("nothing to retract")
            continue
        if now is not None and now == (v.vote, v.reason, v.comment):
            results.append("unchanged")
            continue
        current[key] = None if v.vote == "retract" else (v.vote, v.reason, v.comment)
        if current[key] is None:
            del current[key]
        rows.append([v.turn_id, v.choice_index, v.client, v.vote, v.reason, v.comment, v.user_name, utc_now(),
                     owners[v.turn_id][2]])
        results.append("retracted" if v.vote == "retract" else "recorded")
    if rows:
        columns = list(zip(*rows))
        store.execute("INSERT INTO votes (turn_id, choice_index, client, vote, reason, comment, user_name, created_at, "
                      "voter) SELECT unnest(?), unnest(?), unnest(?), unnest(?), unnest(?), unnest(?), unnest(?), "
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
    voter, a_messages = _own_turn(store, turn_a, client, "turn_a")
    _, b_messages = _own_turn(store, turn_b, client, "turn_b")
    if a_messages != b_messages:
        raise APIError(400, "turn_a and turn_b answer different prompt contexts; only answers to the "
                            "same messages can be compared.", "turn_b")
    same = _same_verdict(store, turn_a, turn_b, choice, voter)
    if same is not None:
        return same
    comparison_id = f"cmp-{uuid.uuid4().hex}"
    store.execute("INSERT INTO comparisons (id, turn_a, turn_b, choice, left_turn, client, user_name, created_at, "
                  "voter) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                  [comparison_id, turn_a, turn_b, choice, turn_a if left == "a" else turn_b, client, user_name,
                   utc_now(), voter])
    return comparison_id


def _verdict(turn_a: str, turn_b: str, choice: str) -> str:
    """A comparison's verdict whichever order its turns were given in: the winner's id, or the choice."""
    return {"a": turn_a, "b": turn_b}.get(choice, choice)


def _same_verdict(store: Store, turn_a: str, turn_b: str, choice: str, voter: str) -> str | None:
    """The id of this voter's comparison of these two turns that counts now, when it says the
    same as ``choice`` (so posting it again changes nothing)."""
    rows = store.query("SELECT id, turn_a, turn_b, choice FROM comparisons WHERE voter = ? "
                       "AND least(turn_a, turn_b) = least(?, ?) AND greatest(turn_a, turn_b) = greatest(?, ?) "
                       "ORDER BY seq DESC LIMIT 1", [voter, turn_a, turn_b, turn_a, turn_b])
    if rows and _verdict(*rows[0][1:]) == _verdict(turn_a, turn_b, choice):
        return rows[0][0]
    return None
