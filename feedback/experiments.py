"""A/B experiments (the store's ``experiments`` table): a challenger version of a persona
against its active version, decided by the users' pairwise verdicts (``feedback.abtest``).

All the experiment SQL is here; the gateway's controller (``serve/gateway/experiments.py``)
and the CLI call it.

* ``start``, ``stop``, ``record_decision``, ``record_figures``: the rows' life cycle. A
  persona has at most one running experiment (a second is a 409).
* ``verdicts``: the evidence. Every side-by-side verdict that counts now (the view
  ``current_comparisons``: a voter's latest verdict on two turns) made since the experiment
  started, between a turn of the challenger and a turn of the active version of the
  persona, whichever side each was on. Turns spoken with the caller's own system prompt
  are left out, as the pair builder leaves them out of training: they are not the persona.
* ``thumbs``: up and down votes per arm on the turns served since the experiment started
  (the challenger's share of API traffic among them). They are recorded in the figures and
  shown, but the decision rests on the pairwise verdicts alone: a thumb judges one answer
  on its own, against a bar each voter sets for themselves, and the two arms' turns come
  from different clients and prompts, so thumbs compare the arms only through whoever
  happened to be served by each. A pairwise verdict is the same voter on the same prompt.

    exp = start(store, "teto", challenger=4, active=3, run_id="teto-2025...", share=0.1,
                min_votes=40, alpha=0.05, max_hours=72)
    result = analyse(verdicts(store, exp), ABRules(exp["alpha"], exp["min_votes"]))
"""

from __future__ import annotations

import json
import math
import uuid
from datetime import datetime

from feedback.abtest import ABResult, Verdict
from feedback.errors import APIError
from feedback.store import utc_now

STATUSES = ("running", "promoted", "retired", "stopped")
COLUMNS = ("id", "persona", "challenger", "active", "run_id", "status", "share", "min_votes", "alpha", "max_hours",
           "started_at", "decided_at", "figures", "reason")


def _rows(db, where: str, params: list, limit: int = 500) -> list[dict]:
    rows = db.query_dicts(f"SELECT * FROM experiments WHERE {where} ORDER BY started_at DESC, id LIMIT ?",
                          [*params, max(1, min(limit, 500))])
    for row in rows:
        row["figures"] = json.loads(row["figures"]) if row["figures"] else {}
    return rows


def get(db, experiment_id: str) -> dict:
    """One experiment, or a 404 naming it."""
    rows = _rows(db, "id = ?", [experiment_id])
    if not rows:
        raise APIError(404, f"No experiment {experiment_id!r} (persona experiments list shows them).", param="id")
    return rows[0]


def running(db, persona: str | None = None) -> list[dict]:
    """The running experiments, of one persona or all."""
    return _rows(db, "status = 'running' AND (? IS NULL OR persona = ?)", [persona, persona])


def recent(db, persona: str | None = None, limit: int = 20) -> list[dict]:
    """The latest experiments, newest first, of one persona or all; ``limit`` within 1..500."""
    return _rows(db, "? IS NULL OR persona = ?", [persona, persona], limit)


def start(db, persona: str, challenger: int, active: int, run_id: str | None, share: float, min_votes: int,
          alpha: float, max_hours: float) -> dict:
    """Record a new running experiment and return it; a 409 while the persona has one."""
    current = running(db, persona)
    if current:
        other = current[0]
        raise APIError(409, f"{persona} already has a running experiment, {other['id']} (v{other['challenger']} "
                            f"against v{other['active']}); stop it first.", param="persona")
    experiment_id = f"exp-{uuid.uuid4().hex[:12]}"
    db.execute("INSERT INTO experiments (id, persona, challenger, active, run_id, status, share, min_votes, alpha, "
               "max_hours, started_at, figures) VALUES (?, ?, ?, ?, ?, 'running', ?, ?, ?, ?, ?, '{}')",
               [experiment_id, persona, challenger, active, run_id, share, min_votes, alpha, max_hours, utc_now()])
    return get(db, experiment_id)


def _finish(db, experiment_id: str, status: str, figures: dict | None, reason: str) -> dict:
    """Close a running experiment with ``status``; a 409 when it was decided already."""
    current = get(db, experiment_id)
    if current["status"] != "running":
        raise APIError(409, f"Experiment {experiment_id} is {current['status']} already "
                            f"({current['reason'] or 'no reason recorded'}).", param="id")
    db.execute("UPDATE experiments SET status = ?, decided_at = ?, figures = ?, reason = ? WHERE id = ?",
               [status, utc_now(), to_json(figures if figures is not None else current["figures"]), reason,
                experiment_id])
    return get(db, experiment_id)


def stop(db, experiment_id: str, reason: str = "stopped by an operator") -> dict:
    """Stop a running experiment by hand (its challenger is retired by the caller)."""
    return _finish(db, experiment_id, "stopped", None, reason)


