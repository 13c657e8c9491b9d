"""Units of agreement read from the store: what several voters judged, and each one's verdict.

The store's votes become the units of ``feedback.agreement``:

* a **side-by-side unit** is one prompt context and an unordered pair of answer
  texts; its values are ``x``/``y`` (``x``: the answer whose text sorts first,
  so the left/right order shown makes no difference), ``tie`` or ``both_bad``;
* a **thumbs unit** is one context and one answer text; its values are ``up`` and
  ``down``.

Identical texts are one answer (as in the pair builder), so two voters who got the
same answer on their own regenerations judged the same unit. A voter gives a unit
one value: their latest (``current_votes``, ``current_comparisons``, then the
newest of their verdicts on that unit). The turns are those the pair builder
reads (``turns_cte``): persona turns that were served, without the ones spoken
with the caller's own system prompt unless asked for.

    units.read(db, "teto")                          # {(persona, kind): {unit key: {voter: value}}}
    units.alpha_sums(db)                            # alpha's sums per persona and kind, in SQL
    units.outliers(db, "teto")                      # {persona: [Disagreement]} flagged voters, counted in SQL

The outlier test runs on the decisive values only (``x``/``y``, ``up``/``down``),
agreement on all of them. Its per-voter counts are made in SQL (one pass, fast
on a million votes) with the consensus rule of ``agreement._consensus``;
``tests/test_agreement.py`` checks both give the same counts.
"""

from __future__ import annotations

from collections import defaultdict
from typing import NamedTuple

from feedback import agreement

_TURNS = """
    t AS (
        SELECT id, persona, adapter_version, messages, md5(CAST(messages AS VARCHAR)) AS context, answers
        FROM turns
        WHERE status = 'ok' AND persona IS NOT NULL {persona_filter} {own_filter}
    )"""

# A unit is keyed by a 64-bit hash of its context and answer texts (grouping on it is
# twice as fast as on the texts; two of a million units collide with odds of about 3e-8).
_UNITS = """,
    sbs AS (
        SELECT persona, unit, voter,
               arg_max(CASE WHEN choice IN ('tie', 'both_bad') THEN choice
                            WHEN (choice = 'a') = (a < b) THEN 'x' ELSE 'y' END, seq) AS value
        FROM (SELECT ta.persona, json_extract_string(ta.answers, 0) AS a, json_extract_string(tb.answers, 0) AS b,
                     hash(ta.context, least(a, b), greatest(a, b)) AS unit, c.choice, c.voter, c.seq
              FROM {comparisons} c JOIN t ta ON ta.id = c.turn_a JOIN t tb ON tb.id = c.turn_b
              WHERE ta.context = tb.context)
        WHERE a <> b AND a <> '' AND b <> ''
        GROUP BY persona, unit, voter
    ),
    thumb AS (
        SELECT persona, unit, voter, arg_max(vote, seq) AS value
        FROM (SELECT t.persona, json_extract_string(t.answers, v.choice_index) AS answer,
                     hash(t.context, answer) AS unit, v.voter, v.vote, v.seq
              FROM {votes} v JOIN t ON t.id = v.turn_id)
        WHERE answer <> ''
        GROUP BY persona, unit, voter
    ),
    units AS (
        SELECT 'side_by_side' AS kind, * FROM sbs UNION ALL SELECT 'thumbs', * FROM thumb
    )"""

_UNIT = "persona, kind, unit"
_CURRENT = "(SELECT * REPLACE (coalesce(voter, client) AS voter) FROM {})"  # rows older than voters: the client


class Source(NamedTuple):
    """Tables to read instead of the store's: the pair builder's stages (``turns`` already
    filtered; ``votes`` and ``comparisons`` the current ones)."""
    turns: str
    votes: str
    comparisons: str


def turns_cte(persona: str | None, include_own_system_prompt: bool = False) -> str:
    """The CTE ``t`` of the turns preference data and agreement are read from (the
    persona as ``$persona`` when given)."""
    return _TURNS.format(persona_filter="AND persona = $persona" if persona else "",
                         own_filter="" if include_own_system_prompt else "AND NOT coalesce(own_system_prompt, false)")


def _with(persona: str | None, include_own: bool, source: Source | None = None) -> tuple[str, dict]:
    """The units CTEs, on the store's tables or on ``source``."""
    if source:
        return (f"WITH t AS (SELECT * FROM {source.turns})"
                + _UNITS.format(votes=source.votes, comparisons=source.comparisons)), {}
    return ("WITH" + turns_cte(persona, include_own) + _UNITS.format(votes=_CURRENT.format("current_votes"),
                                                                    comparisons=_CURRENT.format("current_comparisons")),
            {"persona": persona} if persona else {})


