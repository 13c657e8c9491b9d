"""The pair builder: votes and comparisons in, preference data out (SQL, in a few staged passes).

Works on any database with the store's tables (the live store or a snapshot):

* **DPO pairs** (same prompt context, chosen vs rejected) from side-by-side
  comparisons (``a``/``b``) and from thumbs on different answers to the same
  context (an up-voted and a down-voted regeneration make a pair).
  Each pair keeps its provenance: the turn ids, adapter versions and voters
  behind it. Ties make no pair.
* **KTO examples** (one answer, desirable or not) from thumbs on answers that
  are in no pair, and ``both_bad`` comparisons (two undesirable answers).
* **SFT examples**: answers that were up-voted or won a comparison.

Rules: only the latest vote of each voter counts (``current_votes``,
``current_comparisons``; a voter is the ``voter`` column: an API key's
fingerprint or a UI login); each voter's weight is capped (a voter with more
than ``voter_cap`` votes has each vote scaled down so that all of them weigh
``voter_cap``); a voter the outlier rule flags (``feedback.units.outliers``:
far more disagreement with the consensus of the others than chance, on at least
``outlier_min_shared`` shared contexts) weighs 0 on that persona, so their votes
make nothing and they are in no row's ``voters``; conflicting evidence is summed
and a pair or label whose net weight is zero is dropped; identical answer texts
are one answer; turns spoken with the caller's own system prompt are not the
persona and are left out (``include_own_system_prompt`` puts them back); the
train/held-out split is by context (``md5`` of the prompt messages), so it never
changes as votes come in and a context is never on both sides.

**Unsafe answers.** An answer thumbed down with the reason "Unsafe" (the UI's
menu; any case, and a reason that starts with it) is never chosen, desirable or
an SFT example, whatever other votes say: its label score is at most minus the
weight of those votes (undesirable for KTO), a pair in which it would win is
turned round (the unsafe answer is rejected, same weight), and a pair of two
unsafe answers is dropped (both become undesirable KTO examples).

    build(db, "teto")                 # -> {"dpo": n, "kto": n, "sft": n}, tables pref_dpo/pref_kto/pref_sft
"""

from __future__ import annotations

from dataclasses import dataclass

from feedback import units

KINDS = ("dpo", "kto", "sft")
UNSAFE = "unsafe"  # the UI's thumbs-down reason (serve/ui/app.py FEEDBACK), matched in lower case


@dataclass(frozen=True)
class PairRules:
    voter_cap: float = 200.0   # the most weight one voter's votes carry, all together
    heldout_percent: int = 20  # share of contexts (not of pairs) kept out of training
    drop_outliers: bool = True      # voters who go against the others far above chance weigh 0
    outlier_min_shared: int = 20    # shared contexts before the outlier rule judges a voter
    include_own_system_prompt: bool = False  # also turns where the caller replaced the persona's prompt


