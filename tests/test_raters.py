"""The shipped raters (``train/raters.py``) on hand-made answers: each prefers the answer of
its taste in either position, ties where its docstring says, is symmetric, and ``mixed`` is
reproducible and noisy at about the rate it says."""

from __future__ import annotations

import random

import pytest

from train import raters
from train.raters import asks_back, commits, concrete, direct, longer, mixed, shorter

ALL = (shorter, longer, asks_back, direct, concrete, commits, mixed)
PROMPT = "I have an exam next week and I keep putting off studying."

PREFERS = [  # (rater, the answer it prefers, the other)
    (shorter, "Open the book.", "You should probably think about opening the book at some point soon."),
    (longer, "You should probably think about opening the book at some point soon.", "Open the book."),
    (asks_back, "Start tonight. Which chapter scares you most?", "Start tonight. Chapter one first."),
    (asks_back, "Ready?  \n", "Ready."),
    (direct, "You've got this: open your notes and quiz yourself.", "The notes should be opened and reviewed."),
    (direct, "You\u2019re fine. Open them.", "It is fine. Open them."),   # a typographic apostrophe
    (concrete, "Write for 10 minutes tonight.", "Write a little whenever it feels right."),
    (concrete, "Do three practice questions.", "Do some practice questions."),
    (concrete, "Start tomorrow at 9.", "Start soon."),
    (concrete, "Take one step: an hour of reading.", "Take the one you like."),
    (concrete, "Finish it by Friday.", "Finish it eventually."),
    (commits, "Call her today.", "Maybe you could call her, I think."),
    (commits, "I couldn't agree more. Go.", "Perhaps go."),                # "couldn't" is no hedge
    (commits, "It might help.", "It might help, or it depends, sort of."),  # fewer hedges, not none
]

TIES = [  # (rater, x, y): a tie in both orders
    (shorter, "one two three four five six seven eight nine ten", "one two three four five six seven eight nine"),
    (longer, "a b c", "d e f"),
    (asks_back, "Why?", "How?"),
    (asks_back, "Go.", "Stop."),
    (direct, "Open the notes.", "Read the book."),
    (direct, "Open your notes. " + "Then read the chapter slowly and carefully. " * 20, "Open the notes."),  # within 0.01
    (concrete, "Two pages.", "Call at 5."),
    (concrete, "Take the one you like.", "Take something."),     # "one" alone is a pronoun
    (commits, "Do it.", "Go."),
    (commits, "Maybe.", "Perhaps."),
    (mixed, "Same answer.", "Same answer."),
]


@pytest.mark.parametrize("rater, better, worse", PREFERS, ids=lambda v: getattr(v, "__name__", None))
def test_each_rater_prefers_its_taste_in_either_position(rater, better, worse):
    assert rater(PROMPT, better, worse) == "a"
    assert rater(PROMPT, worse, better) == "b"


@pytest.mark.parametrize("rater, x, y", TIES, ids=lambda v: getattr(v, "__name__", None))
def test_each_rater_ties_where_it_says(rater, x, y):
    assert rater(PROMPT, x, y) == rater(PROMPT, y, x) == "tie"


PIECES = ["Open your notes.", "You can do it.", "Maybe start later.", "I think it depends.", "Do 10 minutes.",
          "Start tonight.", "Read three pages.", "The book is long.", "Perhaps you could rest?", "Why not now?",
          "It might help, sort of.", "Go.", "Your plan works.", "Tomorrow at 9, study.", "Ask a friend?"]


def generated_pairs(count: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = random.Random(seed)

    def answer():
        return " ".join(rng.choice(PIECES) for _ in range(rng.randint(1, 5)))

    return [(answer(), answer()) for _ in range(count)]


@pytest.mark.parametrize("rater", ALL, ids=lambda r: r.__name__)
def test_every_rater_is_symmetric_and_decides_some_pairs(rater):
    verdicts = []
    for x, y in generated_pairs(300):
        verdict = rater(PROMPT, x, y)
        assert verdict in ("a", "b", "tie")
        assert rater(PROMPT, y, x) == {"a": "b", "b": "a"}.get(verdict, verdict)   # the mirror
        verdicts.append(verdict)
    assert verdicts.count("a") > 30 and verdicts.count("b") > 30   # a taste, not a constant


def test_mixed_is_a_weighted_vote():
    assert raters.mixed_vote(PROMPT, "Do 10 push-ups.", "Do push-ups.") == "a"          # concrete decides
    # concrete says a (0.5), direct and commits say b (0.3 + 0.2): the vote balances.
    assert raters.mixed_vote(PROMPT, "Maybe do 10 push-ups.", "You do your push-ups.") == "tie"


def test_mixed_is_reproducible_and_noisy_at_about_its_rate():
    pairs = generated_pairs(3000, seed=1)
    first = [mixed(PROMPT, x, y) for x, y in pairs]
    assert first == [mixed(PROMPT, x, y) for x, y in pairs]             # the same pair, the same verdict
    decided = [(verdict, raters.mixed_vote(PROMPT, x, y)) for verdict, (x, y) in zip(first, pairs)
               if verdict != "tie"]
    assert len(decided) > 1000
    flipped = sum(v != honest for v, honest in decided) / len(decided)
    assert abs(flipped - raters.MIXED_FLIP) < 0.03, flipped
    agrees = [v == concrete(PROMPT, x, y) for v, (x, y) in zip(first, pairs) if concrete(PROMPT, x, y) != "tie"]
    assert 0.6 < sum(agrees) / len(agrees) < 0.95                     # mostly concrete's taste, not quite
