-- The prompt store: versions (with their tensors), tombstones, aliases, evaluations, and a
-- change counter that every write bumps in the same transaction (replicas LISTEN for it).

CREATE TABLE prompt_versions (
    name            text        NOT NULL,
    version         integer     NOT NULL CHECK (version > 0),
    meta            jsonb,                  -- NULL once deleted (the row stays as a tombstone)
    adapter_config  jsonb,
    weights         bytea,                  -- adapter_model.safetensors
    tensor_sha256   text,
    created_at      timestamptz NOT NULL DEFAULT now(),
    deleted_at      timestamptz,
    PRIMARY KEY (name, version),
    CHECK ((deleted_at IS NULL) = (weights IS NOT NULL AND meta IS NOT NULL AND adapter_config IS NOT NULL))
);

CREATE TABLE prompt_aliases (
    alias    text    PRIMARY KEY,
    name     text    NOT NULL,
    version  integer NOT NULL,
    FOREIGN KEY (name, version) REFERENCES prompt_versions (name, version)
);

CREATE TABLE prompt_evaluations (
    id          bigserial   PRIMARY KEY,
    name        text        NOT NULL,
    version     integer     NOT NULL,
    record      jsonb       NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    FOREIGN KEY (name, version) REFERENCES prompt_versions (name, version)
);
CREATE INDEX prompt_evaluations_by_version ON prompt_evaluations (name, version, id);

CREATE TABLE prompt_store_state (
    singleton   boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    generation  bigint  NOT NULL
);
INSERT INTO prompt_store_state (generation) VALUES (0);
