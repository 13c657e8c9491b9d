"""Feedback statistics: the figures the dashboard plots and ``persona feedback stats`` prints.

Every function takes a database with the store's tables (the live store or a
snapshot) and returns plain rows. Rates come with 95% Wilson score intervals,
which stay inside [0, 1] and are honest for small counts.

    stats.thumbs(db)        # thumbs-up rate per persona and adapter version
    stats.win_rates(db)     # side-by-side win rate per persona and version (versions that met another)
    stats.biases(db)        # how often the left answer wins, how often the longer one wins
    stats.personas(db)      # distinct voters per persona, turns left out for their own system prompt
    stats.agreement(db)     # Krippendorff's alpha (Cohen's kappa for two voters) per persona and kind of vote
    stats.outliers(db)      # voters the pair builder gives no weight, and why

A voter is the ``voter`` column (an API key's fingerprint, a UI login); a
side-by-side verdict counts once per voter and pair of turns (``current_comparisons``).
"""

from __future__ import annotations

import json
import math
import re

from feedback import pairs, units
from feedback.agreement import alpha_from_sums, cohen_kappa

Z95 = 1.959964


def wilson(successes: float, n: float, z: float = Z95) -> tuple[float, float]:
    """95% Wilson score interval of a proportion (``(0, 1)`` when there is no data)."""
    if n <= 0:
        return 0.0, 1.0
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return max(0.0, centre - half), min(1.0, centre + half)


def _rate(row: dict, wins: str, n: str) -> dict:
    row = {**row, wins: float(row[wins]), n: int(row[n])}  # DuckDB sums of decimals are Decimal
    lo, hi = wilson(row[wins], row[n])
    return {**row, "rate": row[wins] / row[n] if row[n] else None, "low": lo, "high": hi}


def thumbs(db) -> list[dict]:
    rows = db.query_dicts("""
        SELECT t.persona, t.adapter_version AS version, count(*) FILTER (v.vote = 'up') AS up,
               count(*) FILTER (v.vote = 'down') AS down, count(*) AS votes
        FROM current_votes v JOIN turns t ON t.id = v.turn_id
        WHERE t.persona IS NOT NULL
        GROUP BY ALL ORDER BY t.persona, version""")
    return [_rate(r, "up", "votes") for r in rows]


def win_rates(db) -> list[dict]:
    """Side-by-side results of each version against other versions (a tie is half a win;
    ``both_bad`` and comparisons of two samples of one version are left out)."""
    rows = db.query_dicts("""
        WITH games AS (
            SELECT ta.persona, ta.adapter_version AS va, tb.adapter_version AS vb, c.choice
            FROM current_comparisons c JOIN turns ta ON ta.id = c.turn_a JOIN turns tb ON tb.id = c.turn_b
            WHERE c.choice <> 'both_bad' AND ta.adapter_version IS DISTINCT FROM tb.adapter_version
        ),
        sides AS (
            SELECT persona, va AS version, CASE choice WHEN 'a' THEN 1.0 WHEN 'tie' THEN 0.5 ELSE 0.0 END AS win
            FROM games
            UNION ALL
            SELECT persona, vb, CASE choice WHEN 'b' THEN 1.0 WHEN 'tie' THEN 0.5 ELSE 0.0 END FROM games
        )
        SELECT persona, version, sum(win) AS wins, count(*) AS games FROM sides
        GROUP BY ALL ORDER BY persona, version""")
    return [_rate(r, "wins", "games") for r in rows]


def biases(db) -> list[dict]:
    """Position bias (the left answer wins) and length bias (the longer answer wins, by
    ``text_length``), over comparisons with a winner; 0.5 means no bias."""
    rows = db.query("""
        SELECT CASE c.choice WHEN 'a' THEN c.turn_a ELSE c.turn_b END = c.left_turn AS left_won, c.choice,
               json_extract_string(ta.answers, 0), json_extract_string(tb.answers, 0)
        FROM current_comparisons c JOIN turns ta ON ta.id = c.turn_a JOIN turns tb ON tb.id = c.turn_b
        WHERE c.choice IN ('a', 'b')""")
    left_wins = sum(bool(left_won) for left_won, *_ in rows)
    longer_wins = unequal = 0
    for _, choice, a, b in rows:
        la, lb = text_length(a or ""), text_length(b or "")
        if la != lb:
            unequal += 1
            longer_wins += (la > lb) == (choice == "a")
    return [_rate({"bias": "left answer wins", "wins": left_wins, "n": len(rows)}, "wins", "n"),
            _rate({"bias": "longer answer wins", "wins": longer_wins, "n": unequal}, "wins", "n")]


# Scripts written without spaces between words: CJK ideographs, kana, Thai, Lao, Khmer, Myanmar.
# Korean writes spaces between words (eojeol), so Hangul counts by words like Latin script.
SPACELESS = re.compile("[\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
                       "\u0e00-\u0eff\u1000-\u109f\u1780-\u17ff]")


def text_length(text: str) -> int:
    """How long an answer reads: its words where the script separates words with spaces, one
    per character where it does not ("I am here" and "我在这里" are 3 and 4). Characters alone
    would let one script's answers look longer than another's for the same content."""
    spaceless = len(SPACELESS.findall(text))
    return spaceless + len(SPACELESS.sub(" ", text).split())


