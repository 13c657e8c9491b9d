"""The feedback store: migrations, votes, comparisons, refusals that change nothing, concurrency."""

from __future__ import annotations

import threading

import duckdb
import pytest

from feedback.migrations import MIGRATIONS
from feedback.store import Store, Turn
from feedback.errors import APIError
from feedback.votes import record_comparison, record_vote


def turn(turn_id: str, client: str = "key:a", content: str = "hi", answers=("yo",)) -> Turn:
    return Turn(id=turn_id, requested_model="teto", messages=[{"role": "user", "content": content}],
                answers=list(answers), finish_reasons=["stop"] * len(answers), sampling={}, stream=False,
                latency_ms=1.0, client=client, persona="teto", adapter="teto-v1", adapter_version=1)


@pytest.fixture
def store(tmp_path):
    s = Store.open(tmp_path / "f.duckdb")
    yield s
    s.close()


def counts(store):
    return store.query("SELECT (SELECT count(*) FROM votes), (SELECT count(*) FROM comparisons)")[0]


@pytest.mark.parametrize("applied", range(len(MIGRATIONS) + 1))
def test_migrates_from_every_earlier_schema(tmp_path, applied):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE schema_migrations (name VARCHAR PRIMARY KEY, applied_at TIMESTAMP NOT NULL)")
    for name, sql in MIGRATIONS[:applied]:
        con.execute(sql)
        con.execute("INSERT INTO schema_migrations VALUES (?, now())", [name])
    con.close()
    store = Store.open(path)
    assert store.migrations() == [name for name, _ in MIGRATIONS]
    store.add_turn(turn("t1"))
    assert record_vote(store, "t1", "up", "key:a") == "recorded"
    store.close()


def test_vote_change_and_retract(store):
    store.add_turn(turn("t1", answers=("one", "two")))
    record_vote(store, "t1", "up", "key:a", reason="helpful")
    record_vote(store, "t1", "down", "key:a", comment="changed my mind")
    record_vote(store, "t1", "up", "key:a", choice_index=1)
    current = "SELECT choice_index, vote, reason, comment FROM current_votes ORDER BY choice_index"
    assert store.query(current) == [(0, "down", None, "changed my mind"), (1, "up", None, None)]
    assert record_vote(store, "t1", "retract", "key:a") == "retracted"
    assert record_vote(store, "t1", "retract", "key:a") == "nothing to retract"
    assert store.query(current) == [(1, "up", None, None)]
    record_vote(store, "t1", "up", "key:a")
    assert store.query(current)[0] == (0, "up", None, None)
    history = store.query("SELECT vote FROM votes WHERE choice_index = 0 ORDER BY created_at")
    assert [v for (v,) in history] == ["up", "down", "retract", "up"], "the history is kept"


@pytest.mark.parametrize("call, status, says", [
    (lambda s: record_vote(s, "nope", "up", "key:a"), 404, "No turn with id 'nope'"),
    (lambda s: record_vote(s, "t1", "up", "key:b"), 403, "not served to this key"),
    (lambda s: record_vote(s, "t1", "sideways", "key:a"), 400, "vote must be one of"),
    (lambda s: record_vote(s, "t1", "up", "key:a", choice_index=3), 400, "has 1 answer"),
    (lambda s: record_vote(s, "t1", "up", "key:a", comment="x" * 3000), 400, "the limit is 2000"),
    (lambda s: record_comparison(s, "t1", "t3", "a", "a", "key:a"), 400, "different prompt contexts"),
    (lambda s: record_comparison(s, "t1", "t2", "maybe", "a", "key:a"), 400, "choice must be one of"),
    (lambda s: record_comparison(s, "t1", "nope", "a", "a", "key:a"), 404, "No turn"),
])
def test_refused_feedback_is_clear_and_changes_nothing(store, call, status, says):
    store.add_turn(turn("t1"))
    store.add_turn(turn("t2"))
    store.add_turn(turn("t3", content="something else"))
    before = counts(store)
    with pytest.raises(APIError, match=says) as err:
        call(store)
    assert err.value.status == status and counts(store) == before