def record_decision(db, experiment_id: str, status: str, figures: dict, reason: str) -> dict:
    """Record the test's decision (``promoted`` or ``retired``) with the figures it rests on."""
    if status not in ("promoted", "retired"):
        raise ValueError(f"a decision is promoted or retired, not {status!r}")
    return _finish(db, experiment_id, status, figures, reason)


def record_figures(db, experiment_id: str, figures: dict) -> None:
    """The latest figures of a running experiment (the test said: continue)."""
    db.execute("UPDATE experiments SET figures = ? WHERE id = ? AND status = 'running'",
               [to_json(figures), experiment_id])


def to_json(figures: dict) -> str:
    """The figures as JSON, with any non-finite number as null (JSON has no NaN)."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, list):
            return [clean(v) for v in value]
        return value

    return json.dumps(clean(figures))


def _words(answers: str) -> int:
    """Words in a turn's first answer (comparisons are between turns' first answers)."""
    values = json.loads(answers) if answers else []
    return len(str(values[0]).split()) if values else 0


def verdicts(db, experiment: dict) -> list[Verdict]:
    """The experiment's evidence (see the module docstring), one ``Verdict`` per voter and pair."""
    rows = db.query(
        "SELECT c.choice, ta.adapter_version, ta.answers, tb.answers FROM current_comparisons c "
        "JOIN turns ta ON ta.id = c.turn_a JOIN turns tb ON tb.id = c.turn_b "
        "WHERE c.created_at >= ? AND ta.persona = ? AND tb.persona = ? "
        "AND NOT coalesce(ta.own_system_prompt, false) AND NOT coalesce(tb.own_system_prompt, false) "
        "AND ((ta.adapter_version = ? AND tb.adapter_version = ?) "
        "OR (ta.adapter_version = ? AND tb.adapter_version = ?)) "
        "ORDER BY c.seq",
        [experiment["started_at"], experiment["persona"], experiment["persona"], experiment["challenger"],
         experiment["active"], experiment["active"], experiment["challenger"]])
    found = []
    for choice, version_a, answers_a, answers_b in rows:
        a_is_challenger = version_a == experiment["challenger"]
        diff = _words(answers_a) - _words(answers_b)
        won = None if choice not in ("a", "b") else (choice == "a") == a_is_challenger
        found.append(Verdict(won, float(diff if a_is_challenger else -diff)))
    return found


def thumbs(db, experiment: dict) -> dict:
    """``{"challenger": {"up", "down"}, "active": {"up", "down"}}``: the thumbs that count now
    on the turns each arm served since the experiment started."""
    rows = db.query(
        "SELECT t.adapter_version, v.vote, count(*) FROM current_votes v JOIN turns t ON t.id = v.turn_id "
        "WHERE t.persona = ? AND t.created_at >= ? AND t.adapter_version IN (?, ?) GROUP BY ALL",
        [experiment["persona"], experiment["started_at"], experiment["challenger"], experiment["active"]])
    counts = {arm: {"up": 0, "down": 0} for arm in ("challenger", "active")}
    for version, vote, n in rows:
        counts["challenger" if version == experiment["challenger"] else "active"][vote] = n
    return counts


def figures_of(result: ABResult, counted_thumbs: dict) -> dict:
    """What is recorded of an analysis: the test's figures and the thumbs per arm."""
    return {**result.as_dict(), "thumbs": counted_thumbs}


def hours_since(started_at: datetime) -> float:
    return (utc_now() - started_at).total_seconds() / 3600


def summary(experiment: dict) -> dict[str, str]:
    """One experiment as text fields, for the CLI's table and the dashboard's."""
    f = experiment.get("figures") or {}
    t = f.get("thumbs") or {}

    def rate(value) -> str:
        return "-" if value is None else f"{value:.0%}"

    def arm(name: str) -> str:
        counts = t.get(name) or {}
        return f"{counts.get('up', 0)} up / {counts.get('down', 0)} down"

    interval = f" [{f['low']:.2f}, {f['high']:.2f}]" if f.get("votes") else ""
    return {
        "id": experiment["id"], "persona": experiment["persona"],
        "versions": f"v{experiment['challenger']} vs v{experiment['active']}", "status": experiment["status"],
        "votes": f"{f.get('votes', 0)} (+{f.get('ties', 0)} ties)", "wins": str(f.get("wins", 0)),
        "win rate": f"{rate(f.get('win_rate'))}{interval}", "length-controlled": rate(f.get("length_controlled")),
        "thumbs challenger": arm("challenger"), "thumbs active": arm("active"),
        "share": f"{experiment['share']:.0%}", "started": str(experiment["started_at"])[:19],
        "decided": str(experiment["decided_at"] or "")[:19], "reason": experiment["reason"] or f.get("reason", ""),
    }
