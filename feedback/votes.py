"""Votes and side-by-side comparisons on served turns.

Checked before anything is written: the turn exists, the caller is the client
it was served to, the answer index exists, and compared turns share the same
prompt context. A refused vote changes nothing.

    from feedback.votes import record_vote, record_comparison
    record_vote(store, turn_id, "up", client="key:ab12...", reason="helpful")
"""

from __future__ import annotations

import uuid

from feedback.errors import UserError
from feedback.store import Store, utc_now

VOTES = ("up", "down", "retract")
CHOICES = ("a", "b", "tie", "both_bad")
MAX_REASON, MAX_COMMENT = 200, 2000


class FeedbackError(UserError):
    """A refused vote; ``status`` is the HTTP status the gateway answers with."""

    def __init__(self, status: int, message: str, param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param


def _own_turn(store: Store, turn_id: str, client: str, param: str) -> tuple[int, str]:
    """(number of answers, messages JSON) of a turn served to ``client``."""
    rows = store.query("SELECT client, json_array_length(answers), messages FROM turns WHERE id = ?", [turn_id])
    if not rows:
        raise FeedbackError(404, f"No turn with id {turn_id!r}.", param)
    owner, answers, messages = rows[0]
    if owner != client:
        raise FeedbackError(403, f"Turn {turn_id!r} was not served to this key or session.", param)
    return answers, messages


def record_vote(store: Store, turn_id: str, vote: str, client: str, choice_index: int = 0,
                reason: str | None = None, comment: str | None = None, user_name: str | None = None) -> str:
    """Record, change or retract a thumbs vote; returns what happened.

    Votes are appended: a change or a retraction is a new row, so the history stays.
    """
    if vote not in VOTES:
        raise FeedbackError(400, f"vote must be one of {', '.join(VOTES)}, not {vote!r}.", "vote")
    for name, value, limit in (("reason", reason, MAX_REASON), ("comment", comment, MAX_COMMENT)):
        if value is not None and len(value) > limit:
            raise FeedbackError(400, f"{name} is {len(value)} characters; the limit is {limit}.", name)
    answers, _ = _own_turn(store, turn_id, client, "turn_id")
    if not 0 <= choice_index < answers:
        raise FeedbackError(400, f"Turn {turn_id!r} has {answers} answer(s); "
                                 f"choice_index {choice_index} does not exist.", "choice_index")
    key = [turn_id, choice_index, client]
    if vote == "retract":
        current = store.query("SELECT count(*) FROM current_votes WHERE turn_id = ? AND choice_index = ? "
                              "AND client = ?", key)[0][0]
        if not current:
            return "nothing to retract"
    store.execute("INSERT INTO votes VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                  [*key, vote, reason, comment, user_name, utc_now()])
    return "retracted" if vote == "retract" else "recorded"


def record_comparison(store: Store, turn_a: str, turn_b: str, choice: str, left: str, client: str,
                      user_name: str | None = None) -> str:
    """Record which of two answers to the same context won; returns the comparison id."""
    if choice not in CHOICES:
        raise FeedbackError(400, f"choice must be one of {', '.join(CHOICES)}, not {choice!r}.", "choice")
    if left not in ("a", "b"):
        raise FeedbackError(400, f"left must be 'a' or 'b' (the answer shown on the left), not {left!r}.", "left")
    if turn_a == turn_b:
        raise FeedbackError(400, "turn_a and turn_b are the same turn.", "turn_b")
    _, a_messages = _own_turn(store, turn_a, client, "turn_a")
    _, b_messages = _own_turn(store, turn_b, client, "turn_b")
    if a_messages != b_messages:
        raise FeedbackError(400, "turn_a and turn_b answer different prompt contexts; only answers to the "
                                 "same messages can be compared.", "turn_b")
    comparison_id = f"cmp-{uuid.uuid4().hex}"
    store.execute("INSERT INTO comparisons VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                  [comparison_id, turn_a, turn_b, choice, turn_a if left == "a" else turn_b, client, user_name,
                   utc_now()])
    return comparison_id
