"""Writing preference data to files: the tables the pair builder made, as Parquet or JSON Lines.

    pairs.build(db, "teto", kinds=("dpo",))
    n = write_table(db, "pref_dpo", "teto-dpo.parquet", split="train")

Used by ``persona feedback export`` and by the loop (the training step's input file),
which changes rows in Python first (``read_rows``, ``write_back``: the per-run voter rules).
"""

from __future__ import annotations

from pathlib import Path

SPLITS = ("all", "train", "heldout")


def personas_with_turns(db) -> set[str]:
    return {r[0] for r in db.query("SELECT DISTINCT persona FROM turns WHERE persona IS NOT NULL")}


def count(db, table: str, split: str = "all") -> int:
    return db.query(f"SELECT count(*) FROM {table} {_where(split)}")[0][0]


def write_table(db, table: str, path: str | Path, split: str = "all") -> int:
    """Write ``table`` (one of the pair builder's ``pref_*`` tables, without its persona
    column) to ``path``: Parquet for ``.parquet``, JSON Lines otherwise. Returns the rows written."""
    fmt = "parquet" if Path(path).suffix.lower() == ".parquet" else "json"
    quoted = str(Path(path).resolve()).replace("'", "''")
    db.execute(f"COPY (SELECT * EXCLUDE (persona) FROM {table} {_where(split)}) TO '{quoted}' (FORMAT {fmt})")
    return count(db, table, split)


def read_rows(db, table: str) -> list[dict]:
    """The rows of a ``pref_*`` table as dicts of what the voter rules read and change: ``row``
    (its rowid), ``weight``, ``voters``, ``versions`` (of its answers), ``context`` and ``split``."""
    return db.query_dicts(f"SELECT rowid AS row, weight, voters, versions, context, split FROM {table} ORDER BY rowid")


def write_back(db, table: str, rows: list[dict]) -> None:
    """Give ``table`` the weights and splits of ``rows`` (as ``read_rows`` returned them, then
    changed), and drop its rows that are not among them."""
    db.execute("CREATE OR REPLACE TEMP TABLE pref_changes AS SELECT unnest(CAST(? AS BIGINT[])) AS row, "
               "unnest(CAST(? AS DOUBLE[])) AS weight, unnest(CAST(? AS VARCHAR[])) AS split",
               [[r["row"] for r in rows], [float(r["weight"]) for r in rows], [r["split"] for r in rows]])
    db.execute(f"CREATE OR REPLACE TEMP TABLE {table} AS SELECT p.* REPLACE (c.weight AS weight, c.split AS split) "
               f"FROM {table} p JOIN pref_changes c ON p.rowid = c.row ORDER BY c.row")
    db.execute("DROP TABLE pref_changes")


def _where(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    return "" if split == "all" else f"WHERE split = '{split}'"  # one of two literals
