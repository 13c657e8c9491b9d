"""What a persona has gathered since its last run: a cheap count for the retrain scheduler.

The exact count of DPO pairs is the pair builder's (``feedback.pairs.build``): voter
caps, outliers and conflicting votes over every vote there is, in several staged
passes. The scheduler asks every minute, on the live store, where a vote batch
that waits for the store's lock waits for the count too; so it counts with one
aggregate query over the votes recorded since the persona's last run that trained
(``feedback.runs.last_trained_start``), the ones that can make a DPO pair:

* each decisive side-by-side verdict (``a`` or ``b``) counts one pair;
* in each prompt context, the new thumbs make (answers up-voted) x (answers
  down-voted) pairs, as the pair builder pairs them.

Only a voter's latest vote counts (by the insertion sequence), on the persona's
served turns, without those spoken with the caller's own system prompt unless the
rules include them. It is an estimate that only triggers a run: the run builds the
exact pairs from its snapshot, and records itself as skipped when they are too few
(the recipe's ``min_pairs`` and ``min_voters``).

    new_pairs, voters = new_evidence(store, "teto", since="2026-01-02 10:00:00")
"""

from __future__ import annotations

_SQL = """
WITH v AS (
    SELECT * FROM (
        SELECT turn_id, choice_index, coalesce(voter, client) AS voter, vote,
               row_number() OVER (PARTITION BY turn_id, choice_index, client ORDER BY seq DESC) AS rn
        FROM votes WHERE created_at >= $since)
    WHERE rn = 1 AND vote IN ('up', 'down')
),
thumbs AS (
    SELECT md5(CAST(t.messages AS VARCHAR)) AS context, json_extract_string(t.answers, v.choice_index) AS answer,
           v.vote, v.voter
    FROM v JOIN turns t ON t.id = v.turn_id
    WHERE t.persona = $persona AND t.status = 'ok' {own_filter}
),
contexts AS (
    SELECT count(DISTINCT answer) FILTER (WHERE vote = 'up') * count(DISTINCT answer) FILTER (WHERE vote = 'down')
               AS pairs, list(DISTINCT voter) AS voters
    FROM thumbs WHERE answer <> '' GROUP BY context
),
verdicts AS (
    SELECT c.voter FROM (
        SELECT turn_a, choice, coalesce(voter, client) AS voter,
               row_number() OVER (PARTITION BY least(turn_a, turn_b), greatest(turn_a, turn_b), coalesce(voter, client)
                                  ORDER BY seq DESC) AS rn
        FROM comparisons WHERE created_at >= $since) c
    JOIN turns t ON t.id = c.turn_a
    WHERE c.rn = 1 AND c.choice IN ('a', 'b') AND t.persona = $persona AND t.status = 'ok' {own_filter}
)
SELECT (SELECT coalesce(sum(pairs), 0) FROM contexts) + (SELECT count(*) FROM verdicts),
       (SELECT count(DISTINCT voter) FROM (SELECT unnest(voters) AS voter FROM contexts WHERE pairs > 0
                                          UNION ALL SELECT voter FROM verdicts))
"""

EPOCH = "1970-01-01 00:00:00"


def new_evidence(db, persona: str, since: str | None, include_own_system_prompt: bool = False) -> tuple[int, int]:
    """(DPO pairs the votes since ``since`` can make, their distinct voters): see the module
    docstring. ``since``: UTC text (``feedback.runs.now``), or None for every vote."""
    own_filter = "" if include_own_system_prompt else "AND NOT coalesce(t.own_system_prompt, false)"
    pairs, voters = db.query(_SQL.format(own_filter=own_filter), {"persona": persona, "since": since or EPOCH})[0]
    return int(pairs), int(voters)
