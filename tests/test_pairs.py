"""Pair builder, statistics and snapshots on a real DuckDB store."""

from __future__ import annotations

import random

import pytest

from feedback import pairs, runs, stats
from feedback.snapshot import Snapshot, SnapshotError
from feedback.store import Store, Turn
from feedback.votes import record_comparison, record_vote

SYSTEM = {"role": "system", "content": "You are Teto."}


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "feedback.duckdb")
    yield s
    s.close()


def serve(store, turn_id, answer, question="hi", client="c1", persona="teto", version=1, voter=None, own=False):
    store.add_turn(Turn(id=turn_id, requested_model=persona, messages=[SYSTEM, {"role": "user", "content": question}],
                        answers=[answer], finish_reasons=["stop"], sampling={}, stream=True, latency_ms=1.0,
                        client=client, persona=persona, adapter=f"{persona}-v{version}", adapter_version=version,
                        voter=voter, own_system_prompt=own))


def dpo(store, persona="teto", rules=pairs.PairRules()):
    pairs.build(store, persona, rules)
    return [(r["chosen"][0]["content"], r["rejected"][0]["content"], r["weight"])
            for r in store.query_dicts("SELECT * FROM pref_dpo")]


def test_thumbs_on_regenerations_make_a_pair(store):
    serve(store, "t1", "Let's go!")
    serve(store, "t2", "Whatever.")
    record_vote(store, "t1", "up", "c1")
    record_vote(store, "t2", "down", "c1")
    assert dpo(store) == [("Let's go!", "Whatever.", 1.0)]
    row = store.query_dicts("SELECT * FROM pref_dpo")[0]
    assert sorted(row["turns"]) == ["t1", "t2"] and row["voters"] == ["c1"]
    assert row["prompt"] == [SYSTEM, {"role": "user", "content": "hi"}]   # TRL's conversational format
    assert row["chosen"] == [{"role": "assistant", "content": "Let's go!"}]
    assert store.query("SELECT count(*) FROM pref_kto")[0][0] == 0  # both answers are in a pair


def test_comparisons_and_ties(store):
    serve(store, "t1", "A answer")
    serve(store, "t2", "B answer")
    serve(store, "t3", "C answer")
    record_comparison(store, "t1", "t2", "b", left="a", client="c1")
    record_comparison(store, "t1", "t3", "tie", left="b", client="c1")
    assert dpo(store) == [("B answer", "A answer", 1.0)]
    row = store.query_dicts("SELECT turns, versions, voters FROM pref_dpo")[0]   # provenance
    assert (sorted(row["turns"]), row["versions"], row["voters"]) == (["t1", "t2"], [1], ["c1"])


def test_conflicting_votes_cancel_and_latest_vote_counts(store):
    for i, text in enumerate(["one", "two"]):
        serve(store, f"t{i}", text, client="c1")
        serve(store, f"u{i}", text, client="c2")
    record_comparison(store, "t0", "t1", "a", left="a", client="c1")   # c1: one > two
    record_comparison(store, "u0", "u1", "b", left="a", client="c2")   # c2: two > one
    assert dpo(store) == []                                            # net zero: dropped
    serve(store, "v0", "one", client="c3")
    serve(store, "v1", "two", client="c3")
    record_vote(store, "v0", "down", "c3")
    record_vote(store, "v0", "up", "c3")        # changed their mind: only the latest counts
    record_vote(store, "v1", "down", "c3")
    assert dpo(store) == [("one", "two", 1.0)]


def test_duplicate_answers_are_one_and_voter_weight_is_capped(store):
    # One voter rates the same pair of texts ten times, on ten regenerations.
    for i in range(10):
        serve(store, f"g{i}", "good", client="spammer")
        serve(store, f"b{i}", "bad", client="spammer")
        record_vote(store, f"g{i}", "up", "spammer")
        record_vote(store, f"b{i}", "down", "spammer")
    # Two other voters disagree, once each.
    for c in ("c1", "c2"):
        serve(store, f"{c}g", "good", client=c)
        serve(store, f"{c}b", "bad", client=c)
        record_comparison(store, f"{c}g", f"{c}b", "b", left="a", client=c)
    uncapped = dpo(store, rules=pairs.PairRules(voter_cap=1000))
    assert uncapped == [("good", "bad", 8.0)]               # 10 - 2: the spammer wins
    capped = dpo(store, rules=pairs.PairRules(voter_cap=2))  # the spammer's 20 votes weigh 2 in all
    assert capped == [("bad", "good", 1.0)]