def test_comparison_keeps_left_right_order(store):
    store.add_turn(turn("t1"))
    store.add_turn(turn("t2", answers=("another",)))
    cid = record_comparison(store, "t1", "t2", "b", left="b", client="key:a")
    assert store.query("SELECT turn_a, turn_b, choice, left_turn FROM comparisons WHERE id = ?", [cid]) == [
        ("t1", "t2", "b", "t2")]


def test_the_same_vote_again_changes_nothing(store):
    """One voter posting the same thumb (or the same verdict on the same two turns, in either
    order) many times stores it once; a changed verdict is a new row and the latest counts."""
    store.add_turn(turn("t1"))
    store.add_turn(turn("t2", answers=("another",)))
    assert record_vote(store, "t1", "up", "key:a") == "recorded"
    assert [record_vote(store, "t1", "up", "key:a") for _ in range(29)] == ["unchanged"] * 29
    assert record_vote(store, "t1", "up", "key:a", reason="helpful") == "recorded"  # a new reason is a change
    first = record_comparison(store, "t1", "t2", "a", left="a", client="key:a")
    again = [record_comparison(store, "t1", "t2", "a", left="b", client="key:a") for _ in range(29)]
    swapped = record_comparison(store, "t2", "t1", "b", left="a", client="key:a")  # t1 wins again
    assert set(again) == {first} and swapped == first
    assert counts(store) == (2, 1)
    changed = record_comparison(store, "t1", "t2", "b", left="a", client="key:a")
    assert changed != first and counts(store) == (2, 2)
    assert store.query("SELECT id, choice FROM current_comparisons") == [(changed, "b")]


def test_votes_count_for_the_turns_voter(store):
    """A UI session owns its turns (client) but votes as its login (voter)."""
    store.add_turn(Turn(**{**turn("t1", client="ui:session-1").__dict__, "voter": "user:ana"}))
    store.add_turn(turn("t2", client="ui:session-1", answers=("another",)))
    record_vote(store, "t1", "up", "ui:session-1")
    record_comparison(store, "t1", "t2", "a", left="a", client="ui:session-1")
    assert store.query("SELECT voter FROM votes") == [("user:ana",)]
    assert store.query("SELECT voter FROM comparisons") == [("user:ana",)]
    assert store.query("SELECT voter FROM turns WHERE id = 't2'") == [("ui:session-1",)]  # default: the client


def test_concurrent_votes_all_land(store):
    for i in range(200):
        store.add_turn(turn(f"t{i}"))
    errors = []

    def voter(k: int):
        try:
            for i in range(k, 200, 8):
                record_vote(store, f"t{i}", "up" if i % 3 else "down", "key:a")
        except Exception as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=voter, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and counts(store)[0] == 200


def test_vote_queue_commits_concurrent_votes_together(store, monkeypatch):
    """Concurrent votes through the gateway's queue: each caller hears its own result,
    refused votes write nothing, and the accepted ones share few transactions."""
    import asyncio

    import serve.gateway.vote_queue as vote_queue
    from feedback.votes import Vote, record_votes

    ids = [f"q{i}" for i in range(200)]
    for turn_id in ids:
        store.add_turn(turn(turn_id))
    batches = []
    monkeypatch.setattr(vote_queue, "record_votes", lambda s, vs: batches.append(len(vs)) or record_votes(s, vs))

    async def run():
        queue = vote_queue.VoteQueue(store, max_batch=64)
        queue.start()
        calls = [queue.submit(Vote(t, "up", "key:a")) for t in ids]
        calls += [queue.submit(Vote("no-such-turn", "up", "key:a")), queue.submit(Vote(ids[0], "up", "key:b")),
                  queue.submit(Vote(ids[1], "sideways", "key:a")),
                  queue.submit(Vote(ids[2], "retract", "key:a"))]  # after its own up, in the same batch
        try:
            return await asyncio.gather(*calls, return_exceptions=True)
        finally:
            await queue.stop()

    results = asyncio.run(run())
    assert results[:200] == ["recorded"] * 200
    assert [getattr(r, "status", None) for r in results[200:203]] == [404, 403, 400]
    assert results[203] == "retracted"
    assert store.query("SELECT count(*) FROM votes")[0][0] == 201
    assert store.query("SELECT count(*) FROM current_votes")[0][0] == 199
    assert sum(batches) == len(results) and len(batches) < 20  # grouped, at most 64 a batch