# The build runs in stages, each a temporary table the next ones read, so that the
# turns, the vote weights and the answer labels are computed once for the three kinds.
_STAGES = [
    ("turns", "WITH{turns} SELECT * FROM t"),
    ("votes", """
        SELECT turn_id, choice_index, coalesce(voter, client) AS voter, vote, reason, created_at, seq FROM current_votes"""),
    ("comparisons", """
        SELECT turn_a, turn_b, choice, coalesce(voter, client) AS voter, created_at, seq FROM current_comparisons"""),
    ("voters", """
        SELECT voter, least(1.0, {cap} / count(*)) AS w
        FROM (SELECT voter FROM pref_stage_votes UNION ALL SELECT voter FROM pref_stage_comparisons)
        GROUP BY voter"""),
    ("cmp", """
        WITH flagged AS ({flagged})
        SELECT ta.persona, ta.context, json_extract_string(ta.answers, 0) AS a,
               json_extract_string(tb.answers, 0) AS b, c.choice, v.w, ta.id AS turn_a, tb.id AS turn_b,
               ta.adapter_version AS version_a, tb.adapter_version AS version_b, v.voter
        FROM pref_stage_comparisons c JOIN pref_stage_turns ta ON ta.id = c.turn_a
             JOIN pref_stage_turns tb ON tb.id = c.turn_b JOIN pref_stage_voters v ON v.voter = c.voter
        WHERE ta.context = tb.context
              AND NOT EXISTS (SELECT 1 FROM flagged f WHERE f.persona = ta.persona AND f.voter = v.voter)"""),
    # Net thumbs per distinct answer text of a context (both_bad counts as two downs); an
    # answer thumbed down as unsafe scores at most minus the weight of those votes.
    ("labels", """
        WITH flagged AS ({flagged}),
        thumbs AS (
            SELECT t.persona, t.context, json_extract_string(t.answers, v.choice_index) AS answer,
                   CASE v.vote WHEN 'up' THEN voter.w ELSE -voter.w END AS w,
                   CASE WHEN v.vote = 'down' AND lower(trim(v.reason)) LIKE '{unsafe}%' THEN voter.w ELSE 0 END
                       AS unsafe,
                   t.id AS turn, t.adapter_version AS version, voter.voter
            FROM pref_stage_votes v JOIN pref_stage_turns t ON t.id = v.turn_id
                 JOIN pref_stage_voters voter ON voter.voter = v.voter
            WHERE NOT EXISTS (SELECT 1 FROM flagged f WHERE f.persona = t.persona AND f.voter = voter.voter)
        )
        SELECT persona, context, answer, sum(unsafe) > 0 AS unsafe,
               CASE WHEN sum(unsafe) > 0 THEN least(sum(w), -sum(unsafe)) ELSE sum(w) END AS score,
               count(*) AS votes, list_distinct(list(turn)) AS turns, list_distinct(list(version)) AS versions,
               list_distinct(list(voter)) AS voters  -- 4x faster than list(DISTINCT ...) here
        FROM (SELECT * FROM thumbs
              UNION ALL SELECT persona, context, a, -w, 0, turn_a, version_a, voter FROM pref_stage_cmp
                        WHERE choice = 'both_bad'
              UNION ALL SELECT persona, context, b, -w, 0, turn_b, version_b, voter FROM pref_stage_cmp
                        WHERE choice = 'both_bad')
        WHERE answer <> ''
        GROUP BY persona, context, answer"""),
    # One row per unordered answer pair kept, with its winner: opposite evidence cancels, an
    # unsafe answer never wins (the pair is turned round), two unsafe answers make no pair.
    ("pairs", """
        WITH evidence AS (  -- (chosen, rejected, weight) from comparisons and from thumbs
            SELECT persona, context, CASE choice WHEN 'a' THEN a ELSE b END AS chosen,
                   CASE choice WHEN 'a' THEN b ELSE a END AS rejected, w AS weight,
                   [turn_a, turn_b] AS turns, [version_a, version_b] AS versions, [voter] AS voters
            FROM pref_stage_cmp WHERE choice IN ('a', 'b') AND a <> b AND a <> '' AND b <> ''
            UNION ALL
            SELECT u.persona, u.context, u.answer, d.answer, least(u.score, -d.score),
                   list_concat(u.turns, d.turns), list_concat(u.versions, d.versions),
                   list_concat(u.voters, d.voters)
            FROM pref_stage_labels u JOIN pref_stage_labels d ON u.context = d.context AND u.score > 0 AND d.score < 0
        ),
        net AS (
            SELECT persona, context, least(chosen, rejected) AS x, greatest(chosen, rejected) AS y,
                   sum(CASE WHEN chosen < rejected THEN weight ELSE -weight END) AS net, count(*) AS votes,
                   list_distinct(flatten(list(turns))) AS turns, list_distinct(flatten(list(versions))) AS versions,
                   list_distinct(flatten(list(voters))) AS voters
            FROM evidence GROUP BY persona, context, x, y
        ),
        unsafe AS (SELECT persona, context, answer FROM pref_stage_labels WHERE unsafe)
        SELECT n.*, CASE WHEN (ux.answer IS NULL) <> (uy.answer IS NULL) THEN uy.answer IS NOT NULL
                         ELSE n.net > 0 END AS x_wins
        FROM net n
             LEFT JOIN unsafe ux ON ux.persona = n.persona AND ux.context = n.context AND ux.answer = n.x
             LEFT JOIN unsafe uy ON uy.persona = n.persona AND uy.context = n.context AND uy.answer = n.y
        WHERE n.net <> 0 AND (ux.answer IS NULL OR uy.answer IS NULL)"""),
    ("prompts", "SELECT context, any_value(messages) AS messages FROM pref_stage_turns GROUP BY context"),
]
_FLAGGED = "SELECT f[1] AS persona, f[2] AS voter FROM (SELECT unnest(CAST($flagged AS VARCHAR[][])) AS f)"

_SPLIT = "CASE WHEN md5_number(p.context) % 100 < {heldout} THEN 'heldout' ELSE 'train' END AS split"
_MSGS = "from_json(p.messages, '[{\"role\": \"VARCHAR\", \"content\": \"VARCHAR\"}]')"


def _assistant(expr: str) -> str:
    return f"[{{'role': 'assistant', 'content': {expr}}}]"