def test_kto_from_lone_thumbs_and_both_bad(store):
    serve(store, "t1", "lonely good", question="q1")
    serve(store, "t2", "lonely bad", question="q2")
    serve(store, "t3", "bad one", question="q3")
    serve(store, "t4", "bad two", question="q3")
    record_vote(store, "t1", "up", "c1")
    record_vote(store, "t2", "down", "c1")
    record_comparison(store, "t3", "t4", "both_bad", left="a", client="c1")
    counts = pairs.build(store, "teto")
    assert counts["dpo"] == 0
    got = {(r["completion"][0]["content"], r["label"]) for r in store.query_dicts("SELECT * FROM pref_kto")}
    assert got == {("lonely good", True), ("lonely bad", False), ("bad one", False), ("bad two", False)}
    sft = store.query_dicts("SELECT * FROM pref_sft")
    assert [r["messages"][-1]["content"] for r in sft] == ["lonely good"]


def test_split_is_by_context_and_stable(store):
    for q in range(60):
        for i, (text, vote) in enumerate([("yes", "up"), ("no", "down"), ("meh", "down")]):
            serve(store, f"t{q}-{i}", f"{text} {q}", question=f"question {q}")
            record_vote(store, f"t{q}-{i}", vote, "c1")
    pairs.build(store, "teto", pairs.PairRules(heldout_percent=30))
    rows = store.query("SELECT context, split FROM pref_dpo")
    splits = {}
    for context, split in rows:
        splits.setdefault(context, set()).add(split)
    assert all(len(s) == 1 for s in splits.values())             # a context is on one side only
    heldout = sum("heldout" in s for s in splits.values())
    assert 5 <= heldout <= 35                                     # about 30% of 60 contexts
    before = dict(rows)
    serve(store, "late", "late answer", question="question 0", client="c2")
    record_vote(store, "late", "up", "c2")
    pairs.build(store, "teto", pairs.PairRules(heldout_percent=30))
    assert {c: s for c, s in store.query("SELECT context, split FROM pref_dpo")} == before


def test_persona_filter(store):
    serve(store, "t1", "x", persona="egen")
    serve(store, "t2", "y", persona="egen")
    record_vote(store, "t1", "up", "c1")
    record_vote(store, "t2", "down", "c1")
    assert dpo(store, "teto") == [] and dpo(store, "egen") == [("x", "y", 1.0)]


def test_wilson_interval():
    lo, hi = stats.wilson(8, 10)
    assert 0.44 < lo < 0.5 and 0.94 < hi < 0.97   # textbook values 0.490, 0.943
    assert stats.wilson(0, 0) == (0.0, 1.0)
    lo, hi = stats.wilson(0, 5)
    assert lo == 0.0 and 0.4 < hi < 0.45


def test_stats_rates_and_biases(store):
    # v2 beats v1 three times out of four; the left answer wins twice; the longer answer wins three times.
    outcomes = [("a", "a"), ("a", "b"), ("b", "b"), ("a", "b")]  # (choice, left) with turn_a = v2 (longer)
    for i, (choice, left) in enumerate(outcomes):
        serve(store, f"n{i}", "a much longer answer", question=f"q{i}", version=2)
        serve(store, f"o{i}", "short", question=f"q{i}", version=1)
        record_comparison(store, f"n{i}", f"o{i}", choice, left=left, client="c1")
    record_vote(store, "n0", "up", "c1")
    record_vote(store, "o0", "down", "c1")
    wins = {r["version"]: r for r in stats.win_rates(store)}
    assert wins[2]["wins"] == 3 and wins[2]["games"] == 4 and wins[1]["rate"] == 0.25
    assert wins[2]["low"] < 0.75 < wins[2]["high"]
    bias = {r["bias"]: r for r in stats.biases(store)}
    assert (bias["left answer wins"]["wins"], bias["left answer wins"]["n"]) == (2, 4)
    assert (bias["longer answer wins"]["wins"], bias["longer answer wins"]["n"]) == (3, 4)
    thumbs = {r["version"]: r for r in stats.thumbs(store)}
    assert thumbs[2]["up"] == 1 and thumbs[1]["down"] == 1
    assert stats.totals(store) == {"turns": 8, "votes": 2, "comparisons": 4, "voters": 1}


