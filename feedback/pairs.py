"""The pair builder: votes and comparisons in, preference data out (one SQL pass).

Works on any database with the store's tables (the live store or a snapshot):

* **DPO pairs** (same prompt context, chosen vs rejected) from side-by-side
  comparisons (``a``/``b``) and from thumbs on different answers to the same
  context (an up-voted and a down-voted regeneration make a pair).
  Each pair keeps its provenance: the turn ids, adapter versions and voters
  behind it. Ties make no pair.
* **KTO examples** (one answer, desirable or not) from thumbs on answers that
  are in no pair, and ``both_bad`` comparisons (two undesirable answers).
* **SFT examples**: answers that were up-voted or won a comparison.

Rules: only the latest vote of each voter counts (``current_votes``); each
voter's weight is capped (a voter with more than ``voter_cap`` votes has
each vote scaled down so that all of them weigh ``voter_cap``); conflicting
evidence is summed and a pair or label whose net weight is zero is dropped;
identical answer texts are one answer; the train/held-out split is by
context (``md5`` of the prompt messages), so it never changes as votes come in
and a context is never on both sides.

    build(db, "teto")                 # -> {"dpo": n, "kto": n, "sft": n}, tables pref_dpo/pref_kto/pref_sft
"""

from __future__ import annotations

from dataclasses import dataclass

KINDS = ("dpo", "kto", "sft")


@dataclass(frozen=True)
class PairRules:
    voter_cap: float = 200.0   # the most weight one voter's votes carry, all together
    heldout_percent: int = 10  # share of contexts (not of pairs) kept out of training


_BASE = """
    t AS (
        SELECT id, persona, adapter_version, messages, md5(CAST(messages AS VARCHAR)) AS context, answers
        FROM turns
        WHERE status = 'ok' AND persona IS NOT NULL {persona_filter}
    ),
    voter AS (
        SELECT client, least(1.0, {cap} / count(*)) AS w
        FROM (SELECT client FROM current_votes UNION ALL SELECT client FROM comparisons)
        GROUP BY client
    ),
    thumbs AS (
        SELECT t.persona, t.context, json_extract_string(t.answers, v.choice_index) AS answer,
               CASE v.vote WHEN 'up' THEN voter.w ELSE -voter.w END AS w,
               t.id AS turn, t.adapter_version AS version, v.client
        FROM current_votes v JOIN t ON t.id = v.turn_id JOIN voter ON voter.client = v.client
    ),
    cmp AS (
        SELECT ta.persona, ta.context, json_extract_string(ta.answers, 0) AS a,
               json_extract_string(tb.answers, 0) AS b, c.choice, voter.w, ta.id AS turn_a, tb.id AS turn_b,
               ta.adapter_version AS version_a, tb.adapter_version AS version_b, c.client
        FROM comparisons c JOIN t ta ON ta.id = c.turn_a JOIN t tb ON tb.id = c.turn_b
             JOIN voter ON voter.client = c.client
        WHERE ta.context = tb.context
    ),
    labels AS (   -- net thumbs per distinct answer text of a context (both_bad counts as two downs)
        SELECT persona, context, answer, sum(w) AS score, count(*) AS votes,
               list(DISTINCT turn) AS turns, list(DISTINCT version) AS versions, list(DISTINCT client) AS voters
        FROM (SELECT * FROM thumbs
              UNION ALL SELECT persona, context, a, -w, turn_a, version_a, client FROM cmp WHERE choice = 'both_bad'
              UNION ALL SELECT persona, context, b, -w, turn_b, version_b, client FROM cmp WHERE choice = 'both_bad')
        WHERE answer <> ''
        GROUP BY persona, context, answer
    ),
    evidence AS (  -- (chosen, rejected, weight) from comparisons and from thumbs
        SELECT persona, context, CASE choice WHEN 'a' THEN a ELSE b END AS chosen,
               CASE choice WHEN 'a' THEN b ELSE a END AS rejected, w AS weight,
               [turn_a, turn_b] AS turns, [version_a, version_b] AS versions, [client] AS voters
        FROM cmp WHERE choice IN ('a', 'b') AND a <> b AND a <> '' AND b <> ''
        UNION ALL
        SELECT u.persona, u.context, u.answer, d.answer, least(u.score, -d.score),
               list_concat(u.turns, d.turns), list_concat(u.versions, d.versions), list_concat(u.voters, d.voters)
        FROM labels u JOIN labels d ON u.context = d.context AND u.score > 0 AND d.score < 0
    ),
    net AS (       -- one row per unordered answer pair; opposite evidence cancels
        SELECT persona, context, least(chosen, rejected) AS x, greatest(chosen, rejected) AS y,
               sum(CASE WHEN chosen < rejected THEN weight ELSE -weight END) AS net, count(*) AS votes,
               list_distinct(flatten(list(turns))) AS turns, list_distinct(flatten(list(versions))) AS versions,
               list_distinct(flatten(list(voters))) AS voters
        FROM evidence GROUP BY persona, context, x, y
    ),
    prompts AS (
        SELECT context, any_value(messages) AS messages FROM t GROUP BY context
    )
"""

