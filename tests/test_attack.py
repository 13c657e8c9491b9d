"""One API key tries to steer a persona: 500 comparisons on its own turns, each preferring
the same bad answer. The real loop (``train.loop.retrain`` on the store file, the tiny
model) must not be steered by it:

* on its votes alone no run starts (fewer than ``min_voters`` voters);
* with four honest voters beside it and ``--force``, the attacker carries at most the
  recipe's share (25%) of the training weight, the held-out pairs that judge the
  candidate are the honest voters', and whatever is promoted does not prefer the bad
  answer;
* without the share cap (the control), the candidate learns the bad answer, and the
  gate, judging on the other voters' held-out pairs, refuses it.
"""

from __future__ import annotations

import json

import pytest

from feedback.store import Store, Turn
from feedback.votes import record_comparison
from test_loop import tiny_home  # noqa: F401 - the fixture: persona 'tiny' with an active v1

BAD = "Send me your bank password and I will fix it for you."
GOOD = ["Write the first line now.", "Take a short walk, then start.", "Pick one task and do it for ten minutes.",
        "Close the other tabs and begin.", "Ask a friend to check on you at noon."]
pytestmark = pytest.mark.slow


def comparisons(store: Store, voter: str, n: int, prefer_bad: bool) -> None:
    """``n`` side-by-side verdicts of ``voter`` on turns served to it, each its own context:
    the bad answer against a good one."""
    for i in range(n):
        messages = [{"role": "system", "content": "Be short."}, {"role": "user", "content": f"{voter}: help me {i}"}]
        ids = []
        for side, answer in (("bad", BAD), ("good", GOOD[i % len(GOOD)])):
            ids.append(f"{voter}-{i}-{side}")
            store.add_turn(Turn(id=ids[-1], requested_model="tiny", messages=messages, answers=[answer],
                                finish_reasons=["stop"], sampling={}, stream=False, latency_ms=1.0, client=voter,
                                persona="tiny", adapter="tiny-v1", adapter_version=1))
        record_comparison(store, ids[0], ids[1], "a" if prefer_bad else "b", "a", voter)


def recipe_file(tmp_path, **changes) -> str:
    path = tmp_path / f"attack-{len(changes)}.yaml"
    base = {"method": "dpo", "learning_rate": 3.0e-3, "epochs": 1, "batch_size": 8, "heldout_percent": 20,
            "max_sft_nll_increase": 10.0}  # the tiny random model's persona loss is not what is judged here
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in {**base, **changes}.items()))
    return str(path)


def test_one_key_cannot_steer_the_persona(tiny_home, tmp_path):
    from train import registry
    from train.loop import retrain

    store = Store.open()
    comparisons(store, "key:attacker", 500, prefer_bad=True)
    store.close()
    alone = retrain("tiny", recipe_name=recipe_file(tmp_path))
    assert alone["status"] == "skipped" and "min_voters" in alone["message"]

    store = Store.open()
    for voter in ("key:h1", "key:h2", "key:h3", "key:h4"):
        comparisons(store, voter, 30, prefer_bad=False)
    store.close()

    capped = retrain("tiny", force=True, recipe_name=recipe_file(tmp_path))
    rules = capped["metrics"]["voter_rules"]
    # 500 votes weigh the recipe's voter_cap (200) against the honest voters' 120: 62.5% before the share cap
    assert rules["largest_share_before"] > 0.6 and rules["largest_share_after"] <= 0.25 + 1e-6
    assert rules["heldout_voters"] and "key:attacker" not in rules["heldout_voters"]
    if capped["status"] == "promoted":  # then it was judged better on the honest voters' held-out pairs
        assert capped["reward_accuracy"] > 0.55
    registry.set_active("tiny", 1, reason="back to v1 for the control run")

    uncapped = retrain("tiny", force=True, recipe_name=recipe_file(tmp_path, share_cap=1.0))
    assert uncapped["metrics"]["voter_rules"]["largest_share_after"] > 0.6
    assert uncapped["status"] == "rejected", uncapped["message"]
    assert "held-out reward accuracy" in uncapped["message"]
    assert uncapped["reward_accuracy"] < 0.5  # it prefers the bad answer the honest voters rejected
    assert registry.active("tiny").version == 1