def test_length_bias_counts_characters_where_a_script_has_no_spaces(store):
    """Ten Chinese characters are longer than 'I am very tired' (15 characters, 4 words): the
    longer answer won twice of three, not once."""
    for i, choice in enumerate(("a", "a", "b")):
        serve(store, f"zh{i}", "我今天很累想早点睡觉", question=f"q{i}")
        serve(store, f"en{i}", "I am very tired", question=f"q{i}")
        record_comparison(store, f"zh{i}", f"en{i}", choice, left="a", client="c1")
    bias = {r["bias"]: r for r in stats.biases(store)}
    assert (bias["longer answer wins"]["wins"], bias["longer answer wins"]["n"]) == (2, 3)
    assert (bias["left answer wins"]["wins"], bias["left answer wins"]["n"]) == (2, 3)


def test_snapshot_reads_like_the_store(store, tmp_path):
    serve(store, "t1", "good")
    serve(store, "t2", "bad")
    record_vote(store, "t1", "up", "c1")
    record_vote(store, "t2", "down", "c1")
    store.sync_adapters([{"name": "teto-v1", "persona": "teto", "version": 1, "path": "/a", "status": "active",
                          "kind": "sft", "metrics": {"reward_accuracy": 0.75}}])
    snap = Snapshot.open(store.snapshot(tmp_path / "snap"))
    assert stats.summary(snap) == stats.summary(store)
    assert pairs.build(snap, "teto") == pairs.build(store, "teto") == {"dpo": 1, "kto": 0, "sft": 1}
    run = stats.training_runs(snap)[0]
    assert (run["id"], run["status"], run["reward_accuracy"]) == ("teto-v1-run", "succeeded", 0.75)
    # a finished SFT run: the next retrain's clean-up of runs a dead process left going passes it by
    assert runs.close_interrupted(store, "teto", store.record_run) == 0
    assert stats.training_runs(store)[0]["status"] == "succeeded"
    (tmp_path / "snap" / "votes.parquet").unlink()
    with pytest.raises(SnapshotError, match="votes.parquet"):
        Snapshot.open(tmp_path / "snap")


def test_adapter_sync_retires_versions_gone_from_disk(store):
    row = {"persona": "teto", "path": "/a", "kind": "sft"}
    store.sync_adapters([{**row, "name": "teto-v1", "version": 1, "status": "active"},
                         {**row, "name": "teto-v2", "version": 2, "status": "candidate"}])
    store.sync_adapters([{**row, "name": "teto-v2", "version": 2, "status": "active"}])
    assert store.query("SELECT name, status FROM adapters ORDER BY name") == [("teto-v1", "retired"),
                                                                              ("teto-v2", "active")]
    assert [r["version"] for r in stats.adapters(store)] == [2]


# ---- voters, agreement, outliers, own system prompts, unsafe answers ---------------------------

def test_a_voter_is_the_voter_column_not_the_client(store):
    serve(store, "t1", "good", client="ip:127.0.0.1", voter="user:ann")
    serve(store, "t2", "bad", client="ip:127.0.0.1", voter="user:ann")
    serve(store, "t3", "fine", question="other", client="ip:127.0.0.1", voter="user:bob")
    record_vote(store, "t1", "up", "ip:127.0.0.1")
    record_vote(store, "t2", "down", "ip:127.0.0.1")
    record_vote(store, "t3", "up", "ip:127.0.0.1")
    pairs.build(store, "teto")
    assert store.query("SELECT voters FROM pref_dpo") == [(["user:ann"],)]
    assert store.query("SELECT voters FROM pref_kto") == [(["user:bob"],)]
    assert stats.totals(store)["voters"] == 2
    assert [(r["persona"], r["voters"]) for r in stats.personas(store)] == [("teto", 2)]


