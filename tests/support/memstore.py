"""An in-memory twin of the ObjectStore port, for unit tests of the mover's decision table."""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field

from reactor.errors import ObjectStoreError
from reactor.objectstore import ObjectInfo


@dataclass
class _Version:
    data: bytes
    etag: str
    version_id: str


@dataclass
class MemoryStore:
    """S3 semantics the mover relies on: if-match copies, versioned deletes, ETag = MD5 (or -N)."""

    versioned_buckets: set[str] = field(default_factory=set)
    objects: dict[tuple[str, str], list[_Version]] = field(default_factory=dict)
    calls: list[str] = field(default_factory=list)
    fail: dict[str, Exception] = field(default_factory=dict)
    _ids: itertools.count[int] = field(default_factory=lambda: itertools.count(1))

    def put(self, bucket: str, key: str, data: bytes, *, parts: int = 1) -> ObjectInfo:
        md5 = hashlib.md5(data).hexdigest()  # noqa: S324 - S3 ETags are MD5s
        etag = md5 if parts == 1 else f"{hashlib.md5(md5.encode()).hexdigest()}-{parts}"  # noqa: S324
        version_id = f"v{next(self._ids)}" if bucket in self.versioned_buckets else ""
        versions = self.objects.setdefault((bucket, key), [])
        if not version_id:
            versions.clear()
        versions.append(_Version(data, etag, version_id))
        return ObjectInfo(etag=etag, size=len(data), version_id=version_id)

    def data(self, bucket: str, key: str) -> bytes | None:
        versions = self.objects.get((bucket, key))
        return versions[-1].data if versions else None

    def _find(self, bucket: str, key: str, version_id: str) -> _Version | None:
        versions = self.objects.get((bucket, key), [])
        if version_id:
            return next((v for v in versions if v.version_id == version_id), None)
        return versions[-1] if versions else None

    def _call(self, name: str) -> None:
        self.calls.append(name)
        if name in self.fail:
            raise self.fail.pop(name)

    def stat(self, bucket: str, key: str, version_id: str = "") -> ObjectInfo | None:
        self._call("stat")
        v = self._find(bucket, key, version_id)
        return None if v is None else ObjectInfo(etag=v.etag, size=len(v.data), version_id=v.version_id)

    def copy(
        self,
        *,
        bucket: str,
        key: str,
        version_id: str,
        if_match: str,
        target_bucket: str,
        target_key: str,
        size: int = -1,  # noqa: ARG002 - a hint for real servers; the twin copies any size alike
    ) -> str | None:
        self._call("copy")
        v = self._find(bucket, key, version_id)
        if v is None or v.etag != if_match:
            return None
        return self.put(target_bucket, target_key, v.data).etag

    def remove(self, bucket: str, key: str, version_id: str = "") -> None:
        self._call("remove")
        versions = self.objects.get((bucket, key), [])
        if version_id:
            versions[:] = [v for v in versions if v.version_id != version_id]
        else:
            versions.clear()
        if not versions:
            self.objects.pop((bucket, key), None)

    def digest(
        self, bucket: str, key: str, *, version_id: str = "", if_match: str = "", algorithm: str
    ) -> str | None:
        self._call("digest")
        v = self._find(bucket, key, version_id)
        if v is None or (if_match and v.etag != if_match):
            return None
        return hashlib.new(algorithm, v.data).hexdigest()


def failing(step: str) -> dict[str, Exception]:
    return {step: ObjectStoreError(f"injected failure in {step}")}
