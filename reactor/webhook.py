"""The HTTP face: MinIO's webhook target posts events here; health and readiness for operators.

Status codes are MinIO's retry contract: 2xx only once every upload in the body is committed
to the outbox (or deliberately ignored); 503 when the database cannot take it, so MinIO's queue
keeps the event and resends it; 4xx only for requests MinIO would never send.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Final

from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from reactor import logs
from reactor.errors import DatabaseUnavailable, EventError
from reactor.events import parse_webhook_body
from reactor.ingest import Ingestor

log = logs.get("reactor.webhook")

BODY_TIMEOUT: Final[float] = 10.0
"""Seconds a client has to send the whole body once its headers are in. MinIO sends an event at once;
a client that trickles bytes gets 408 instead of holding a connection and a task for as long as it likes."""

_PARSE_INLINE_MAX: Final[int] = 64 * 1024
"""Bodies up to this size are parsed on the event loop; larger ones in a thread, so that one big event
(up to REACTOR_WEBHOOK_MAX_BODY) does not stall every other connection while it is parsed."""

_CLOSE: Final[dict[str, str]] = {"Connection": "close"}
"""For answers given before the body was read: closing is the only way not to read (drain) the rest."""


class _TooLarge(Exception):
    pass


class _TooSlow(Exception):
    pass


async def _read_body(request: Request, limit: int, timeout: float) -> bytes:
    """The whole body; _TooLarge past limit bytes (declared or sent), _TooSlow after timeout seconds."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(timeout):
            async for chunk in request.stream():
                size += len(chunk)
                if size > limit:
                    raise _TooLarge
                chunks.append(chunk)
    except TimeoutError:
        raise _TooSlow from None
    return b"".join(chunks)


def _error(status: int, message: str, *, close: bool = False) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=_CLOSE if close else None)


def create_app(
    *,
    ingestor: Ingestor,
    ping: Callable[[], None],
    token: str | None,
    max_body: int,
    body_timeout: float = BODY_TIMEOUT,
    on_start: Callable[[], None] = lambda: None,
    on_stop: Callable[[], None] = lambda: None,
) -> Starlette:
    expected = f"Bearer {token}".encode() if token else None

    async def events(request: Request) -> JSONResponse:
        if expected is not None:
            given = request.headers.get("authorization", "").encode()
            if not hmac.compare_digest(given, expected):
                return _error(
                    401,
                    "missing or wrong bearer token: send 'Authorization: Bearer <REACTOR_WEBHOOK_TOKEN>' "
                    "(MinIO: MINIO_NOTIFY_WEBHOOK_AUTH_TOKEN_<ID>)",
                    close=True,
                )
        content_type = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
        if content_type not in ("application/json", ""):
            return _error(
                415, f"content type {content_type!r} is not a MinIO event: send application/json", close=True
            )
        try:
            body = await _read_body(request, max_body, body_timeout)
        except _TooLarge:
            return _error(
                413,
                f"body over {max_body} bytes: MinIO sends one event per request; "
                "raise REACTOR_WEBHOOK_MAX_BODY if your events are larger",
                close=True,
            )
        except _TooSlow:
            log.info("webhook_body_timeout", seconds=body_timeout)
            return _error(
                408, f"the body did not arrive within {body_timeout:g} seconds; send it at once", close=True
            )
        except ClientDisconnect:
            return _error(400, "the client went away before sending the whole body")
        try:
            if len(body) > _PARSE_INLINE_MAX:
                notices = await run_in_threadpool(parse_webhook_body, body)
            else:
                notices = parse_webhook_body(body)
        except EventError as exc:
            log.info("webhook_rejected", error=str(exc))
            return _error(400, f"not a MinIO event: {exc}")
        try:
            report = await run_in_threadpool(ingestor.ingest, notices, via="webhook")
        except DatabaseUnavailable as exc:
            log.warning("webhook_unavailable", error=str(exc))
            return JSONResponse(
                {"error": "the database is unreachable; resend later"},
                status_code=503,
                headers={"Retry-After": "3"},
            )
        except Exception:
            # Anything else is still worth a retry by MinIO's queue rather than a lost event.
            log.exception("webhook_failed")
            return _error(500, "internal error while recording the event; it will be retried")
        return JSONResponse(
            {
                "enqueued": report.enqueued,
                "duplicate": report.duplicate,
                "ignored": report.ignored,
                "failed": report.failed_at_enqueue,
            }
        )

    async def healthz(_request: Request) -> JSONResponse:
        return JSONResponse({"status": "ok"})

    async def readyz(_request: Request) -> JSONResponse:
        try:
            await run_in_threadpool(ping)
        except Exception:
            return JSONResponse({"status": "unavailable", "database": "unreachable"}, status_code=503)
        return JSONResponse({"status": "ready", "database": "ok"})

    @asynccontextmanager
    async def lifespan(_app: Starlette) -> AsyncIterator[None]:
        await run_in_threadpool(on_start)
        try:
            yield
        finally:
            await run_in_threadpool(on_stop)

    return Starlette(
        lifespan=lifespan,
        routes=[
            Route("/minio/events", events, methods=["POST"]),
            Route("/healthz", healthz, methods=["GET"]),
            Route("/readyz", readyz, methods=["GET"]),
        ],
    )