def test_a_changed_verdict_counts_once(store):
    serve(store, "t1", "one")
    serve(store, "t2", "two")
    record_comparison(store, "t1", "t2", "a", left="a", client="c1")
    record_comparison(store, "t1", "t2", "b", left="b", client="c1")   # changed their mind
    assert dpo(store) == [("two", "one", 1.0)]
    assert stats.totals(store)["comparisons"] == 1


def thumbs_panel(store, votes: dict[str, list[str]], persona="teto"):
    """Each voter thumbs context i's answer on a turn of their own, with the same answer text."""
    for voter, values in votes.items():
        for i, value in enumerate(values):
            serve(store, f"{voter}-{i}", f"answer {i}", question=f"question {i}", client=voter, persona=persona)
            record_vote(store, f"{voter}-{i}", value, voter)


def test_agreement_of_identical_raters_is_one(store):
    rng = random.Random(0)
    truth = [rng.choice(["up", "down"]) for _ in range(40)]
    thumbs_panel(store, {"a": truth, "b": truth})
    (row,) = stats.agreement(store)
    assert (row["persona"], row["kind"], row["contexts"], row["voters"]) == ("teto", "thumbs", 40, 2)
    assert row["alpha"] == pytest.approx(1.0) and row["kappa"] == pytest.approx(1.0)


def test_agreement_of_coin_flipping_raters_is_about_zero(store):
    rng = random.Random(1)
    thumbs_panel(store, {v: [rng.choice(["up", "down"]) for _ in range(150)] for v in ("a", "b", "c")})
    (row,) = stats.agreement(store)
    assert (row["contexts"], row["voters"], row["kappa"]) == (150, 3, None)  # kappa: two voters only
    assert abs(row["alpha"]) < 0.12


def contrarian_panel(store, contexts=30):
    """Three voters prefer 'good i' side by side; one always prefers 'bad i'."""
    for voter in ("h1", "h2", "h3", "contra"):
        for i in range(contexts):
            serve(store, f"{voter}-{i}-g", f"good {i}", question=f"q{i}", client=voter)
            serve(store, f"{voter}-{i}-b", f"bad {i}", question=f"q{i}", client=voter)
            choice = "b" if voter == "contra" else "a"
            record_comparison(store, f"{voter}-{i}-g", f"{voter}-{i}-b", choice, left="a", client=voter)


def test_a_contrarian_voter_weighs_nothing_and_is_listed_with_the_reason(store):
    contrarian_panel(store)
    got = dpo(store)
    assert len(got) == 30 and all(c.startswith("good") and w == 3.0 for c, _, w in got)
    assert {tuple(sorted(r[0])) for r in store.query("SELECT voters FROM pref_dpo")} == {("h1", "h2", "h3")}
    (flagged,) = stats.outliers(store)
    assert (flagged["persona"], flagged["voter"], flagged["shared"], flagged["disagreed"]) == ("teto", "contra", 30, 30)
    assert "30 of 30 shared contexts" in flagged["reason"]
    (row,) = stats.agreement(store)
    assert (row["kind"], row["contexts"], row["voters"]) == ("side_by_side", 30, 4) and row["alpha"] < 0.5
    # With the rule off, the contrarian's votes count again (3 - 1 per pair).
    kept = dpo(store, rules=pairs.PairRules(drop_outliers=False))
    assert {w for _, _, w in kept} == {2.0}
    assert {tuple(sorted(r[0])) for r in store.query("SELECT voters FROM pref_dpo")} == {("contra", "h1", "h2", "h3")}


def test_the_outlier_rule_waits_for_enough_shared_contexts(store):
    contrarian_panel(store, contexts=19)
    assert stats.outliers(store) == []
    assert dpo(store, rules=pairs.PairRules(outlier_min_shared=10))[0][2] == 3.0   # a recipe may judge sooner
    assert {w for _, _, w in dpo(store)} == {2.0}


