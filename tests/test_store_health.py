"""The event loop never waits on the store, and a store that cannot write is said, refused
and recovered from: a real gateway on loopback in front of the embedded engine (tiny
model), with a real DuckDB file whose commits are made to fail as on a full disk."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import duckdb
import httpx
import pytest

from contract_stack import ADMIN_KEY, API_KEY, stack

AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHAT = {"model": "teto", "messages": [{"role": "user", "content": "hello"}], "max_tokens": 3}
WRITES = ("INSERT", "UPDATE", "DELETE", "BEGIN")
FULL_DISK = 'TransactionContext Error: Failed to commit: Could not write file "feedback.duckdb.wal": ' \
            "No space left on device"  # what DuckDB raises when the disk is full (seen on a full tmpfs)


class FullDisk:
    """The store's DuckDB connection, with every write failing as on a full disk while
    ``full`` is set; reads go through."""

    def __init__(self, con):
        self.con, self.full = con, True

    def execute(self, sql: str, *params):
        if self.full and sql.lstrip().upper().startswith(WRITES):
            raise duckdb.TransactionException(FULL_DISK)
        return self.con.execute(sql, *params)

    def executemany(self, sql: str, *params):
        if self.full:
            raise duckdb.TransactionException(FULL_DISK)
        return self.con.executemany(sql, *params)

    def __getattr__(self, name):
        return getattr(self.con, name)


@pytest.fixture(scope="module")
def s(tiny_model_dir, tmp_path_factory):
    # A probe every 0.2 s: the recovery is seen at once. No vote quota: one key votes a lot.
    root = tmp_path_factory.mktemp("store")
    (root / "home" / "snapshots" / ".20260101-000000-000000001.partial").mkdir(parents=True)  # a killed snapshot's
    with stack("embedded", tiny_model_dir, root, store_probe_seconds=0.2, vote_quota_minute=0,
               vote_quota_day=0) as running:
        running.root = root
        yield running


def served(s) -> int:
    return sum(e["served"] for e in httpx.get(s.url + "/admin/engines",
                                              headers={"Authorization": f"Bearer {ADMIN_KEY}"}).json()["engines"])


def vote(s, turn_id: str, comment: str) -> httpx.Response:
    return httpx.post(s.url + "/v1/feedback", headers=AUTH, timeout=30,
                      json={"turn_id": turn_id, "vote": "up", "comment": comment})


def wait_for_health(s, status: int, timeout: float = 10.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        r = httpx.get(s.url + "/health", timeout=5)
        if r.status_code == status or time.monotonic() > deadline:
            assert r.status_code == status, r.text
            return r.json()
        time.sleep(0.05)


def test_a_store_that_cannot_write_is_refused_and_writing_resumes_when_it_recovers(s):
    assert wait_for_health(s, 200)["store"]["writable"] is True
    turn = httpx.post(s.url + "/v1/chat/completions", headers=AUTH, json=CHAT, timeout=60).json()["id"]
    acknowledged = [c for c in ("before-1", "before-2") if vote(s, turn, c).status_code == 200]
    assert acknowledged == ["before-1", "before-2"]

    disk = s.store._con = FullDisk(s.store._con)
    try:
        refused = vote(s, turn, "during")
        assert refused.status_code == 503 and refused.headers["Retry-After"].isdigit()
        error = refused.json()["error"]
        assert error["code"] == "store_unavailable" and "No space left on device" in error["message"]
        health = wait_for_health(s, 503)
        assert health["store"]["writable"] is False and health["status"] == "unavailable"
        assert "No space left" in health["store"]["error"] and health["engines_up"] == 1

        before = served(s)
        for stream in (False, True):  # refused before anything is generated, streaming or not
            r = httpx.post(s.url + "/v1/chat/completions", headers=AUTH, json={**CHAT, "stream": stream}, timeout=60)
            assert r.status_code == 503 and r.headers["Retry-After"].isdigit(), r.text
            assert r.json()["error"]["code"] == "store_unavailable"
        assert served(s) == before, "the engine generated for a turn that could not be recorded"
        time.sleep(0.5)  # probes keep failing: still unavailable
        assert httpx.get(s.url + "/health").status_code == 503
    finally:
        disk.full = False

    assert wait_for_health(s, 200, timeout=5)["store"]["writable"] is True  # the probe saw it recover
    assert vote(s, turn, "after").status_code == 200
    acknowledged.append("after")
    again = httpx.post(s.url + "/v1/chat/completions", headers=AUTH, json=CHAT, timeout=60)
    assert again.status_code == 200 and s.store.turn(again.json()["id"]) is not None
    stored = {r[0] for r in s.store.query("SELECT comment FROM votes WHERE turn_id = ?", [turn])}
    assert set(acknowledged) <= stored and "during" not in stored


def test_a_held_store_lock_does_not_stop_the_event_loop(s):
    """While a long read holds the store's lock (a snapshot, the scheduler's count), a stream
    whose reader leaves is recorded later, and the gateway keeps answering meanwhile."""
    lock = s.store._lock
    held, release = threading.Event(), threading.Event()

    def long_read():
        with lock:
            held.set()
            release.wait(20)

    holder = threading.Thread(target=long_read)
    holder.start()
    held.wait(5)
    try:
        with httpx.Client(timeout=60) as http:
            with http.stream("POST", s.url + "/v1/chat/completions", headers=AUTH,
                             json={**CHAT, "stream": True, "max_tokens": 200}) as r:
                first = next(line for line in r.iter_lines() if line.startswith("data: "))
            # the reader left mid-stream: the turn ends, aborted, and is handed to the writer
        turn_id = json.loads(first[6:])["id"]
        times = []
        for _ in range(5):
            began = time.monotonic()
            assert httpx.get(s.url + "/health", timeout=5).status_code == 200
            assert httpx.get(s.url + "/v1/models", headers=AUTH, timeout=5).status_code == 200
            times.append(time.monotonic() - began)
            time.sleep(0.1)
        assert max(times) < 5.0, times  # not the 20 s the lock is held (this machine may be busy)
        assert s.store.health.ok
    finally:
        release.set()
        holder.join()
    deadline = time.monotonic() + 10
    while (row := s.store.turn(turn_id)) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert row is not None and row.status == "aborted"


def test_snapshot_folders_a_killed_process_left_are_removed_at_start(s):
    folder = s.root / "home" / "snapshots"
    assert not list(folder.glob(".*.partial"))
    made = httpx.post(s.url + "/admin/snapshot", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60)
    assert made.status_code == 200
    written = Path(made.json()["path"])
    assert (written / "votes.parquet").is_file() and not list(written.parent.glob(".*.partial"))
