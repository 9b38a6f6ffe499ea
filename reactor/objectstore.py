"""The object store port the mover needs, and its MinIO adapter (minio-py)."""

from __future__ import annotations

import hashlib
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import Protocol

import urllib3
from minio import Minio
from minio.commonconfig import CopySource
from minio.error import MinioException, S3Error
from urllib3.connection import HTTPConnection
from urllib3.util import Retry

from reactor import __version__
from reactor.errors import ObjectStoreError

# Part of the User-Agent of every request the reactor makes; notifications of the reactor's own
# writes carry it in source.userAgent, which is how ingestion ignores them.
APP_NAME = "reactor-mover"

_MISSING = frozenset({"NoSuchKey", "NoSuchVersion", "NoSuchObject", "ResourceNotFound"})
_REFUSED = _MISSING | {"PreconditionFailed"}


@dataclass(frozen=True, kw_only=True)
class Listed:
    """One object as a bucket listing shows it."""

    key: str
    etag: str
    size: int
    version_id: str
    last_modified: datetime | None


@dataclass(frozen=True, kw_only=True)
class ObjectInfo:
    etag: str
    size: int
    version_id: str = ""


class ObjectStore(Protocol):
    """What a move needs from S3; each call is bounded by the adapter's timeouts."""

    def stat(self, bucket: str, key: str, version_id: str = "") -> ObjectInfo | None:
        """The object's current state, or None when it (or that version) does not exist."""

    def copy(
        self, *, bucket: str, key: str, version_id: str, if_match: str, target_bucket: str, target_key: str
    ) -> str | None:
        """Server-side copy if the source is still that version; the new ETag, or None if refused."""

    def remove(self, bucket: str, key: str, version_id: str = "") -> None:
        """Delete the object (exactly that version when given); deleting nothing is not an error."""

    def digest(
        self, bucket: str, key: str, *, version_id: str = "", if_match: str = "", algorithm: str
    ) -> str | None:
        """Hash the object's bytes while streaming them; None when missing or no longer that version."""


def _code(exc: S3Error) -> str:
    return exc.code or ""


class MinioStore:
    """ObjectStore over minio-py with a connection pool sized to the concurrency and bounded retries."""

    def __init__(
        self,
        *,
        endpoint: str,
        access_key: str,
        secret_key: str,
        secure: bool = False,
        region: str | None = None,
        pool_size: int = 10,
        timeout: float | None = 60.0,
        ca_file: str | None = None,
    ) -> None:
        # minio-py's default pool retries 5xx five times with a 300 s timeout; a move has its own
        # retry with backoff, so the HTTP layer retries little and fails fast.
        # timeout=None (long-lived listen streams, which MinIO keeps silent between events) relies
        # on TCP keep-alive instead to notice a dead peer.
        keepalive = [
            (socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1),
            (socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, 30),
            (socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, 10),
            (socket.IPPROTO_TCP, socket.TCP_KEEPCNT, 3),
        ]
        http = urllib3.PoolManager(
            maxsize=pool_size,
            block=False,
            socket_options=[*HTTPConnection.default_socket_options, *keepalive],
            timeout=urllib3.Timeout(connect=5.0, read=timeout),
            retries=Retry(total=2, connect=2, read=0, backoff_factor=0.2, status_forcelist=(502, 503, 504)),
            cert_reqs=ssl.CERT_REQUIRED if secure else ssl.CERT_NONE,
            ca_certs=ca_file,
        )
        self.client = Minio(
            endpoint,
            access_key=access_key,
            secret_key=secret_key,
            secure=secure,
            region=region,
            http_client=http,
        )
        self.client.set_app_info(APP_NAME, __version__)
        self.endpoint = endpoint

    def _error(self, what: str, exc: Exception) -> ObjectStoreError:
        return ObjectStoreError(f"MinIO at {self.endpoint} failed to {what}: {exc}")

    def stat(self, bucket: str, key: str, version_id: str = "") -> ObjectInfo | None:
        try:
            st = self.client.stat_object(bucket, key, version_id=version_id or None)
        except S3Error as exc:
            if _code(exc) in _MISSING:
                return None
            raise self._error(f"stat {bucket}/{key}", exc) from exc
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._error(f"stat {bucket}/{key}", exc) from exc
        return ObjectInfo(
            etag=(st.etag or "").strip('"'), size=int(st.size or 0), version_id=st.version_id or ""
        )

    def copy(
        self, *, bucket: str, key: str, version_id: str, if_match: str, target_bucket: str, target_key: str
    ) -> str | None:
        source = CopySource(bucket, key, version_id=version_id or None, match_etag=if_match)
        try:
            result = self.client.copy_object(target_bucket, target_key, source)
        except S3Error as exc:
            if _code(exc) in _REFUSED:
                return None
            raise self._error(f"copy {bucket}/{key} to {target_bucket}/{target_key}", exc) from exc
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._error(f"copy {bucket}/{key} to {target_bucket}/{target_key}", exc) from exc
        return (result.etag or "").strip('"')

    def remove(self, bucket: str, key: str, version_id: str = "") -> None:
        try:
            self.client.remove_object(bucket, key, version_id=version_id or None)
        except S3Error as exc:
            if _code(exc) in _MISSING:
                return
            raise self._error(f"remove {bucket}/{key}", exc) from exc
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._error(f"remove {bucket}/{key}", exc) from exc

    def list_uploads(self, bucket: str, prefix: str, *, versioned: bool) -> Iterator[Listed]:
        """Every current object under prefix, page by page (the listing is a lazy generator)."""
        try:
            for obj in self.client.list_objects(
                bucket, prefix=prefix, recursive=True, include_version=versioned
            ):
                if obj.is_dir or obj.is_delete_marker or obj.object_name is None:
                    continue
                if versioned and not obj.is_latest:
                    continue
                yield Listed(
                    key=obj.object_name,
                    etag=(obj.etag or "").strip('"'),
                    size=int(obj.size or 0),
                    version_id=obj.version_id if versioned and obj.version_id not in (None, "null") else "",
                    last_modified=obj.last_modified,
                )
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._error(f"list {bucket}/{prefix}", exc) from exc

    def versioned(self, bucket: str) -> bool:
        try:
            return self.client.get_bucket_versioning(bucket).status == "Enabled"
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._error(f"read the versioning of {bucket}", exc) from exc

    def digest(
        self, bucket: str, key: str, *, version_id: str = "", if_match: str = "", algorithm: str
    ) -> str | None:
        headers: dict[str, str | list[str] | tuple[str]] | None = (
            {"If-Match": f'"{if_match}"'} if if_match else None
        )
        hasher = hashlib.new(algorithm)
        response = None
        try:
            response = self.client.get_object(
                bucket, key, version_id=version_id or None, request_headers=headers
            )
            for chunk in response.stream(1024 * 1024):
                hasher.update(chunk)
        except S3Error as exc:
            if _code(exc) in _REFUSED:
                return None
            raise self._error(f"read {bucket}/{key}", exc) from exc
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._error(f"read {bucket}/{key}", exc) from exc
        finally:
            if response is not None:
                response.close()
                response.release_conn()
        return hasher.hexdigest()
