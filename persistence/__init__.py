"""PostgreSQL, the source of truth: schema, migrations helpers and the store."""
