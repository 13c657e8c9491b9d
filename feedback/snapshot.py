"""Read the feedback data from outside the gateway: a Parquet snapshot it exported.

The live DuckDB file belongs to the gateway process (a second process cannot
even open it read-only while it is held). Statistics, exports and the
training loop read a snapshot instead: one Parquet file per table, opened
here as views of an in-memory DuckDB with the same table names, so the same
SQL runs on the live store and on a snapshot.

    snap = Snapshot.open(folder)          # or Snapshot.latest()
    snap.query("SELECT count(*) FROM votes")
"""

from __future__ import annotations

import time
from pathlib import Path

from feedback import settings
from feedback.errors import UserError
from feedback.store import PARTIAL_SUFFIX, SNAPSHOT_TABLES, Reads

KEEP = 5  # snapshots kept on disk; older ones are removed when a new one is written


class SnapshotError(UserError):
    pass


def snapshots_dir() -> Path:
    return settings.home() / "snapshots"


def new_snapshot_path() -> Path:
    return snapshots_dir() / (time.strftime("%Y%m%d-%H%M%S-") + f"{time.time_ns() % 1_000_000_000:09d}")


def prune(keep: int = KEEP) -> None:
    import shutil

    done = sorted(p for p in snapshots_dir().glob("*") if p.is_dir() and not p.name.startswith("."))
    for old in done[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def remove_partials() -> list[Path]:
    """Remove the half-written snapshot folders a killed process left (``.NAME.partial``);
    the gateway calls it at start, when no snapshot of its own is being written."""
    import shutil

    stale = [p for p in snapshots_dir().glob(f".*{PARTIAL_SUFFIX}") if p.is_dir()]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


class Snapshot(Reads):
    """Read-only tables of one snapshot folder."""

    def __init__(self, con, source: str):
        super().__init__(con)
        self.source = source

    @classmethod
    def open(cls, folder: str | Path) -> "Snapshot":
        import duckdb

        folder = Path(folder)
        missing = [t for t in SNAPSHOT_TABLES if not (folder / f"{t}.parquet").is_file()]
        if missing:
            raise SnapshotError(f"{folder} is not a complete feedback snapshot (missing: "
                                f"{', '.join(f'{t}.parquet' for t in missing)})")
        con = duckdb.connect(":memory:")
        for table in SNAPSHOT_TABLES:
            path = str(folder / f"{table}.parquet").replace("'", "''")
            con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{path}')")
        return cls(con, str(folder))

    @classmethod
    def latest(cls) -> "Snapshot":
        done = sorted(p for p in snapshots_dir().glob("*") if p.is_dir() and not p.name.startswith("."))
        if not done:
            raise SnapshotError(f"no snapshot in {snapshots_dir()}: start the gateway (persona up) "
                                "and run the command again, or export one with POST /admin/snapshot")
        return cls.open(done[-1])

    def execute(self, sql: str, params: list | None = None) -> list[tuple]:
        """Statements on the in-memory side (temporary tables of the pair builder)."""
        return self.query(sql, params)

    def close(self) -> None:
        self._con.close()
