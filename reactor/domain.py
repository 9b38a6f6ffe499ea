"""Domain records shared by the pure core and the adapters; no driver imports here."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, NewType

MoveId = NewType("MoveId", int)

Via = Literal["webhook", "listen", "sweep"]


class MoveStatus(StrEnum):
    """The lifecycle of a move; the same names exist once in SQL (enum reactor.move_status)."""

    PENDING = "pending"  # waiting, or waiting to retry
    RUNNING = "running"  # claimed by one worker under a lease
    DONE = "done"  # target verified and source removed (or a documented no-op, see note)
    SUPERSEDED = "superseded"  # the source no longer holds the named version; nothing written
    FAILED = "failed"  # gave up; error recorded


TERMINAL_STATUSES = frozenset({MoveStatus.DONE, MoveStatus.SUPERSEDED, MoveStatus.FAILED})


class OnConflict(StrEnum):
    """What a move does when its target already holds different bytes."""

    OVERWRITE = "overwrite"
    SKIP = "skip"
    FAIL = "fail"


@dataclass(frozen=True, kw_only=True)
class Upload:
    """One upload that a notification named: a specific version of one object."""

    bucket: str
    key: str
    etag: str  # without quotes; multipart uploads end in -N
    size: int
    version_id: str = ""  # "" for unversioned buckets
    sequencer: str = ""  # upper-case hex nanoseconds, zero-padded to 16; "" if unknown
    event_name: str = ""
    event_time: str = ""
    user_agent: str = ""
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    @property
    def is_multipart(self) -> bool:
        return "-" in self.etag

    @property
    def modified_ms(self) -> int:
        """The upload's modification time in milliseconds: the sequencer (nanoseconds) truncated.

        Listings report LastModified to the millisecond, truncated from the same clock, so an
        upload found by listing and the same upload named by an event agree on this value.
        """
        return int(self.sequencer, 16) // 1_000_000 if self.sequencer else 0


@dataclass(frozen=True, kw_only=True)
class Ignored:
    """A well-formed record that the reactor chooses not to act on, with the reason."""

    bucket: str
    key: str
    event_name: str
    reason: str


Notice = Upload | Ignored
