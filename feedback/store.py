"""The feedback store: one DuckDB file under ``PERSONA_HOME``, owned by one process.

DuckDB allows one writing process per file, and a second process cannot open
it even read-only while the writer holds it. The gateway owns the live file;
everything else goes through the gateway's API or a Parquet snapshot.

Inside the owning process, one connection is shared behind a lock: DuckDB
serialises writes anyway, and a write is committed before the call returns
(so whatever the caller acknowledges is on disk). All SQL is parameterised.

    store = Store.open()                 # PERSONA_HOME/feedback.duckdb, migrations applied
    store.add_turn(Turn(...))
    store.turn("chatcmpl-...")
"""

from __future__ import annotations

import json
import logging
import shutil
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from feedback import settings
from feedback.errors import APIError, UserError
from feedback.migrations import MIGRATIONS

log = logging.getLogger(__name__)

DB_NAME = "feedback.duckdb"


class StoreError(UserError):
    pass


RETRY_AFTER_SECONDS = 5  # what a caller refused for a store that cannot write is told to wait


class StoreUnavailable(APIError):
    """The store cannot write (a full disk, a file gone read-only): nothing was recorded, and
    the caller hears 503 with Retry-After."""

    def __init__(self, reason: str):
        super().__init__(503, f"The feedback store cannot write right now ({reason}); nothing was recorded. "
                              "Retry shortly.", code="store_unavailable",
                         headers={"Retry-After": str(RETRY_AFTER_SECONDS)})


def _storage_failure(exc: Exception) -> bool:
    """Whether a write failed for the storage's sake (the disk, the file, the commit), not
    for the statement's (a constraint, a bug)."""
    import duckdb

    return isinstance(exc, (OSError, duckdb.IOException, duckdb.FatalException, duckdb.InternalException,
                            duckdb.OutOfMemoryException, duckdb.PermissionException, duckdb.TransactionException))


class WriteHealth:
    """Whether the store can write: the outcome of its latest write (every write, and the
    gateway's heartbeat probe, report here). A change is logged once, not at every write."""

    def __init__(self):
        self.error: str | None = None
        self.failing_since: datetime | None = None
        self.last_write: datetime | None = None

    @property
    def ok(self) -> bool:
        return self.error is None

    def succeeded(self) -> None:
        if self.error is not None:
            log.warning("the feedback store writes again (it failed from %s: %s)", self.failing_since, self.error)
        self.error, self.failing_since, self.last_write = None, None, utc_now()

    def failed(self, exc: Exception) -> None:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        if self.error is None:
            log.error("the feedback store cannot write: %s", reason)
            self.failing_since = utc_now()
        self.error = reason

    def status(self) -> dict:
        return {"writable": self.ok, "error": self.error,
                "failing_since": self.failing_since.isoformat() if self.failing_since else None,
                "last_write": self.last_write.isoformat() if self.last_write else None}


def utc_now() -> datetime:
    """Now in UTC, without a zone (DuckDB TIMESTAMP columns)."""
    return datetime.now(timezone.utc).replace(tzinfo=None)


@dataclass
class Turn:
    id: str
    requested_model: str
    messages: list[dict]
    answers: list[str]
    finish_reasons: list[str | None]
    sampling: dict
    stream: bool
    latency_ms: float
    client: str
    persona: str | None = None
    adapter: str | None = None
    adapter_version: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_ms: float | None = None
    user_tag: str | None = None
    engine: str | None = None
    status: str = "ok"
    created_at: datetime = field(default_factory=utc_now)
    voter: str | None = None               # the caller as a voter (default: the client)
    own_system_prompt: bool = False        # the caller replaced the persona's system prompt


_JSON_FIELDS = ("messages", "answers", "finish_reasons", "sampling")


def default_path() -> Path:
    return settings.home() / DB_NAME


class Reads:
    """Parameterised reads on a DuckDB connection shared behind a lock (the live store and
    snapshots both have them)."""

    def __init__(self, con):
        self._con = con
        self._lock = threading.Lock()

    def query(self, sql: str, params: list | None = None) -> list[tuple]:
        """Run a read query (parameterised) and return all rows."""
        with self._lock:
            return self._con.execute(sql, params or []).fetchall()

    def query_dicts(self, sql: str, params: list | None = None) -> list[dict]:
        with self._lock:
            cur = self._con.execute(sql, params or [])
            names = [d[0] for d in cur.description]
            return [dict(zip(names, row)) for row in cur.fetchall()]


