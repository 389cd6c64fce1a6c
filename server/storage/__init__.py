"""The database: the asyncpg pool, the numbered migrations, and the embedded PostgreSQL."""
