"""The object store port the mover needs, and its MinIO adapter (minio-py)."""

from __future__ import annotations

import hashlib
import json
import socket
import ssl
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Protocol

import urllib3
from minio import Minio
from minio.commonconfig import CopySource
from minio.datatypes import parse_copy_object
from minio.error import MinioException, S3Error, ServerError
from minio.helpers import MAX_PART_SIZE
from urllib3.connection import HTTPConnection
from urllib3.util import Retry

from reactor import __version__
from reactor.errors import ConfigError, ObjectStoreError, ObjectStoreUnavailable

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
        self,
        *,
        bucket: str,
        key: str,
        version_id: str,
        if_match: str,
        target_bucket: str,
        target_key: str,
        size: int = -1,
    ) -> str | None:
        """Server-side copy if the source is still that version; the new ETag, or None if refused.
        `size` (when known) lets the adapter pick the copy method without asking the server."""

    def remove(self, bucket: str, key: str, version_id: str = "") -> None:
        """Delete the object (exactly that version when given); deleting nothing is not an error."""

    def digest(
        self, bucket: str, key: str, *, version_id: str = "", if_match: str = "", algorithm: str
    ) -> str | None:
        """Hash the object's bytes while streaming them; None when missing or no longer that version."""


_OUTAGE_CODES = frozenset({"ServiceUnavailable", "SlowDown", "XMinioServerNotInitialized", "InternalError"})


def _is_outage(exc: BaseException) -> bool:
    """Connection-level failures and 'try later' answers, as opposed to errors about this move."""
    if isinstance(exc, MinioTLSError):
        return False  # a configuration problem: retrying will not fix it
    if isinstance(exc, S3Error):
        return _code(exc) in _OUTAGE_CODES
    if isinstance(exc, ServerError):
        return exc.status_code >= 500
    if isinstance(exc, urllib3.exceptions.MaxRetryError):
        return exc.reason is None or _is_outage(exc.reason)
    return isinstance(
        exc,
        urllib3.exceptions.NewConnectionError
        | urllib3.exceptions.ConnectTimeoutError
        | urllib3.exceptions.ProtocolError
        | urllib3.exceptions.ReadTimeoutError
        | ConnectionError,
    )


def _code(exc: S3Error) -> str:
    return exc.code or ""


class MinioTLSError(ObjectStoreError, urllib3.exceptions.SSLError):
    """TLS to MinIO failed: the certificate cannot be verified, or one side does not speak TLS.

    Both a ReactorError (so a CLI command prints the message, never a traceback) and a urllib3
    SSLError (so every caller that handles MinIO's transport errors handles this one too: moves
    retry, listeners reconnect). The message names the setting to fix.
    """


