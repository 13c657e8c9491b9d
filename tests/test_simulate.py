"""`persona simulate` with several raters, on a fake API (no model): each rater votes with
its own keys, judges the same answers as the others, and --flip turns verdicts round."""

from __future__ import annotations

import random
from argparse import Namespace

import pytest

from feedback.errors import UserError
from train import simulate


class FakeApi:
    """Answers whose length depends on the seed; records every comparison posted."""

    def __init__(self):
        self.posted = []

    def ask(self, model, prompt, max_tokens, temperature, seed=None, headers=None):
        key = (headers or {}).get("Authorization", "-")
        return {"id": f"{key}/{prompt}/{seed}", "choices": [{"message": {"content": "x" * (seed % 7 + 1)}}]}

    def compare(self, turn_a, turn_b, choice, left, headers):
        self.posted.append((headers["Authorization"], turn_a, turn_b, choice, left))


def shorter(prompt, a, b):
    return "tie" if len(a) == len(b) else ("a" if len(a) < len(b) else "b")


def args(**kw):
    return Namespace(**{"prompts_list": ["p1", "p2", "p3"], "pairs_per_round": 200, "flip": 0.0, "persona": "teto",
                        "max_tokens": 8, "temperature": 1.0, "workers": 4, **kw})


def test_keys_are_dealt_to_the_raters(monkeypatch):
    monkeypatch.setenv("PERSONA_API_KEY", "k1,k2,k3,k4,k5")
    keys = simulate.rater_keys(2)
    assert [[h["Authorization"] for h in r] for r in keys] == [["Bearer k1", "Bearer k3", "Bearer k5"],
                                                               ["Bearer k2", "Bearer k4"]]
    monkeypatch.setenv("PERSONA_API_KEY", "k1")
    with pytest.raises(UserError, match="2 raters vote as 2 voters at least"):
        simulate.rater_keys(2)
    monkeypatch.delenv("PERSONA_API_KEY")
    assert simulate.rater_keys(1) == [[{}]]          # one rater, a gateway without keys


def test_every_rater_judges_the_same_pairs_with_its_own_keys_and_flip_adds_noise(monkeypatch):
    monkeypatch.setenv("PERSONA_API_KEY", "k1,k2,k3")
    raters = [simulate.Rater("shorter", shorter, keys) for keys in simulate.rater_keys(2)]
    api = FakeApi()
    counts = simulate.rate_round(api, raters, args(), random.Random(0), 1)
    assert sum(counts.values()) == 400
    by_key = {}
    for key, turn_a, turn_b, choice, left in api.posted:
        assert turn_a.startswith(key) and turn_b.startswith(key)      # a key rates only the turns it asked
        by_key.setdefault(key, []).append((turn_a.split("/", 1)[1], turn_b.split("/", 1)[1], choice))
    assert set(by_key) == {"Bearer k1", "Bearer k2", "Bearer k3"}
    assert len(by_key["Bearer k2"]) == 200 and len(by_key["Bearer k1"]) == len(by_key["Bearer k3"]) == 100
    # Identical tastes, the same seeds: both raters posted the same verdicts on the same answers.
    assert sorted(by_key["Bearer k1"] + by_key["Bearer k3"]) == sorted(by_key["Bearer k2"])
    api = FakeApi()
    simulate.rate_round(api, raters, args(flip=0.3), random.Random(0), 1)
    decided = [(choice, honest(a, b, left)) for _, a, b, choice, left in api.posted if honest(a, b, left) != "tie"]
    assert 0.2 < sum(c != h for c, h in decided) / len(decided) < 0.4    # about 30% turned round


def honest(turn_a: str, turn_b: str, left: str) -> str:
    """The choice the rater posts without noise (answer lengths follow from the seeds)."""
    one, two = ("x" * (int(t.rsplit("/", 1)[1]) % 7 + 1) for t in (turn_a, turn_b))
    verdict = shorter("", *((one, two) if left == "a" else (two, one)))
    return verdict if verdict == "tie" or left == "a" else simulate.flip(verdict)