def read(db, persona: str | None = None, include_own_system_prompt: bool = False,
         min_voters: int = 1) -> dict[tuple[str, str], dict]:
    """``{(persona, kind): {unit: {voter: value}}}``, units judged by at least ``min_voters``
    voters (``unit``: the hash of the unit's context and answer texts)."""
    sql, params = _with(persona, include_own_system_prompt)
    rows = db.query(sql + f"""
        SELECT {_UNIT}, voter, value FROM units
        QUALIFY count(*) OVER (PARTITION BY {_UNIT}) >= $min_voters""", {**params, "min_voters": min_voters})
    out: dict[tuple[str, str], dict] = defaultdict(lambda: defaultdict(dict))
    for p, kind, unit, voter, value in rows:
        out[p, kind][unit][voter] = value
    return {k: dict(v) for k, v in out.items()}


def alpha_sums(db, persona: str | None = None, include_own_system_prompt: bool = False) -> list[dict]:
    """Per persona and kind of unit, over the units judged by 2+ voters: how many (``contexts``),
    the distinct voters who judged them, and alpha's sums (``agreement.alpha_from_sums``):
    ``n`` values, ``observed`` = sum over units of (m^2 - sum of n_c^2) / (m - 1), and
    ``expected`` = n^2 - sum over values of their totals squared."""
    sql, params = _with(persona, include_own_system_prompt)
    return db.query_dicts(sql + f""",
        shared AS (SELECT *, count(*) OVER (PARTITION BY {_UNIT}) AS m FROM units QUALIFY m >= 2),
        per_value AS (SELECT {_UNIT}, value, any_value(m) AS m, count(*) AS n FROM shared GROUP BY ALL),
        per_unit AS (SELECT {_UNIT}, any_value(m) AS m, sum(n * n) AS sq FROM per_value GROUP BY ALL),
        sums AS (SELECT persona, kind, count(*) AS contexts, sum(m) AS n, sum((m * m - sq) / (m - 1)) AS observed
                 FROM per_unit GROUP BY ALL),
        totals AS (SELECT persona, kind, sum(total * total) AS sq FROM (
                       SELECT persona, kind, value, sum(n) AS total FROM per_value GROUP BY ALL) GROUP BY ALL),
        judges AS (SELECT persona, kind, count(DISTINCT voter) AS voters FROM shared GROUP BY ALL)
        SELECT persona, kind, contexts, voters, CAST(n AS DOUBLE) AS n, observed,
               CAST(n * n - totals.sq AS DOUBLE) AS expected
        FROM sums JOIN totals USING (persona, kind) JOIN judges USING (persona, kind)
        ORDER BY persona, kind""", params)


def disagreements(db, persona: str | None = None, include_own_system_prompt: bool = False,
                  min_shared: int = 1, source: Source | None = None) -> dict[str, list[agreement.Disagreement]]:
    """Per persona: each voter's shared units (with a consensus of the others) and how many
    of them they went against, on decisive values, for voters with ``min_shared`` or more.

    A unit's decisive values are two (``x``/``y`` or ``up``/``down``), so the others'
    consensus is the value at least two of them gave and more of them than the other
    value (``agreement._consensus``): o1 and o2 are the others' counts of each."""
    sql, params = _with(persona, include_own_system_prompt, source)
    rows = db.query(sql + f""",
        decisive AS (SELECT {_UNIT}, voter, CAST(value IN ('x', 'up') AS INTEGER) AS first FROM units
                     WHERE value IN ('x', 'y', 'up', 'down')),
        counts AS (    -- units with three decisive voters or more: only they can give a consensus of others
            SELECT {_UNIT}, sum(first) AS n1, count(*) - sum(first) AS n2 FROM decisive
            GROUP BY ALL HAVING count(*) >= 3
        ),
        others AS (
            SELECT d.persona, d.voter, d.first, c.n1 - d.first AS o1, c.n2 - (1 - d.first) AS o2
            FROM decisive d JOIN counts c USING (persona, kind, unit)
        )
        SELECT persona, voter, count(*) AS shared, count(*) FILTER ((first = 1) <> (o1 > o2)) AS disagreed
        FROM others WHERE greatest(o1, o2) >= 2 AND o1 <> o2
        GROUP BY persona, voter HAVING count(*) >= $min_shared ORDER BY persona, voter""",
                    {**params, "min_shared": min_shared})
    out: dict[str, list[agreement.Disagreement]] = defaultdict(list)
    for p, voter, shared, disagreed in rows:
        p_value = agreement.binomial_tail(disagreed, shared, 0.5)
        out[p].append(agreement.Disagreement(voter, shared, disagreed, 0.5, p_value))
    return dict(out)


def outliers(db, persona: str | None = None, include_own_system_prompt: bool = False,
             min_shared: int = 20, source: Source | None = None) -> dict[str, list[agreement.Disagreement]]:
    """Per persona, the voters ``agreement.flag`` finds: far more disagreement with the others'
    consensus than chance, on at least ``min_shared`` shared contexts (Bonferroni over the
    persona's voters tested)."""
    found = {p: agreement.flag(ds, min_shared)
             for p, ds in disagreements(db, persona, include_own_system_prompt, min_shared, source).items()}
    return {p: ds for p, ds in found.items() if ds}