_SPLIT = "CASE WHEN md5_number(p.context) % 100 < {heldout} THEN 'heldout' ELSE 'train' END AS split"
_MSGS = "from_json(p.messages, '[{\"role\": \"VARCHAR\", \"content\": \"VARCHAR\"}]')"


def _assistant(expr: str) -> str:
    return f"[{{'role': 'assistant', 'content': {expr}}}]"


def _queries(persona: str | None, rules: PairRules) -> dict[str, str]:
    base = "WITH" + _BASE.format(persona_filter="AND persona = $persona" if persona else "",
                                 cap=float(rules.voter_cap))
    split = _SPLIT.format(heldout=int(rules.heldout_percent))
    return {
        "dpo": base + f"""
            SELECT n.persona, n.context, {_MSGS} AS prompt,
                   {_assistant("CASE WHEN n.net > 0 THEN n.x ELSE n.y END")} AS chosen,
                   {_assistant("CASE WHEN n.net > 0 THEN n.y ELSE n.x END")} AS rejected,
                   abs(n.net) AS weight, n.votes, n.turns, n.versions, n.voters, {split}
            FROM net n JOIN prompts p USING (context) WHERE n.net <> 0
            ORDER BY n.persona, n.context, chosen[1].content, rejected[1].content""",
        "kto": base + f"""
            SELECT l.persona, l.context, {_MSGS} AS prompt, {_assistant("l.answer")} AS completion,
                   l.score > 0 AS label, abs(l.score) AS weight, l.votes, l.turns, l.versions, l.voters, {split}
            FROM labels l JOIN prompts p USING (context)
            WHERE l.score <> 0 AND NOT EXISTS (
                SELECT 1 FROM net n WHERE n.context = l.context AND n.net <> 0 AND l.answer IN (n.x, n.y))
            ORDER BY l.persona, l.context, l.answer""",
        "sft": base + f"""
            SELECT persona, context, list_concat({_MSGS}, {_assistant("answer")}) AS messages, {split}
            FROM (SELECT persona, context, answer FROM labels WHERE score > 0
                  UNION
                  SELECT persona, context, CASE WHEN net > 0 THEN x ELSE y END FROM net WHERE net <> 0) l
            JOIN prompts p USING (context)
            ORDER BY persona, context, answer""",
    }


def query(kind: str, persona: str | None = None, rules: PairRules = PairRules()) -> tuple[str, dict]:
    """SQL (and its parameters) whose rows are the ``kind`` examples in TRL's conversational format."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}, not {kind!r}")
    return _queries(persona, rules)[kind], ({"persona": persona} if persona else {})


def build(db, persona: str | None = None, rules: PairRules = PairRules(),
          kinds: tuple[str, ...] = KINDS) -> dict[str, int]:
    """Materialise the preference data as temporary tables ``pref_dpo``, ``pref_kto`` and
    ``pref_sft`` (or only ``kinds`` of them) on ``db``; returns the row count of each."""
    counts = {}
    for kind in kinds:
        sql, params = query(kind, persona, rules)
        db.execute(f"CREATE OR REPLACE TEMP TABLE pref_{kind} AS {sql}", params)
        counts[kind] = db.query(f"SELECT count(*) FROM pref_{kind}")[0][0]
    return counts
