"""reactor: MinIO uploads become ordered, verified, audited moves through a PostgreSQL outbox."""

__version__ = "0.1.0"
