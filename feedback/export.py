"""Writing preference data to files: the tables the pair builder made, as Parquet or JSON Lines.

    pairs.build(db, "teto", kinds=("dpo",))
    n = write_table(db, "pref_dpo", "teto-dpo.parquet", split="train")

Used by ``persona feedback export`` and by the loop (the training step's input file).
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


def _where(split: str) -> str:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, not {split!r}")
    return "" if split == "all" else f"WHERE split = '{split}'"  # one of two literals
