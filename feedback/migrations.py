"""Schema of the feedback store: ordered, append-only migrations.

Each entry is applied once, in order, inside a transaction, and recorded in
``schema_migrations``. Never edit or reorder an entry that has shipped: add a
new one at the end.
"""

from __future__ import annotations

MIGRATIONS: list[tuple[str, str]] = [
    ("0001_turns", """
        CREATE TABLE turns (
            id                VARCHAR PRIMARY KEY,      -- the OpenAI response id (chatcmpl-...)
            created_at        TIMESTAMP NOT NULL,
            persona           VARCHAR,                  -- NULL when the base model was asked directly
            adapter           VARCHAR,                  -- engine model name, e.g. teto-v3
            adapter_version   INTEGER,
            requested_model   VARCHAR NOT NULL,         -- what the caller sent: teto, teto@v3, ...
            messages          JSON NOT NULL,            -- the prompt as sent to the engine
            answers           JSON NOT NULL,            -- one string per choice (n)
            finish_reasons    JSON NOT NULL,
            sampling          JSON NOT NULL,            -- temperature, top_p, max_tokens, stop, seed, n
            stream            BOOLEAN NOT NULL,
            prompt_tokens     INTEGER,
            completion_tokens INTEGER,
            ttft_ms           DOUBLE,
            latency_ms        DOUBLE NOT NULL,
            client            VARCHAR NOT NULL,         -- key fingerprint or loopback address
            user_tag          VARCHAR,                  -- OpenAI's optional `user` field
            engine            VARCHAR,                  -- which engine replica answered
            status            VARCHAR NOT NULL          -- ok | aborted | error
        )
    """),
    ("0002_turns_by_persona", "CREATE INDEX turns_persona_created ON turns (persona, created_at)"),
    ("0003_votes", """
        -- Append-only: a changed vote or a retraction is a new row; the latest row per
        -- (turn, answer, client) is the vote that counts (view current_votes).
        CREATE TABLE votes (
            turn_id       VARCHAR NOT NULL,
            choice_index  INTEGER NOT NULL,           -- which of the turn's n answers
            client        VARCHAR NOT NULL,           -- who voted: key fingerprint or UI session
            vote          VARCHAR NOT NULL CHECK (vote IN ('up', 'down', 'retract')),
            reason        VARCHAR,
            comment       VARCHAR,
            user_name     VARCHAR,
            created_at    TIMESTAMP NOT NULL
        );
        CREATE VIEW current_votes AS
            SELECT * EXCLUDE (rn) FROM (
                SELECT *, row_number() OVER (PARTITION BY turn_id, choice_index, client
                                             ORDER BY created_at DESC) AS rn
                FROM votes)
            WHERE rn = 1 AND vote <> 'retract';
    """),
    ("0004_comparisons", """
        CREATE TABLE comparisons (
            id          VARCHAR PRIMARY KEY,
            turn_a      VARCHAR NOT NULL,
            turn_b      VARCHAR NOT NULL,
            choice      VARCHAR NOT NULL CHECK (choice IN ('a', 'b', 'tie', 'both_bad')),
            left_turn   VARCHAR NOT NULL,             -- the turn shown on the left (position bias)
            client      VARCHAR NOT NULL,
            user_name   VARCHAR,
            created_at  TIMESTAMP NOT NULL
        )
    """),
    ("0005_adapters", """
        -- The gateway's view of the adapter registry (the folders on disk are the truth;
        -- this mirrors them at start-up and at every reload, for the dashboard and stats).
        CREATE TABLE adapters (
            name            VARCHAR PRIMARY KEY,      -- engine name, e.g. teto-v3 (never reused)
            persona         VARCHAR NOT NULL,
            version         INTEGER NOT NULL,
            path            VARCHAR NOT NULL,
            kind            VARCHAR,                  -- sft | dpo | kto
            parent_version  INTEGER,
            status          VARCHAR NOT NULL CHECK (status IN ('active', 'candidate', 'available', 'retired')),
            metrics         JSON,
            created_at      TIMESTAMP,
            updated_at      TIMESTAMP NOT NULL
        )
    """),
    ("0006_training_runs", """
        CREATE TABLE training_runs (
            id               VARCHAR PRIMARY KEY,
            persona          VARCHAR NOT NULL,
            kind             VARCHAR NOT NULL,        -- sft | dpo | kto
            status           VARCHAR NOT NULL,        -- running | succeeded | failed | rejected | promoted
            parent_version   INTEGER,                 -- the adapter it started from
            adapter_version  INTEGER,                 -- the version it produced, if any
            started_at       TIMESTAMP NOT NULL,
            finished_at      TIMESTAMP,
            train_examples   INTEGER,
            heldout_examples INTEGER,
            reward_accuracy  DOUBLE,                  -- held-out implicit reward accuracy (DPO/KTO)
            reward_margin    DOUBLE,
            metrics          JSON,
            message          VARCHAR                  -- why it was rejected or failed
        )
    """),
    ("0007_voters", """
        -- Who voted, apart from whom a turn was served to (client: the owner a vote is checked
        -- against). A voter is an API key's fingerprint, a UI login (user:NAME), or, without
        -- logins, every browser session together as the one voter 'ui'. Older rows: the client.
        ALTER TABLE turns ADD COLUMN voter VARCHAR;
        UPDATE turns SET voter = client;
        -- True when the caller sent its own system prompt instead of the persona's: such turns
        -- are not the persona speaking, and stay out of its preference data by default.
        ALTER TABLE turns ADD COLUMN own_system_prompt BOOLEAN DEFAULT false;
        UPDATE turns SET own_system_prompt = false;
        ALTER TABLE votes ADD COLUMN voter VARCHAR;
        UPDATE votes SET voter = client;
        ALTER TABLE comparisons ADD COLUMN voter VARCHAR;
        UPDATE comparisons SET voter = client;
        -- A voter's latest verdict on two turns is the one that counts (like current_votes).
        CREATE VIEW current_comparisons AS
            SELECT * EXCLUDE (rn) FROM (
                SELECT *, row_number() OVER (PARTITION BY least(turn_a, turn_b), greatest(turn_a, turn_b), voter
                                             ORDER BY created_at DESC) AS rn
                FROM comparisons)
            WHERE rn = 1;
    """),
    ("0008_experiments", """
        -- A/B promotion (promotion: ab): a gate-passing candidate runs as a challenger against the
        -- active version until the users' pairwise verdicts promote or retire it.
        CREATE TABLE experiments (
            id          VARCHAR PRIMARY KEY,
            persona     VARCHAR NOT NULL,
            challenger  INTEGER NOT NULL,             -- the version under test
            active      INTEGER NOT NULL,             -- the version it is tested against
            run_id      VARCHAR,                      -- the training run that made the challenger, if any
            status      VARCHAR NOT NULL CHECK (status IN ('running', 'promoted', 'retired', 'stopped')),
            share       DOUBLE NOT NULL,              -- share of API clients the challenger serves
            min_votes   INTEGER NOT NULL,             -- verdicts needed before it may be promoted
            alpha       DOUBLE NOT NULL,              -- 1 - confidence of the interval
            max_hours   DOUBLE NOT NULL,              -- time limit: retired when it passes undecided
            started_at  TIMESTAMP NOT NULL,
            decided_at  TIMESTAMP,
            figures     JSON,                         -- the latest analysis, thumbs per arm included
            reason      VARCHAR                       -- why it was promoted, retired or stopped
        )
    """),
    ("0009_vote_sequence", """
        -- The latest vote of a voter is the one inserted last, by an insertion sequence: the
        -- wall clock can step back (NTP, a restored VM) and two votes can share a timestamp.
        -- Rows already there are numbered in the order they were inserted (their row order).
        CREATE SEQUENCE votes_seq START 1;
        ALTER TABLE votes ADD COLUMN seq BIGINT DEFAULT nextval('votes_seq');
        CREATE SEQUENCE comparisons_seq START 1;
        ALTER TABLE comparisons ADD COLUMN seq BIGINT DEFAULT nextval('comparisons_seq');
        CREATE OR REPLACE VIEW current_votes AS
            SELECT * EXCLUDE (rn) FROM (
                SELECT *, row_number() OVER (PARTITION BY turn_id, choice_index, client ORDER BY seq DESC) AS rn
                FROM votes)
            WHERE rn = 1 AND vote <> 'retract';
        CREATE OR REPLACE VIEW current_comparisons AS
            SELECT * EXCLUDE (rn) FROM (
                SELECT *, row_number() OVER (PARTITION BY least(turn_a, turn_b), greatest(turn_a, turn_b), voter
                                             ORDER BY seq DESC) AS rn
                FROM comparisons)
            WHERE rn = 1;
    """),
    ("0010_store_heartbeat", """
        -- One row the gateway rewrites now and then: a write that tells whether the store can
        -- write at all (its /health), even when no vote or turn comes.
        CREATE TABLE store_heartbeat (id INTEGER PRIMARY KEY, written_at TIMESTAMP NOT NULL);
        INSERT INTO store_heartbeat VALUES (1, now());
    """),
]