def test_the_latest_vote_is_the_last_inserted_even_when_the_clock_steps_back(store, monkeypatch):
    from datetime import datetime

    from feedback import votes

    store.add_turn(turn("t1"))
    store.add_turn(turn("t2"))
    record_vote(store, "t1", "up", "key:a")
    record_comparison(store, "t1", "t2", "a", "a", "key:a")
    monkeypatch.setattr(votes, "utc_now", lambda: datetime(2000, 1, 1))  # the clock went back (NTP, a restore)
    record_vote(store, "t1", "down", "key:a")
    record_comparison(store, "t1", "t2", "b", "a", "key:a")
    assert store.query("SELECT vote FROM current_votes") == [("down",)]
    assert store.query("SELECT choice FROM current_comparisons") == [("b",)]
    assert record_vote(store, "t1", "down", "key:a") == "unchanged"   # what counts now is the later row
    monkeypatch.setattr(votes, "utc_now", lambda: datetime(2000, 1, 1))  # and two votes in one instant
    record_vote(store, "t1", "up", "key:a")
    record_vote(store, "t1", "down", "key:a")
    assert store.query("SELECT vote FROM current_votes") == [("down",)]


def test_the_sequence_migration_numbers_old_votes_in_the_order_they_were_inserted(tmp_path):
    path = tmp_path / "old.duckdb"
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE schema_migrations (name VARCHAR PRIMARY KEY, applied_at TIMESTAMP NOT NULL)")
    before = [m for m in MIGRATIONS if m[0] < "0009"]
    for name, sql in before:
        con.execute(sql)
        con.execute("INSERT INTO schema_migrations VALUES (?, now())", [name])
    for vote, at in (("up", "2026-01-02"), ("down", "2026-01-01")):  # the later row has the earlier clock
        con.execute("INSERT INTO votes (turn_id, choice_index, client, vote, created_at, voter) "
                    "VALUES ('t1', 0, 'c', ?, ?, 'c')", [vote, at])
    con.close()
    store = Store.open(path)
    try:
        assert store.query("SELECT vote, seq FROM votes ORDER BY seq") == [("up", 1), ("down", 2)]
        assert store.query("SELECT vote FROM current_votes") == [("down",)]
    finally:
        store.close()


def test_a_failed_snapshot_leaves_no_partial_folder_and_stale_ones_are_removed(store, tmp_path, monkeypatch):
    from feedback import snapshot
    from feedback import store as store_module

    folder = snapshot.snapshots_dir()
    stale = folder / ".20260101-000000-000000001.partial"
    stale.mkdir(parents=True)
    (stale / "turns.parquet").write_bytes(b"half")
    monkeypatch.setattr(store_module, "SNAPSHOT_TABLES", ("turns", "no_such_table"))
    with pytest.raises(duckdb.CatalogException):
        store.snapshot(folder / "s1")
    assert sorted(p.name for p in folder.iterdir()) == [stale.name]   # its own partial folder is gone
    assert snapshot.remove_partials() == [stale] and list(folder.iterdir()) == []
    monkeypatch.undo()
    assert (store.snapshot(folder / "s2") / "votes.parquet").is_file()