# Go's net/http answers a plain HTTP request on a TLS port with exactly this body.
_PLAIN_TO_TLS = b"Client sent an HTTP request to an HTTPS server"
# OpenSSL's X509_V_ERR_HOSTNAME_MISMATCH, _EMAIL_MISMATCH and _IP_ADDRESS_MISMATCH.
_NAME_MISMATCH = frozenset({62, 63, 64})
# OpenSSL's reasons when the peer answers a TLS handshake with something that is not TLS.
_NOT_TLS = frozenset(
    {"WRONG_VERSION_NUMBER", "RECORD_LAYER_FAILURE", "HTTP_REQUEST", "PACKET_LENGTH_TOO_LONG"}
)


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    """The ssl module's error behind urllib3's wrappers (MaxRetryError -> SSLError -> ssl.SSLError)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, ssl.SSLError):
            return current
        reason = getattr(current, "reason", None)
        if isinstance(reason, BaseException) and id(reason) not in seen:
            current = reason
            continue
        current = current.__cause__ or current.__context__
    return None


def check_ca_file(ca_file: str | None, *, secure: bool) -> None:
    """Refuse at start a CA file that cannot work, instead of failing every request later."""
    if ca_file is None:
        return
    if not secure:
        raise ConfigError(
            "REACTOR_MINIO_CA_FILE is set but REACTOR_MINIO_SECURE is not true: the CA would be ignored "
            "and MinIO reached over plain HTTP. Set REACTOR_MINIO_SECURE=true, or unset REACTOR_MINIO_CA_FILE"
        )
    try:
        ssl.create_default_context(cafile=ca_file)
    except ssl.SSLError as exc:
        raise ConfigError(
            f"REACTOR_MINIO_CA_FILE holds no usable PEM CA certificate ({exc.reason or exc}): point it at "
            "the PEM file of the CA that signed MinIO's certificate"
        ) from None
    except OSError as exc:
        raise ConfigError(
            f"REACTOR_MINIO_CA_FILE cannot be read ({exc.strerror or exc}): point it at an existing, "
            "readable PEM file of the CA that signed MinIO's certificate"
        ) from None


class _MinioPool(urllib3.PoolManager):
    """A PoolManager that turns TLS failures into a MinioTLSError saying what to change."""

    def __init__(self, *, endpoint: str, secure: bool, ca_file: str | None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._endpoint = endpoint
        self._secure = secure
        self._ca_file = ca_file

    def urlopen(  # type: ignore[override]  # PoolManager's own signature, as urllib3 declares it
        self, method: str, url: str, redirect: bool = True, **kw: Any
    ) -> urllib3.BaseHTTPResponse:
        try:
            response = super().urlopen(method, url, redirect=redirect, **kw)
        except MinioTLSError:
            raise  # already explained (a redirect goes through this method again)
        except urllib3.exceptions.HTTPError as exc:
            cause = _ssl_cause(exc)
            if cause is None:
                raise
            raise MinioTLSError(self._explain(cause)) from exc
        if (
            not self._secure
            and response.status == 400
            and kw.get("preload_content", True)
            and (response.data or b"").startswith(_PLAIN_TO_TLS)
        ):
            raise MinioTLSError(
                f"MinIO at {self._endpoint} serves HTTPS but REACTOR_MINIO_SECURE is not true: set "
                "REACTOR_MINIO_SECURE=true (and REACTOR_MINIO_CA_FILE if its certificate comes from a "
                "private CA)"
            )
        return response

    def _explain(self, cause: ssl.SSLError) -> str:
        where = f"MinIO at {self._endpoint}"
        if isinstance(cause, ssl.SSLCertVerificationError):
            problem = (cause.verify_message or cause.reason or str(cause)).rstrip(".")
            if cause.verify_code in _NAME_MISMATCH:
                return (
                    f"cannot verify the TLS certificate of {where}: {problem}. Reach MinIO by a name or "
                    "address the certificate lists (REACTOR_MINIO_ENDPOINT), or reissue the certificate"
                )
            if self._ca_file:
                fix = (
                    "REACTOR_MINIO_CA_FILE does not hold the CA that signed MinIO's certificate (or the "
                    "certificate is not valid now): point it at the PEM file of that CA"
                )
            else:
                fix = (
                    "a certificate from a private CA needs REACTOR_MINIO_CA_FILE set to the PEM file of "
                    "that CA"
                )
            return f"cannot verify the TLS certificate of {where}: {problem}. {fix}"
        reason = cause.reason or str(cause)
        hint = ""
        if reason in _NOT_TLS:
            hint = (
                ": it does not seem to speak TLS. Start MinIO with a certificate (public.crt and "
                "private.key in its --certs-dir), or set REACTOR_MINIO_SECURE=false"
            )
        return f"TLS handshake with {where} failed ({reason}){hint}"


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
        check_ca_file(ca_file, secure=secure)
        http = _MinioPool(
            endpoint=endpoint,
            secure=secure,
            ca_file=ca_file,
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
        kind = ObjectStoreUnavailable if _is_outage(exc) else ObjectStoreError
        return kind(f"MinIO at {self.endpoint} failed to {what}: {exc}")

    def ping(self, bucket: str) -> bool:
        """Whether MinIO answers at all (an access error is an answer)."""
        try:
            self.client.bucket_exists(bucket)
        except S3Error:
            return True
        except (MinioException, urllib3.exceptions.HTTPError, OSError):
            return False
        return True

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
        self,
        *,
        bucket: str,
        key: str,
        version_id: str,
        if_match: str,
        target_bucket: str,
        target_key: str,
        size: int = -1,
    ) -> str | None:
        source = CopySource(bucket, key, version_id=version_id or None, match_etag=if_match)
        try:
            if 0 <= size <= MAX_PART_SIZE:
                return self._copy_object(target_bucket, target_key, source)
            # Unknown size or over 5 GiB: minio-py stats the source and composes big ones.
            result = self.client.copy_object(target_bucket, target_key, source)
        except S3Error as exc:
            if _code(exc) in _REFUSED:
                return None
            raise self._error(f"copy {bucket}/{key} to {target_bucket}/{target_key}", exc) from exc
        except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
            raise self._error(f"copy {bucket}/{key} to {target_bucket}/{target_key}", exc) from exc
        return (result.etag or "").strip('"')

    def _copy_object(self, target_bucket: str, target_key: str, source: CopySource) -> str:
        """One PUT with the copy-source headers: S3's CopyObject, exactly.

        minio-py's copy_object first stats the source (to pick compose above 5 GiB), one more
        round trip per move; the move knows the size from the event, so it calls the same
        request minio-py would send next, through the client's own signing and error handling
        (Minio._execute, pinned with minio==7.2.20 in pyproject.toml)."""
        headers: dict[str, str | list[str] | tuple[str]] = dict(source.gen_copy_headers())
        response = self.client._execute("PUT", target_bucket, object_name=target_key, headers=headers)
        etag, _ = parse_copy_object(response)
        return etag.strip('"')

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


@contextmanager
def listen(client: Minio, bucket: str, events: Sequence[str]) -> Iterator[Iterator[dict[str, Any]]]:
    """MinIO's ListenBucketNotification stream as parsed events (those with records).

    minio-py's own iterator reads the stream with IOBase.readline, which urllib3's response does
    not override: one read(1) call per byte, tens of milliseconds of CPU per event. This reads
    whatever has arrived (read1: one socket read, never waiting to fill a buffer) and splits the
    lines itself. The request is the one minio-py sends (Minio._execute, pinned minio==7.2.20).
    """
    response = client._execute(
        "GET",
        bucket,
        query_params={"prefix": "", "suffix": "", "events": list(events)},
        preload_content=False,
    )

    def parsed() -> Iterator[dict[str, Any]]:
        pending = b""
        while True:
            chunk = response.read1(64 * 1024)
            if not chunk:
                return  # the server ended the stream: the caller reconnects
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if not line.strip():
                    continue  # MinIO's keep-alive: a blank line every few seconds
                event = json.loads(line)
                if isinstance(event, dict) and event.get("Records"):
                    yield event

    try:
        yield parsed()
    finally:
        response.close()
        response.release_conn()
