"""One base exception; every message says what was wrong and what to do next."""


class ReactorError(Exception):
    """Base of every error the reactor raises on purpose."""


class ConfigError(ReactorError):
    """A setting (environment variable) is missing or invalid."""


class RuleError(ConfigError):
    """The rules file is unreadable or a rule is invalid."""


class EventError(ReactorError):
    """A notification body is not a MinIO event."""


class DatabaseUnavailable(ReactorError):
    """PostgreSQL cannot be reached right now; the caller should retry later."""


class ObjectStoreError(ReactorError):
    """MinIO answered with an error that a retry may fix."""


class ObjectStoreUnavailable(ObjectStoreError):
    """MinIO cannot be reached at all (refused, reset, timed out, 503): an outage, not a bad move."""


class LeaseLost(ReactorError):
    """This worker's claim on a move was taken over; it must stop touching the move."""
