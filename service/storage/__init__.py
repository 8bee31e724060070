"""PostgreSQL: which server (DATABASE_URL or the embedded one), the pool, and schema.sql."""