def _outputs(rules: PairRules) -> dict[str, str]:
    split = _SPLIT.format(heldout=int(rules.heldout_percent))
    return {
        "dpo": f"""
            SELECT n.persona, n.context, {_MSGS} AS prompt,
                   {_assistant("CASE WHEN n.x_wins THEN n.x ELSE n.y END")} AS chosen,
                   {_assistant("CASE WHEN n.x_wins THEN n.y ELSE n.x END")} AS rejected,
                   abs(n.net) AS weight, n.votes, n.turns, n.versions, n.voters, {split}
            FROM pref_stage_pairs n JOIN pref_stage_prompts p USING (context)
            ORDER BY n.persona, n.context, chosen[1].content, rejected[1].content""",
        "kto": f"""
            SELECT l.persona, l.context, {_MSGS} AS prompt, {_assistant("l.answer")} AS completion,
                   l.score > 0 AS label, abs(l.score) AS weight, l.votes, l.turns, l.versions, l.voters, {split}
            FROM pref_stage_labels l JOIN pref_stage_prompts p USING (context)
            WHERE l.score <> 0 AND NOT EXISTS (
                SELECT 1 FROM pref_stage_pairs n WHERE n.context = l.context AND l.answer IN (n.x, n.y))
            ORDER BY l.persona, l.context, l.answer""",
        "sft": f"""
            SELECT persona, context, list_concat({_MSGS}, {_assistant("answer")}) AS messages, {split}
            FROM (SELECT persona, context, answer FROM pref_stage_labels WHERE score > 0
                  UNION
                  SELECT persona, context, CASE WHEN x_wins THEN x ELSE y END FROM pref_stage_pairs) l
            JOIN pref_stage_prompts p USING (context)
            ORDER BY persona, context, answer""",
    }


def outliers(db, persona: str | None = None, rules: PairRules = PairRules(), staged: bool = False) -> dict:
    """``{persona: [agreement.Disagreement]}``: the voters whose votes weigh 0 under ``rules``
    (none when ``drop_outliers`` is off); ``staged``: read the build's first stages."""
    if not rules.drop_outliers:
        return {}
    source = units.Source("pref_stage_turns", "pref_stage_votes", "pref_stage_comparisons") if staged else None
    return units.outliers(db, persona, rules.include_own_system_prompt, rules.outlier_min_shared, source)


def built_outliers(db, persona: str) -> list[str]:
    """The voters the last ``build`` on ``db`` gave no weight for ``persona`` (without a second
    outlier pass over the votes)."""
    return [r[0] for r in db.query("SELECT voter FROM pref_outliers WHERE persona = ? ORDER BY voter", [persona])]


def build(db, persona: str | None = None, rules: PairRules = PairRules(),
          kinds: tuple[str, ...] = KINDS) -> dict[str, int]:
    """Materialise the preference data as temporary tables ``pref_dpo``, ``pref_kto`` and
    ``pref_sft`` (or only ``kinds`` of them) on ``db``, and the voters it gave no weight as
    ``pref_outliers`` (``built_outliers``); returns the row count of each kind."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {unknown[0]!r}")
    parts = {"turns": units.turns_cte(persona, rules.include_own_system_prompt), "cap": float(rules.voter_cap),
             "flagged": _FLAGGED, "unsafe": UNSAFE}
    flagged: list[list[str]] = []
    for name, sql in _STAGES:
        sql = sql.format(**parts)
        params = ({"persona": persona} if persona and "$persona" in sql else {}) | (
            {"flagged": flagged} if "$flagged" in sql else {})
        db.execute(f"CREATE OR REPLACE TEMP TABLE pref_stage_{name} AS {sql}", params)
        if name == "comparisons":  # the outlier rule reads the same turns and votes
            flagged = [[p, d.voter] for p, found in outliers(db, persona, rules, staged=True).items() for d in found]
    db.execute(f"CREATE OR REPLACE TEMP TABLE pref_outliers AS {_FLAGGED}", {"flagged": flagged})
    counts = {}
    outputs = _outputs(rules)
    for kind in kinds:
        db.execute(f"CREATE OR REPLACE TEMP TABLE pref_{kind} AS {outputs[kind]}")
        counts[kind] = db.query(f"SELECT count(*) FROM pref_{kind}")[0][0]
    for name, _ in _STAGES:
        db.execute(f"DROP TABLE IF EXISTS pref_stage_{name}")
    return counts


def comparison_count(db, persona: str) -> int:
    """Side-by-side verdicts (current ones) on the persona's turns."""
    return db.query("SELECT count(*) FROM current_comparisons c JOIN turns t ON t.id = c.turn_a "
                    "WHERE t.persona = ?", [persona])[0][0]
