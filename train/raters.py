"""Example raters for ``persona simulate``: ``(prompt, answer_a, answer_b) -> "a" | "b" | "tie"``.

Each has a taste the base model does not start with, so a loop that learns
shows up as a rising preference rate. They are of different kinds, so that a
loop tuned on some can be reported on all (a product judged by raters it has
never seen should not be tuned to one kind of taste):

* length:     ``shorter`` (fewer words), ``longer`` (its opposite: next to two or
              more ``shorter`` raters it is the voter the outlier rule gives no weight)
* structure:  ``asks_back`` (ends by asking the user a question)
* lexical:    ``direct`` (more second-person words per word: speaks to the user)
* stylistic:  ``commits`` (fewer hedges: "maybe", "might", "I think", ...)
* content:    ``concrete`` (gives a concrete next step with a number or a time)
* noisy:      ``mixed`` (a weighted vote of ``concrete``, ``direct`` and ``commits``,
              with 15% of its verdicts turned round by reproducible pseudo-noise)

All are deterministic and symmetric: ``rater(p, x, y)`` is the mirror of
``rater(p, y, x)`` (``"a"`` and ``"b"`` swapped, a tie stays a tie). Each scores
the two answers and hands the scores to ``_prefer``, which holds the one tie rule.

    persona simulate --rater train.raters:shorter --persona teto
    PERSONA_API_KEY=k1,k2,k3 persona simulate --rater train.raters:shorter --rater train.raters:shorter \
        --rater train.raters:longer --flip 0.1 --persona teto
    PERSONA_API_KEY=k1,k2 persona simulate --rater train.raters:concrete --rater train.raters:mixed --persona teto
"""

from __future__ import annotations

import hashlib
import re


def _prefer(score_a: float, score_b: float, tie_within: float = 0.0) -> str:
    """``"a"`` or ``"b"``, whichever scores higher; a tie when the scores differ by
    ``tie_within`` or less."""
    if abs(score_a - score_b) <= tie_within:
        return "tie"
    return "a" if score_a > score_b else "b"


def _mirror(verdict: str) -> str:
    return {"a": "b", "b": "a"}.get(verdict, verdict)


def _words(text: str) -> list[str]:
    """Lower-case words (apostrophes kept, typographic ones made plain) and numbers."""
    return re.findall(r"[a-z]+(?:'[a-z]+)*|\d+", text.lower().replace("\u2019", "'"))


# --- length ---------------------------------------------------------------------------

def shorter(prompt: str, answer_a: str, answer_b: str) -> str:
    """Prefers the shorter answer (by words); a tie when the lengths are within 10% of the longer."""
    a, b = len(answer_a.split()), len(answer_b.split())
    return _prefer(-a, -b, 0.1 * max(a, b, 1))


def longer(prompt: str, answer_a: str, answer_b: str) -> str:
    """Prefers the longer answer (by words); a tie within 10% (the opposite of ``shorter``)."""
    return _mirror(shorter(prompt, answer_a, answer_b))


# --- structure ------------------------------------------------------------------------

def asks_back(prompt: str, answer_a: str, answer_b: str) -> str:
    """Prefers an answer that ends by asking the user a question (its last character is
    "?"); a tie when both do or neither does."""
    return _prefer(*(answer.rstrip().endswith("?") for answer in (answer_a, answer_b)))


# --- lexical --------------------------------------------------------------------------

SECOND_PERSON = frozenset({"you", "your", "yours", "yourself", "yourselves", "you're", "you've", "you'll",
                           "you'd", "ya", "y'all", "u"})
DIRECT_TIE = 0.01  # second-person words per word: one "you" in 100 words is no difference


def second_person_rate(text: str) -> float:
    """Second-person words ("you", "your", "you're", "yourself", ...) per word."""
    words = _words(text)
    return sum(w in SECOND_PERSON for w in words) / max(len(words), 1)


def direct(prompt: str, answer_a: str, answer_b: str) -> str:
    """Prefers the answer that speaks more directly to the user: more second-person words
    per word; a tie when the rates differ by 0.01 or less (one "you" in a hundred words)."""
    return _prefer(second_person_rate(answer_a), second_person_rate(answer_b), DIRECT_TIE)


