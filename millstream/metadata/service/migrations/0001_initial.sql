-- The metadata schema: flows (the run-number counter), runs, tasks, attempts,
-- artifacts and free-form task metadata. Identifiers are COLLATE "C" so that the
-- database sorts them the way Python's sorted() does.

CREATE TABLE flows (
    name            text COLLATE "C" PRIMARY KEY,
    last_run_number bigint NOT NULL CHECK (last_run_number > 0)
);

CREATE TABLE runs (
    flow          text COLLATE "C" NOT NULL REFERENCES flows (name),
    run_number    bigint NOT NULL,
    user_name     text NOT NULL,
    status        text NOT NULL CHECK (status IN ('running', 'ok', 'failed', 'cancelled')),
    created_at    double precision NOT NULL,
    finished_at   double precision,
    heartbeat_at  double precision,
    message       text,
    tags          text[] COLLATE "C" NOT NULL DEFAULT '{}',
    system_tags   text[] COLLATE "C" NOT NULL DEFAULT '{}',
    params        jsonb NOT NULL DEFAULT '{}',
    daemon_id     text,
    origin_run_id text,
    request_id    text,
    PRIMARY KEY (flow, run_number),
    CONSTRAINT runs_request_id_key UNIQUE (request_id)
);

-- Keyset pagination, newest first, across flows and within one.
CREATE INDEX runs_by_created ON runs (created_at, run_number, flow);
CREATE INDEX runs_by_flow_created ON runs (flow, created_at, run_number);
-- "has all of these tags" is (tags || system_tags) @> $n.
CREATE INDEX runs_by_any_tag ON runs USING gin ((tags || system_tags));
-- Dead-run reads and status filters touch the running runs only.
CREATE INDEX runs_running ON runs (coalesce(heartbeat_at, created_at)) WHERE status = 'running';

CREATE TABLE tasks (
    flow          text COLLATE "C" NOT NULL,
    run_number    bigint NOT NULL,
    step          text COLLATE "C" NOT NULL,
    task_id       text COLLATE "C" NOT NULL,
    status        text NOT NULL DEFAULT 'pending'
                  CHECK (status IN ('pending', 'running', 'ok', 'failed', 'cancelled')),
    foreach_index integer[] NOT NULL DEFAULT '{}',
    parents       text[] NOT NULL DEFAULT '{}',
    origin        text,
    created_at    double precision NOT NULL,
    PRIMARY KEY (flow, run_number, step, task_id),
    FOREIGN KEY (flow, run_number) REFERENCES runs (flow, run_number) ON DELETE CASCADE
);

CREATE TABLE attempts (
    flow        text COLLATE "C" NOT NULL,
    run_number  bigint NOT NULL,
    step        text COLLATE "C" NOT NULL,
    task_id     text COLLATE "C" NOT NULL,
    attempt     integer NOT NULL CHECK (attempt >= 0),
    status      text NOT NULL CHECK (status IN ('pending', 'running', 'ok', 'failed', 'cancelled')),
    started_at  double precision,
    finished_at double precision,
    exit_code   integer,
    message     text,
    handle      jsonb,
    PRIMARY KEY (flow, run_number, step, task_id, attempt),
    FOREIGN KEY (flow, run_number, step, task_id)
        REFERENCES tasks (flow, run_number, step, task_id) ON DELETE CASCADE
);

CREATE TABLE artifacts (
    flow       text COLLATE "C" NOT NULL,
    run_number bigint NOT NULL,
    step       text COLLATE "C" NOT NULL,
    task_id    text COLLATE "C" NOT NULL,
    attempt    integer NOT NULL CHECK (attempt >= 0),
    name       text COLLATE "C" NOT NULL,
    sha        text NOT NULL,
    size       bigint NOT NULL CHECK (size >= 0),
    type_name  text NOT NULL,
    PRIMARY KEY (flow, run_number, step, task_id, attempt, name),
    FOREIGN KEY (flow, run_number, step, task_id)
        REFERENCES tasks (flow, run_number, step, task_id) ON DELETE CASCADE
);

CREATE TABLE task_metadata (
    flow       text COLLATE "C" NOT NULL,
    run_number bigint NOT NULL,
    step       text COLLATE "C" NOT NULL,
    task_id    text COLLATE "C" NOT NULL,
    field      text COLLATE "C" NOT NULL,
    value      text NOT NULL,
    PRIMARY KEY (flow, run_number, step, task_id, field),
    FOREIGN KEY (flow, run_number, step, task_id)
        REFERENCES tasks (flow, run_number, step, task_id) ON DELETE CASCADE
);