def votes_over_time(db) -> list[dict]:
    """Votes per day and persona: thumbs up, thumbs down, comparisons."""
    return db.query_dicts("""
        WITH events AS (
            SELECT date_trunc('day', v.created_at) AS day, t.persona, v.vote AS kind
            FROM current_votes v JOIN turns t ON t.id = v.turn_id
            UNION ALL
            SELECT date_trunc('day', c.created_at), t.persona, 'comparison'
            FROM current_comparisons c JOIN turns t ON t.id = c.turn_a
        )
        SELECT day, persona, count(*) FILTER (kind = 'up') AS up, count(*) FILTER (kind = 'down') AS down,
               count(*) FILTER (kind = 'comparison') AS comparisons
        FROM events WHERE persona IS NOT NULL GROUP BY ALL ORDER BY day, persona""")


def adapters(db) -> list[dict]:
    rows = db.query_dicts("""
        SELECT persona, version, name, status, kind, parent_version, created_at, metrics FROM adapters
        WHERE status <> 'retired' ORDER BY persona, version""")
    for r in rows:
        r["metrics"] = json.loads(r["metrics"]) if isinstance(r["metrics"], str) else (r["metrics"] or {})
    return rows


def training_runs(db, limit: int = 50) -> list[dict]:
    return db.query_dicts("""
        SELECT id, persona, kind, status, parent_version, adapter_version, started_at, finished_at,
               train_examples, heldout_examples, reward_accuracy, reward_margin,
               TRY_CAST(json_extract(metrics, '$.reward_model.heldout_accuracy') AS DOUBLE) AS rm_accuracy,
               TRY_CAST(json_extract(metrics, '$.consistency_candidate') AS DOUBLE) AS consistency,
               TRY_CAST(json_extract(metrics, '$.consistency_active') AS DOUBLE) AS consistency_active, message
        FROM training_runs ORDER BY started_at DESC LIMIT ?""", [limit])


_VOTERS = """
    voters AS (
        SELECT t.persona, coalesce(v.voter, v.client) AS voter FROM current_votes v JOIN turns t ON t.id = v.turn_id
        UNION ALL
        SELECT t.persona, coalesce(c.voter, c.client) FROM current_comparisons c JOIN turns t ON t.id = c.turn_a
    )"""


def totals(db) -> dict:
    turns, votes, comparisons, voters = db.query(f"""
        WITH {_VOTERS}
        SELECT (SELECT count(*) FROM turns), (SELECT count(*) FROM current_votes),
               (SELECT count(*) FROM current_comparisons), (SELECT count(DISTINCT voter) FROM voters)""")[0]
    return {"turns": turns, "votes": votes, "comparisons": comparisons, "voters": voters}


def personas(db) -> list[dict]:
    """Per persona: turns, distinct voters, and the turns (and votes on them) that stay out of
    preference data because the caller sent its own system prompt."""
    return db.query_dicts(f"""
        WITH {_VOTERS},
        own AS (
            SELECT t.id FROM turns t WHERE coalesce(t.own_system_prompt, false)
        ),
        own_votes AS (
            SELECT t.persona, count(*) AS n FROM turns t JOIN own ON own.id = t.id
                 JOIN (SELECT turn_id FROM current_votes UNION ALL SELECT turn_a FROM current_comparisons) v
                 ON v.turn_id = t.id
            GROUP BY t.persona
        )
        SELECT t.persona, count(*) AS turns, coalesce(any_value(v.voters), 0) AS voters,
               count(*) FILTER (coalesce(t.own_system_prompt, false)) AS own_prompt_turns,
               coalesce(any_value(o.n), 0) AS own_prompt_votes
        FROM turns t
             LEFT JOIN (SELECT persona, count(DISTINCT voter) AS voters FROM voters GROUP BY persona) v USING (persona)
             LEFT JOIN own_votes o USING (persona)
        WHERE t.persona IS NOT NULL GROUP BY t.persona ORDER BY t.persona""")


def agreement(db, rules: pairs.PairRules = pairs.PairRules()) -> list[dict]:
    """Per persona and kind of vote (side by side, thumbs): Krippendorff's alpha on the units
    (``feedback.units``) judged by two voters or more, how many such units (``contexts``)
    and voters it rests on, and Cohen's kappa when exactly two voters judged them. The
    turns are those the pair builder reads."""
    out = []
    for r in units.alpha_sums(db, include_own_system_prompt=rules.include_own_system_prompt):
        kappa = None
        if r["voters"] == 2:
            judged = units.read(db, r["persona"], rules.include_own_system_prompt, min_voters=2)
            shared = judged.get((r["persona"], r["kind"]), {})
            a, b = sorted({v for ratings in shared.values() for v in ratings})
            kappa = cohen_kappa(shared, a, b)
        alpha = alpha_from_sums(r["n"], r["observed"], r["expected"])
        out.append({"persona": r["persona"], "kind": r["kind"], "alpha": alpha,
                    "kappa": kappa, "contexts": r["contexts"], "voters": r["voters"]})
    return out


def outliers(db, rules: pairs.PairRules = pairs.PairRules()) -> list[dict]:
    """The voters the pair builder gives weight 0, per persona, with the outlier rule's reason."""
    return [{"persona": persona, "voter": d.voter, "shared": d.shared, "disagreed": d.disagreed,
             "p_value": d.p_value, "reason": d.reason}
            for persona, found in sorted(pairs.outliers(db, rules=rules).items()) for d in found]


def summary(db) -> dict:
    return {"totals": totals(db), "personas": personas(db), "agreement": agreement(db), "outliers": outliers(db),
            "thumbs": thumbs(db), "win_rates": win_rates(db), "biases": biases(db),
            "adapters": adapters(db), "training_runs": training_runs(db)}