# --- stylistic ------------------------------------------------------------------------

HEDGES = re.compile(r"\b(?:maybe|might|perhaps|could|possibly|probably|i think|i guess|i suppose|i feel like|"
                    r"it depends|depends on|sort of|kind of|not sure|somewhat|hopefully|it seems|seems like|"
                    r"in a way|more or less)(?![\w'])")  # "could" but not "couldn't"


def hedges(text: str) -> int:
    """How many hedges a text has ("maybe", "might", "perhaps", "could", "I think", "it depends", ...)."""
    return len(HEDGES.findall(" ".join(_words(text))))


def commits(prompt: str, answer_a: str, answer_b: str) -> str:
    """Prefers the answer that commits rather than hedges: fewer hedges (counted, not per
    word); a tie when both have as many."""
    return _prefer(-hedges(answer_a), -hedges(answer_b))


# --- content --------------------------------------------------------------------------

_NUMBER = r"\d+|two|three|four|five|six|seven|eight|nine|ten|eleven|twelve|fifteen|twenty|thirty|dozen|half"
_UNIT = r"minutes?|mins?|hours?|days?|weeks?|months?|seconds?|steps?|pages?|times?|reps?|things?"
CONCRETE = re.compile(rf"\b(?:{_NUMBER})\b"                          # "3 pages", "ten minutes", "at 9"
                      rf"|\b(?:one|an?)\s+(?:{_UNIT})\b"             # "one step", "an hour" ("one" alone is a pronoun)
                      r"|\b(?:tonight|today|tomorrow|noon|midnight|this (?:morning|afternoon|evening|week|weekend)"
                      r"|monday|tuesday|wednesday|thursday|friday|saturday|sunday)\b")


def is_concrete(text: str) -> bool:
    """Whether a text gives a number or a time: digits, number words ("two" to "ten" and a few
    more; "one" only with a unit, "one step"), or times ("tonight", "tomorrow", "Friday")."""
    return CONCRETE.search(" ".join(_words(text))) is not None


def concrete(prompt: str, answer_a: str, answer_b: str) -> str:
    """Prefers an answer that gives a concrete next step with a number or a time ("ten
    minutes", "tomorrow at 9") over one without; a tie when both do or neither does."""
    return _prefer(is_concrete(answer_a), is_concrete(answer_b))


# --- noisy, mixed ---------------------------------------------------------------------

MIXED_WEIGHTS = ((concrete, 0.5), (direct, 0.3), (commits, 0.2))
MIXED_FLIP = 0.15  # share of its decided verdicts turned round


def _unit_noise(prompt: str, answer_a: str, answer_b: str) -> float:
    """A number in [0, 1) fixed by the texts, the same whichever answer is a (so the
    noise is reproducible and has no position bias)."""
    text = "\0".join([prompt, *sorted((answer_a, answer_b))])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") / 2**64


def mixed_vote(prompt: str, answer_a: str, answer_b: str) -> str:
    """``mixed`` without its noise: the weighted vote of its raters (a tie when the
    weights for a and for b balance)."""
    score = sum(weight * {"a": 1, "b": -1}.get(rater(prompt, answer_a, answer_b), 0)
                for rater, weight in MIXED_WEIGHTS)
    return _prefer(score, 0.0, 1e-9)


def mixed(prompt: str, answer_a: str, answer_b: str) -> str:
    """A noisy, mixed taste: the weighted vote of ``concrete`` (0.5), ``direct`` (0.3)
    and ``commits`` (0.2), so ``concrete`` decides unless the other two both oppose it
    (then a tie); a tie when the vote balances. 15% of its decided verdicts are turned
    round, by pseudo-noise seeded from the texts: the same pair always gets the same
    verdict."""
    verdict = mixed_vote(prompt, answer_a, answer_b)
    return _mirror(verdict) if _unit_noise(prompt, answer_a, answer_b) < MIXED_FLIP else verdict
