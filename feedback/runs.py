"""Training-run records (the store's ``training_runs`` table): the rules every process
that reads or writes them shares, written once.

* ``close_interrupted``: runs of a persona still marked as going belong to a process
  that died (there is one run per persona at a time), so they are recorded as failed.
  The retrain loop (``train/loop.py``) does it before each run; the gateway's scheduler
  does it when a run process exits with an error.
* ``last_trained_start``: when the persona's last run that trained started, so the
  scheduler counts only the votes recorded since.
* ``record_outcome``: what became of a run's challenger once its A/B experiment decided.

Both read the live store or a snapshot; ``record`` says where a record goes (the
store's ``record_run`` in the gateway process, the gateway's API from another one).

    close_interrupted(store, "teto", store.record_run)
"""

from __future__ import annotations

import json
import time
from typing import Callable

# A run in any other status is still going. "challenger": it passed the gate and started an
# A/B experiment (promotion: ab), which decides later; the gateway then records the outcome on
# the run too ("promoted", or "retired" when the challenger lost: ``record_outcome``).
# "succeeded": an SFT version, recorded when the store syncs the registry's adapters.
FINISHED = ("promoted", "rejected", "skipped", "failed", "challenger", "retired", "succeeded")
TRAINED = ("promoted", "rejected", "failed", "challenger", "retired", "succeeded")  # finished runs that trained
INTERRUPTED = "interrupted: its process ended before the run finished; nothing was promoted"


def now() -> str:
    """UTC now as text: the form of ``started_at`` and ``finished_at`` (comparable as text)."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime())


def close_interrupted(db, persona: str, record: Callable[[dict], None], message: str = INTERRUPTED) -> int:
    """Record as failed every run of ``persona`` still marked as going; returns how many."""
    rows = db.query_dicts(f"SELECT * FROM training_runs WHERE persona = ? AND status NOT IN "
                          f"({', '.join('?' for _ in FINISHED)})", [persona, *FINISHED])
    for row in rows:
        metrics = row.get("metrics")
        row.update(status="failed", finished_at=now(), message=message,
                   metrics=json.loads(metrics) if isinstance(metrics, str) and metrics else metrics)
        record(row)
    return len(rows)


def last_trained_start(db, persona: str):
    """When the persona's last preference run that trained started (a UTC time), or None:
    the votes recorded since are the new ones (``feedback.pending``). Skipped runs trained
    nothing, and a run that failed before it trained has no examples: neither counts."""
    rows = db.query("SELECT max(started_at) FROM training_runs WHERE persona = ? AND kind IN ('dpo', 'kto') "
                    f"AND train_examples IS NOT NULL AND status IN ({', '.join('?' for _ in TRAINED)})",
                    [persona, *TRAINED])
    return rows[0][0] if rows else None


def record_outcome(db, run_id: str, status: str, message: str) -> None:
    """Set the status and message of a finished run (the rest of its record stays): the
    outcome of the A/B experiment its challenger ran in. A run not recorded is left alone."""
    db.execute("UPDATE training_runs SET status = ?, message = ? WHERE id = ?", [status, message, run_id])