class Store(Reads):
    def __init__(self, con, path: str):
        super().__init__(con)
        self.path = path
        self.health = WriteHealth()

    @contextmanager
    def _writing(self):
        """The connection, under the lock, for one write: its outcome is the store's health,
        and a storage failure is raised as ``StoreUnavailable`` (a 503 for an HTTP caller)."""
        with self._lock:
            try:
                yield self._con
            except Exception as exc:
                if not _storage_failure(exc):
                    raise
                self.health.failed(exc)
                raise StoreUnavailable(self.health.error) from exc
            self.health.succeeded()

    def probe(self) -> None:
        """Rewrite the heartbeat row: whether the store can write now (``health``), when no
        turn or vote has told."""
        with self._writing() as con:
            con.execute("UPDATE store_heartbeat SET written_at = ? WHERE id = 1", [utc_now()])

    @classmethod
    def open(cls, path: str | Path | None = None) -> "Store":
        """Open (creating if needed) the database and apply pending migrations."""
        import duckdb

        target = str(path or default_path())
        try:
            con = duckdb.connect(target)
        except duckdb.IOException as exc:
            raise StoreError(
                f"cannot open the feedback store {target}: {str(exc).splitlines()[0]} "
                "(only one process may hold it: is a gateway already running?)"
            ) from None
        store = cls(con, target)
        store.migrate()
        return store

    def close(self) -> None:
        with self._lock:
            try:
                self._con.execute("CHECKPOINT")  # everything into the main file: the WAL is empty
            except Exception as exc:  # noqa: BLE001 - closing must not fail; DuckDB replays the WAL
                logging.getLogger(__name__).warning("checkpoint on close failed: %s", exc)
            self._con.close()

    # ---- schema -------------------------------------------------------------------------
    def migrate(self) -> list[str]:
        with self._lock:
            con = self._con
            con.execute("CREATE TABLE IF NOT EXISTS schema_migrations "
                        "(name VARCHAR PRIMARY KEY, applied_at TIMESTAMP NOT NULL)")
            done = {r[0] for r in con.execute("SELECT name FROM schema_migrations").fetchall()}
            known = [name for name, _ in MIGRATIONS]
            unknown = done - set(known)
            if unknown:
                raise StoreError(f"{self.path} has migrations this version does not know: {sorted(unknown)} "
                                 "(it was written by a newer persona-chat)")
            applied = []
            for name, sql in MIGRATIONS:
                if name in done:
                    continue
                con.execute("BEGIN TRANSACTION")
                try:
                    con.execute(sql)
                    con.execute("INSERT INTO schema_migrations VALUES (?, now())", [name])
                    con.execute("COMMIT")
                except Exception:
                    con.execute("ROLLBACK")
                    raise
                applied.append(name)
            return applied

    def migrations(self) -> list[str]:
        return [r[0] for r in self.query("SELECT name FROM schema_migrations ORDER BY name")]

    # ---- turns --------------------------------------------------------------------------
    def add_turn(self, turn: Turn) -> None:
        row = asdict(turn)
        row["voter"] = row["voter"] or row["client"]
        for key in _JSON_FIELDS:
            row[key] = json.dumps(row[key], ensure_ascii=False)
        columns = list(row)
        sql = f"INSERT INTO turns ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"
        with self._writing() as con:
            con.execute(sql, [row[c] for c in columns])

    def turn(self, turn_id: str) -> Turn | None:
        with self._lock:
            cur = self._con.execute("SELECT * FROM turns WHERE id = ?", [turn_id])
            row = cur.fetchone()
            names = [d[0] for d in cur.description]
        if row is None:
            return None
        data = dict(zip(names, row))
        for key in _JSON_FIELDS:
            data[key] = json.loads(data[key])
        return Turn(**data)

    def execute(self, sql: str, params: list | None = None) -> list[tuple]:
        """Run one parameterised write; it is committed when this returns."""
        with self._writing() as con:
            cur = con.execute(sql, params or [])
            return cur.fetchall() if cur.description else []

    # ---- adapters and training runs -----------------------------------------------------------
    def sync_adapters(self, adapters: list[dict]) -> None:
        """Mirror the adapter registry: one row per version (name, persona, version, path,
        kind, parent_version, status, metrics, created_at). Versions no longer on disk are
        marked retired. An SFT adapter with no training run yet gets one, from its metadata
        (``persona setup`` trains before any gateway runs; preference runs record themselves)."""
        now = utc_now()
        rows = [[a["name"], a["persona"], a["version"], a["path"], a.get("kind"), a.get("parent_version"),
                 a["status"], json.dumps(a.get("metrics") or {}), a.get("created_at"), now] for a in adapters]
        with self._writing() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                con.execute("UPDATE adapters SET status = 'retired', updated_at = ? WHERE status <> 'retired'", [now])
                con.executemany("INSERT OR REPLACE INTO adapters VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)", rows)
                for a in adapters:
                    if (a.get("kind") or "sft") != "sft":
                        continue
                    known = con.execute("SELECT count(*) FROM training_runs WHERE persona = ? AND adapter_version = ?",
                                        [a["persona"], a["version"]]).fetchone()[0]
                    if not known:
                        metrics = a.get("metrics") or {}
                        con.execute(
                            "INSERT INTO training_runs (id, persona, kind, status, parent_version, adapter_version, "
                            "started_at, finished_at, train_examples, heldout_examples, reward_accuracy, "
                            "reward_margin, metrics) VALUES (?, ?, ?, 'succeeded', ?, ?, ?, ?, ?, ?, ?, ?, ?) "
                            "ON CONFLICT DO NOTHING",
                            [f"{a['name']}-run", a["persona"], a.get("kind") or "sft", a.get("parent_version"),
                             a["version"], a.get("created_at") or now, a.get("created_at") or now,
                             metrics.get("train_examples") or metrics.get("train_pairs"),
                             metrics.get("heldout_examples") or metrics.get("heldout_pairs"),
                             metrics.get("reward_accuracy"), metrics.get("reward_margin"), json.dumps(metrics)])
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise

    def record_run(self, run: dict) -> None:
        """Insert or update one training run (keys: the training_runs columns)."""
        run = {**run, "metrics": json.dumps(run.get("metrics") or {})}
        columns = list(run)
        sql = (f"INSERT OR REPLACE INTO training_runs ({', '.join(columns)}) "
               f"VALUES ({', '.join('?' for _ in columns)})")
        self.execute(sql, [run[c] for c in columns])

    def recent_runs(self, persona: str | None = None, limit: int = 20) -> list[dict]:
        """The latest training runs, newest first, of one persona or all, with their metrics
        (the reward model's and the consistency figures are there); ``limit`` is kept within
        1..500."""
        rows = self.query_dicts("SELECT * FROM training_runs WHERE ? IS NULL OR persona = ? "
                                "ORDER BY started_at DESC LIMIT ?", [persona, persona, max(1, min(limit, 500))])
        for row in rows:
            row["metrics"] = json.loads(row["metrics"]) if isinstance(row.get("metrics"), str) else row.get("metrics")
        return rows

    # ---- snapshots ---------------------------------------------------------------------------
    def snapshot(self, folder: str | Path) -> Path:
        """Write every table (and the current votes) as Parquet files into a new folder.

        Other processes read the snapshot, never the live file. The folder appears
        complete or not at all (written beside it, then renamed)."""
        folder = Path(folder)
        folder.parent.mkdir(parents=True, exist_ok=True)
        partial = partial_path(folder)
        partial.mkdir()
        try:
            with self._lock:
                for table in SNAPSHOT_TABLES:
                    target = str(partial / f"{table}.parquet").replace("'", "''")
                    self._con.execute(f"COPY (SELECT * FROM {table}) TO '{target}' (FORMAT parquet)")
            partial.rename(folder)
        except BaseException:  # a full disk, a table that cannot be read: nothing half-written stays
            shutil.rmtree(partial, ignore_errors=True)
            raise
        return folder


PARTIAL_SUFFIX = ".partial"


def partial_path(folder: Path) -> Path:
    """Where a snapshot is written before it is renamed to ``folder``."""
    return folder.with_name(f".{folder.name}{PARTIAL_SUFFIX}")


SNAPSHOT_TABLES = ("turns", "votes", "current_votes", "comparisons", "current_comparisons", "adapters",
                   "training_runs")
