-- Training and evaluation jobs, for servers and workers that share this database
-- (server/jobs/database_jobs.py). A job's upload lives in its row, so a worker on another
-- machine needs nothing but the URL. `record` is the job as the API shows it (progress,
-- curve, metrics); the columns beside it are what claiming and leasing read.

CREATE TABLE softprompt_jobs (
    id               text        PRIMARY KEY,            -- sortable by creation time
    kind             text        NOT NULL CHECK (kind IN ('train', 'eval')),
    state            text        NOT NULL CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    record           jsonb       NOT NULL,
    request          jsonb       NOT NULL,               -- what the worker runs, besides the data
    train_data       bytea,
    eval_data        bytea,
    result           jsonb,                              -- an evaluation's whole table
    idempotency_key  text        UNIQUE,
    processes        integer     NOT NULL DEFAULT 1 CHECK (processes >= 1),
    attempts         integer     NOT NULL DEFAULT 0,
    max_attempts     integer     NOT NULL DEFAULT 1 CHECK (max_attempts >= 1),
    worker           text,                               -- the lease holder while running
    lease_expires_at timestamptz,
    cancel_requested boolean     NOT NULL DEFAULT false,
    revision         bigint      NOT NULL DEFAULT 0,     -- bumped by every change (event streams)
    created_at       timestamptz NOT NULL DEFAULT now(),
    CHECK ((state = 'running') = (worker IS NOT NULL AND lease_expires_at IS NOT NULL))
);
CREATE INDEX softprompt_jobs_queued ON softprompt_jobs (id) WHERE state = 'queued';
CREATE INDEX softprompt_jobs_leases ON softprompt_jobs (lease_expires_at) WHERE state = 'running';
