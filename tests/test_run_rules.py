"""Run-level voter rules in the orchestrator, on a store with known votes (no model):
the share cap holds in the file the step reads, a run with too few voters is skipped
unless forced, the held-out rows come from voters with nothing in training, and the
scheduler waits for enough voters."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import duckdb
import pytest

from feedback.store import Store, Turn
from feedback.voters import contributions
from feedback.votes import record_vote


def pairs_of(store, voter: str, n: int, persona: str = "teto") -> None:
    """``n`` DPO pairs from ``voter``: on contexts of their own, an up and a down regeneration."""
    for i in range(n):
        for side, vote in (("good", "up"), ("bad", "down")):
            tid = f"{voter}-{i}-{side}"
            store.add_turn(Turn(id=tid, requested_model=persona, answers=[f"{side} {i}"],
                                messages=[{"role": "user", "content": f"{voter} q{i}"}], finish_reasons=["stop"],
                                sampling={}, stream=False, latency_ms=1.0, client=voter, persona=persona,
                                adapter=f"{persona}-v1", adapter_version=1))
            record_vote(store, tid, vote, voter)


@pytest.fixture
def store(persona_home):
    s = Store.open()  # the file a run reads when no gateway holds it
    yield s
    s.close()


def recipe(**changes):
    from train.recipes import DPORecipe

    return DPORecipe(method="dpo", **changes)


def read_file(path) -> list[dict]:
    con = duckdb.connect()
    cur = con.execute(f"SELECT weight, voters, context, split FROM read_parquet('{path}')")
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur.fetchall()]


def test_share_cap_and_voter_disjoint_heldout_in_the_file(store, tmp_path):
    from train.loop import export_preferences

    pairs_of(store, "heavy", 60)
    for voter in ("a", "b", "c", "d", "e"):
        pairs_of(store, voter, 8)
    # every pair is new; the replay bound (tests/test_learning_rules.py) is not what this test is about
    data, kind, train, figures = export_preferences(store, "teto", recipe(max_new_pairs=100), tmp_path, 1)
    rows = read_file(data)
    totals = contributions(rows)
    assert max(totals.values()) / sum(totals.values()) <= 0.25 + 1e-9   # 60% before
    assert figures["voters"] == 6 and figures["largest_share_before"] == pytest.approx(0.6)
    assert figures["largest_share_after"] <= 0.25 + 1e-9
    assert figures["split"] == "voter" and figures["heldout_voters"] and "heavy" not in figures["heldout_voters"]
    held = [r for r in rows if r["split"] == "heldout"]
    trained = [r for r in rows if r["split"] == "train"]
    assert {v for r in held for v in r["voters"]} == set(figures["heldout_voters"])
    assert not {v for r in held for v in r["voters"]} & {v for r in trained for v in r["voters"]}
    assert not {r["context"] for r in held} & {r["context"] for r in trained}
    assert (kind, train) == ("dpo", len(trained))
    assert len(rows) == 100 - figures["dropped_rows"]


def test_few_voters_keep_the_split_by_context_and_no_cap(store, tmp_path):
    from train.loop import export_preferences

    pairs_of(store, "a", 30)
    pairs_of(store, "b", 10)
    data, _, _, figures = export_preferences(store, "teto", recipe(), tmp_path, 1)
    rows = read_file(data)
    assert figures["split"] == "context" and figures["dropped_rows"] == 0 and len(rows) == 40
    assert {r["weight"] for r in rows} == {1.0}    # two voters cannot each hold 25%: no cap


def test_a_run_with_too_few_voters_is_skipped_unless_forced(store, monkeypatch):
    from train import loop

    pairs_of(store, "a", 10)
    pairs_of(store, "b", 10)
    store.close()
    monkeypatch.setattr(loop.registry, "active", lambda persona: SimpleNamespace(version=1))
    trained = []
    monkeypatch.setattr(loop, "_train_gate_promote", lambda run, *a: trained.append(run) or run)
    run = loop.retrain("teto")
    assert run["status"] == "skipped" and "2 distinct voter(s)" in run["message"] and "min_voters" in run["message"]
    assert run["metrics"]["voter_rules"]["voters"] == 2 and not trained
    forced = loop.retrain("teto", force=True)
    assert trained and forced["metrics"]["voter_rules"]["voters"] == 2
    assert loop.retrain("teto", recipe_name=str(write_recipe("min_voters: 2\n")))["status"] == "running"
    check = Store.open()
    assert check.query("SELECT status FROM training_runs ORDER BY started_at")[0] == ("skipped",)
    check.close()


def write_recipe(text: str):
    from feedback import settings

    path = settings.home() / "r.yaml"
    path.write_text(text)
    return path


def test_scheduler_waits_for_enough_voters(store, tmp_path):
    from serve.gateway.catalog import Catalog, PersonaInfo
    from serve.gateway.scheduler import ScheduleConfig, Scheduler

    pairs_of(store, "a", 20)
    pairs_of(store, "b", 20)
    gateway = SimpleNamespace(store=store, snapshot=None,
                              catalog=Catalog({"teto": PersonaInfo("teto", "x", active=1, versions={1: "/a"})}))
    scheduler = Scheduler(gateway, ScheduleConfig(min_new_pairs=8, interval=0, log_dir=tmp_path, min_voters=3))
    launched = []
    scheduler.launch = lambda persona, force=False: launched.append(persona)
    assert scheduler.pending("teto") == (40, 2)
    assert asyncio.run(scheduler.tick()) == [] and not launched
    pairs_of(store, "c", 1)
    assert asyncio.run(scheduler.tick()) == ["teto"] and launched == ["teto"]


def test_the_recipe_carries_the_voter_rules(tmp_path):
    from feedback.pairs import PairRules
    from train.recipes import DPORecipe, load_recipe

    path = tmp_path / "r.yaml"
    path.write_text("drop_outliers: false\noutlier_min_shared: 30\ninclude_own_system_prompt: true\n"
                    "share_cap: 0.5\nmin_voters: 5\n")
    recipe = load_recipe(str(path), DPORecipe)
    assert recipe.pair_rules() == PairRules(drop_outliers=False, outlier_min_shared=30, include_own_system_prompt=True)
    assert (recipe.share_cap, recipe.min_voters) == (0.5, 5)
    default = load_recipe("dpo", DPORecipe)
    assert (default.share_cap, default.min_voters, default.pair_rules()) == (0.25, 3, PairRules())
