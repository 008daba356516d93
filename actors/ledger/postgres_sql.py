"""The PostgreSQL ledger's schema and statements, for one schema (a cluster's shard).

Tables and columns mirror the SQLite ledger's; batches go in as arrays (``unnest``), so a
1,000-event claim or a group of starts is one statement.
"""

from __future__ import annotations

from dataclasses import dataclass

RUN_COLUMNS = (
    "event, state, attempts, series, worker, next_at, error, traceback, "
    "prefect_flow_run_id, created, updated, batch"
)


def schema_ddl(schema: str) -> str:
    s = f'"{schema}"'
    return f"""
CREATE SCHEMA IF NOT EXISTS {s};
CREATE TABLE IF NOT EXISTS {s}.runs (
    tenant text NOT NULL, flow text NOT NULL, event_id text NOT NULL,
    event bytea NOT NULL,
    state text NOT NULL,
    attempts integer NOT NULL DEFAULT 0,
    series integer NOT NULL DEFAULT 0,
    worker integer,
    next_at double precision,
    error text, traceback text,
    prefect_flow_run_id text,
    created double precision NOT NULL, updated double precision NOT NULL,
    batch text,
    PRIMARY KEY (tenant, flow, event_id)
);
CREATE INDEX IF NOT EXISTS runs_open ON {s}.runs (state)
    WHERE state IN ('pending', 'running', 'failed');
CREATE INDEX IF NOT EXISTS runs_pending ON {s}.runs (tenant, flow, created, event_id)
    WHERE state = 'pending';
CREATE TABLE IF NOT EXISTS {s}.counters (
    tenant text NOT NULL, flow text NOT NULL, name text NOT NULL, value bigint NOT NULL,
    PRIMARY KEY (tenant, flow, name)
);
CREATE TABLE IF NOT EXISTS {s}.flows (
    tenant text NOT NULL, flow text NOT NULL, paused boolean NOT NULL DEFAULT false,
    last_event_at double precision,
    PRIMARY KEY (tenant, flow)
);
CREATE TABLE IF NOT EXISTS {s}.rejections (
    id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant text NOT NULL, flow text NOT NULL, source text NOT NULL,
    reason text NOT NULL, detail text NOT NULL, ref text NOT NULL, at double precision NOT NULL
);
"""


@dataclass(frozen=True, slots=True)
class Statements:
    claim: str
    claimed_at: str
    bump: str
    touch_flows: str
    insert_rejection: str
    trim_rejections: str
    start: str
    finish: str
    replay_all: str
    replay_keys: str
    open_runs: str
    pending: str
    runs: str
    counters: str
    run_counts: str
    last_events: str
    rejections: str
    set_paused: str
    paused: str


KEYS = "unnest($1::text[], $2::text[], $3::text[])"
MATCH_KEY = "r.tenant = u.tenant AND r.flow = u.flow AND r.event_id = u.event_id"
REPLAYED = (
    "state = 'pending', attempts = 0, series = r.series + 1, error = NULL, traceback = NULL, "
    "next_at = NULL"
)