def test_turns_with_their_own_system_prompt_stay_out_by_default(store):
    serve(store, "t1", "good", own=True)
    serve(store, "t2", "bad", own=True)
    serve(store, "t3", "lonely", question="other")
    record_vote(store, "t1", "up", "c1")
    record_vote(store, "t2", "down", "c1")
    record_vote(store, "t3", "up", "c1")
    assert dpo(store) == []
    assert [r["completion"][0]["content"] for r in store.query_dicts("SELECT * FROM pref_kto")] == ["lonely"]
    assert dpo(store, rules=pairs.PairRules(include_own_system_prompt=True)) == [("good", "bad", 1.0)]
    (row,) = stats.personas(store)
    assert (row["turns"], row["own_prompt_turns"], row["own_prompt_votes"]) == (3, 2, 2)


def test_an_unsafe_answer_is_never_chosen_whatever_other_votes_say(store):
    # Context q1: three voters like the answer, one thumbs it down as unsafe; a fifth voter
    # even prefers it side by side over a safe one.
    for i, voter in enumerate(["c1", "c2", "c3", "c4", "c5"]):
        serve(store, f"u{i}", "risky answer", question="q1", client=voter)
    serve(store, "s5", "safe answer", question="q1", client="c5")
    for i in range(3):
        record_vote(store, f"u{i}", "up", f"c{i + 1}")
    record_vote(store, "u3", "down", "c4", reason="Unsafe")
    record_comparison(store, "u4", "s5", "a", left="a", client="c5")
    # Context q2: the same conflict, on an answer in no pair; the reason in another case.
    for i, voter in enumerate(["c1", "c2", "c3", "c4"]):
        serve(store, f"k{i}", "risky alone", question="q2", client=voter)
        unsafe = voter == "c4"
        record_vote(store, f"k{i}", "down" if unsafe else "up", voter, reason="UNSAFE" if unsafe else None)
    assert dpo(store) == [("safe answer", "risky answer", 1.0)]       # turned round, not dropped
    kto = {(r["completion"][0]["content"], r["label"]) for r in store.query_dicts("SELECT * FROM pref_kto")}
    assert kto == {("risky alone", False)}
    sft = {r["messages"][-1]["content"] for r in store.query_dicts("SELECT * FROM pref_sft")}
    assert sft == {"safe answer"}


def test_two_unsafe_answers_make_no_pair(store):
    serve(store, "a", "bad one", question="q")
    serve(store, "b", "bad two", question="q")
    record_comparison(store, "a", "b", "a", left="a", client="c1")
    for turn in ("a", "b"):
        record_vote(store, turn, "down", "c1", reason="unsafe")
    assert dpo(store) == []
    kto = {(r["completion"][0]["content"], r["label"]) for r in store.query_dicts("SELECT * FROM pref_kto")}
    assert kto == {("bad one", False), ("bad two", False)}


def test_feedback_stats_shows_voters_agreement_and_flagged_voters(store, capsys, monkeypatch):
    import json
    from argparse import Namespace

    from rich.console import Console

    from serve import cli_feedback

    monkeypatch.setattr(cli_feedback, "out", Console(width=250))  # one table row a line

    contrarian_panel(store)
    serve(store, "own", "mine", question="own", client="h1", own=True)
    path = store.path
    store.close()
    args = Namespace(database=str(path), snapshot=None, gateway="http://127.0.0.1:1", json=True)
    cli_feedback.stats(args)
    figures = json.loads(capsys.readouterr().out)
    assert figures["personas"] == [{"persona": "teto", "turns": 241, "voters": 4, "own_prompt_turns": 1,
                                    "own_prompt_votes": 0}]
    (row,) = figures["agreement"]
    assert (row["kind"], row["contexts"], row["voters"], row["kappa"]) == ("side_by_side", 30, 4, None)
    assert [r["voter"] for r in figures["outliers"]] == ["contra"]
    cli_feedback.stats(Namespace(**{**vars(args), "json": False}))
    text = " ".join(capsys.readouterr().out.split())
    assert "Agreement between voters" in text and "side by side" in text
    assert "contra" in text and "disagreed with the other voters' consensus on 30 of 30" in text
