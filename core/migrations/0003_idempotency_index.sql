-- An Idempotency-Key answers one upload across the whole store (not per name): publishing
-- with a key looks it up among every live version, so that look-up gets an index.
CREATE INDEX prompt_versions_by_idempotency_key ON prompt_versions ((meta->>'idempotency_key'))
    WHERE meta ? 'idempotency_key';