def statements(schema: str) -> Statements:
    s = f'"{schema}"'
    return Statements(
        claim=(
            f"INSERT INTO {s}.runs (tenant, flow, event_id, event, state, created, updated) "
            "SELECT u.tenant, u.flow, u.event_id, u.event, 'pending', $5::float8, $5::float8 FROM "
            "unnest($1::text[], $2::text[], $3::text[], $4::bytea[]) "
            "AS u(tenant, flow, event_id, event) "
            "ON CONFLICT (tenant, flow, event_id) DO NOTHING RETURNING tenant, flow, event_id"
        ),
        claimed_at=(
            f"SELECT count(*) FROM {s}.runs AS r, {KEYS} AS u(tenant, flow, event_id) "
            f"WHERE {MATCH_KEY} AND r.created = $4::float8"
        ),
        bump=(
            f"INSERT INTO {s}.counters (tenant, flow, name, value) "
            "SELECT * FROM unnest($1::text[], $2::text[], $3::text[], $4::bigint[]) "
            "ON CONFLICT (tenant, flow, name) DO UPDATE "
            "SET value = counters.value + excluded.value"
        ),
        touch_flows=(
            f"INSERT INTO {s}.flows (tenant, flow, last_event_at) "
            "SELECT t, f, $3::float8 FROM unnest($1::text[], $2::text[]) AS u(t, f) "
            "ON CONFLICT (tenant, flow) DO UPDATE SET last_event_at = excluded.last_event_at"
        ),
        insert_rejection=(
            f"INSERT INTO {s}.rejections (tenant, flow, source, reason, detail, ref, at) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7)"
        ),
        trim_rejections=(
            f"DELETE FROM {s}.rejections WHERE id <= (SELECT max(id) FROM {s}.rejections) - $1"
        ),
        start=(
            f"UPDATE {s}.runs AS r SET state = 'running', attempts = r.attempts + 1, "
            "worker = u.worker, batch = $5, next_at = NULL, updated = $6 "
            "FROM unnest($1::text[], $2::text[], $3::text[], $4::integer[]) "
            f"AS u(tenant, flow, event_id, worker) WHERE {MATCH_KEY} "
            "AND r.state IN ('pending', 'failed') "
            "RETURNING r.tenant, r.flow, r.event_id, r.attempts, r.series"
        ),
        finish=(
            f"UPDATE {s}.runs AS r SET state = u.state, error = u.error, "
            "traceback = u.traceback, next_at = u.next_at, "
            "prefect_flow_run_id = COALESCE(u.frid, r.prefect_flow_run_id), updated = $10 "
            "FROM unnest($1::text[], $2::text[], $3::text[], $4::integer[], $5::text[], "
            "$6::text[], $7::text[], $8::double precision[], $9::text[]) "
            "AS u(tenant, flow, event_id, attempt, state, error, traceback, next_at, frid) "
            f"WHERE {MATCH_KEY} AND r.state = 'running' AND r.attempts = u.attempt "
            "RETURNING r.tenant, r.flow, r.event_id, u.attempt"
        ),
        replay_all=(
            f"UPDATE {s}.runs AS r SET {REPLAYED}, updated = $1 WHERE r.state = 'dead' "
            "RETURNING r.event"
        ),
        replay_keys=(
            f"UPDATE {s}.runs AS r SET {REPLAYED}, updated = $4 "
            f"FROM {KEYS} AS u(tenant, flow, event_id) "
            f"WHERE {MATCH_KEY} AND r.state = 'dead' "
            "RETURNING r.tenant, r.flow, r.event_id, r.event"
        ),
        open_runs=(
            f"SELECT {RUN_COLUMNS} FROM {s}.runs WHERE state = ANY($1::text[]) "
            "ORDER BY created, tenant, flow, event_id"
        ),
        pending=(
            f"SELECT event FROM {s}.runs WHERE tenant = $1 AND flow = $2 "
            "AND state = 'pending' ORDER BY created, event_id LIMIT $3"
        ),
        runs=(
            f"SELECT {RUN_COLUMNS} FROM {s}.runs WHERE ($1::text IS NULL OR tenant = $1) "
            "AND ($2::text IS NULL OR flow = $2) AND ($3::text IS NULL OR state = $3) "
            "ORDER BY created DESC, event_id LIMIT $4"
        ),
        counters=f"SELECT tenant, flow, name, value FROM {s}.counters",
        run_counts=(
            f"SELECT tenant, flow, state, count(*) FROM {s}.runs GROUP BY tenant, flow, state"
        ),
        last_events=f"SELECT tenant, flow, last_event_at FROM {s}.flows",
        rejections=(
            "SELECT tenant, flow, source, reason, detail, ref, at "
            f"FROM {s}.rejections ORDER BY id DESC LIMIT $1"
        ),
        set_paused=(
            f"INSERT INTO {s}.flows (tenant, flow, paused) VALUES ($1, $2, $3) "
            "ON CONFLICT (tenant, flow) DO UPDATE SET paused = excluded.paused"
        ),
        paused=f"SELECT tenant, flow FROM {s}.flows WHERE paused",
    )
