"""The pieces of ``bench.ingest`` (the command and its rounds live there): publishing the
snapshot, timing ``segments consume`` until PostgreSQL shows it, the ceilings, and the
summary."""
