"""Example raters for ``persona simulate``: ``(prompt, answer_a, answer_b) -> "a" | "b" | "tie"``.

Each has a taste the base model does not start with, so a loop that learns
shows up as a rising preference rate. ``longer`` is ``shorter``'s opposite: next
to two or more ``shorter`` raters it is the voter the outlier rule gives no weight.

    persona simulate --rater train.raters:shorter --persona teto
    PERSONA_API_KEY=k1,k2,k3 persona simulate --rater train.raters:shorter --rater train.raters:shorter \
        --rater train.raters:longer --flip 0.1 --persona teto
"""

from __future__ import annotations


def shorter(prompt: str, answer_a: str, answer_b: str) -> str:
    """Prefers the shorter answer (by words); a tie within 10%."""
    a, b = len(answer_a.split()), len(answer_b.split())
    if abs(a - b) <= 0.1 * max(a, b, 1):
        return "tie"
    return "a" if a < b else "b"


def longer(prompt: str, answer_a: str, answer_b: str) -> str:
    """Prefers the longer answer (by words); a tie within 10% (the opposite of ``shorter``)."""
    return {"a": "b", "b": "a"}.get(verdict := shorter(prompt, answer_a, answer_b), verdict)


def asks_back(prompt: str, answer_a: str, answer_b: str) -> str:
    """Prefers an answer that ends by asking the user a question."""
    qa, qb = answer_a.rstrip().endswith("?"), answer_b.rstrip().endswith("?")
    if qa == qb:
        return "tie"
    return "a" if qa else "b"
