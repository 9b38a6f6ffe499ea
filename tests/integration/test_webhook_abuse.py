"""The webhook under abuse, on a real reactor process and the real database.

Everything here talks to 127.0.0.1 only, and every loop is bounded by a count as well as a clock.
The contract cases (bad JSON, a wrong token, duplicates, ...) are in test_webhook.py; this file is about
what a hostile or broken client can do: huge, endless, slow, deep or plentiful input.
"""

from __future__ import annotations

import contextlib
import copy
import http.client
import json
import os
import random
import select
import socket
import string
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from reactor.devstack import LOOPBACK, WEBHOOK_PATH
from tests.support.e2e import post, sql, webhook_body, write_rules
from tests.support.stack import BucketNames, ReactorProcess, ReactorSpawner

ETAG = "0123456789abcdef0123456789abcdef"
SEQUENCER = "1870A1B2C3D4E5F6"
DEFAULT_MAX_BODY = 1024 * 1024
BODY_TIMEOUT = 10.0  # reactor.webhook.BODY_TIMEOUT: the whole body must arrive within it
FLOOD_SECONDS = float(os.environ.get("REACTOR_TEST_FLOOD_SECONDS", "30"))
FLOOD_CLIENTS = 50
RSS_GROWTH_LIMIT = 100 * 1024 * 1024  # a leak check, not a performance assertion


# --------------------------------------------------------------------------------------------------
# A reactor to abuse


@dataclass
class Webhook:
    process: ReactorProcess
    src: str
    token: str
    database_url: str

    @property
    def port(self) -> int:
        return self.process.port

    @property
    def url(self) -> str:
        return self.process.url + WEBHOOK_PATH

    def body(self, key: str) -> bytes:
        return webhook_body(bucket=self.src, key=key, etag=ETAG, size=3, sequencer=SEQUENCER)

    def record(self, key: str = "det/t1/x.jpg") -> dict[str, Any]:
        document: dict[str, Any] = json.loads(self.body(key))
        return document

    def post(self, body: bytes, *, token: str | None = "", content_type: str = "application/json") -> Any:
        """(status, answer); token "" means the right one."""
        return post(self.url, body, token=self.token if token == "" else token, content_type=content_type)

    def moves(self) -> int:
        return int(sql(self.database_url, "SELECT count(*) AS n FROM reactor.moves")[0]["n"])

    def source_keys(self) -> list[str]:
        rows = sql(self.database_url, "SELECT source_key FROM reactor.moves")
        return [str(row["source_key"]) for row in rows]

    def rss(self) -> int:
        """The reactor's resident set size in bytes, from /proc."""
        for line in Path(f"/proc/{self.process.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
        raise AssertionError(f"no VmRSS for pid {self.process.pid}")


StartWebhook = Callable[..., Webhook]


@pytest.fixture
def start_webhook(
    tmp_path: Path, database_url: str, buckets: BucketNames, spawn_reactor: ReactorSpawner
) -> StartWebhook:
    """start_webhook(env={...}): a reactor whose one rule takes {task_type}/{task_id}/{filename}."""
    src, dst = buckets.make("abuse-src"), buckets.make("abuse-dst")
    rules = write_rules(
        tmp_path / "rules.toml",
        {
            "name": "alerts",
            "source_bucket": src,
            "pattern": "{task_type}/{task_id}/{filename}",
            "target_bucket": dst,
            "target": "{task_type}/{task_id}/{filename}",
            "order_key": "{task_id}",
        },
    )

    def start(env: Mapping[str, str] | None = None) -> Webhook:
        process = spawn_reactor(database_url=database_url, rules_path=rules, env=env)
        return Webhook(process, src, process.env["REACTOR_WEBHOOK_TOKEN"], database_url)

    return start


@pytest.fixture
def webhook(start_webhook: StartWebhook) -> Webhook:
    return start_webhook()


# --------------------------------------------------------------------------------------------------
# Raw HTTP, for what http.client will not send


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    @property
    def error(self) -> str:
        return str(json.loads(self.body)["error"])


def head(
    webhook: Webhook, *, content_length: int | None = None, chunked: bool = False, token: str | None = ""
) -> bytes:
    lines = [
        f"POST {WEBHOOK_PATH} HTTP/1.1",
        f"Host: {LOOPBACK}:{webhook.port}",
        "Content-Type: application/json",
    ]
    if token is not None:
        lines.append(f"Authorization: Bearer {webhook.token if token == '' else token}")
    if content_length is not None:
        lines.append(f"Content-Length: {content_length}")
    if chunked:
        lines.append("Transfer-Encoding: chunked")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@contextlib.contextmanager
def connection(webhook: Webhook, timeout: float = 15.0) -> Iterator[socket.socket]:
    sock = socket.create_connection((LOOPBACK, webhook.port), timeout=timeout)
    try:
        yield sock
    finally:
        sock.close()


def read_answer(sock: socket.socket) -> Answer:
    """One HTTP/1.1 response with a Content-Length body (what the reactor always sends)."""
    data = b""
    for _ in range(10_000):
        if b"\r\n\r\n" in data:
            break
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"the server closed the connection before a whole response: {data!r}")
        data += chunk
    header_block, _, rest = data.partition(b"\r\n\r\n")
    status_line, *header_lines = header_block.decode("latin-1").split("\r\n")
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    for _ in range(10_000):
        if len(rest) >= length:
            break
        chunk = sock.recv(65536)
        if not chunk:
            break
        rest += chunk
    return Answer(int(status_line.split()[1]), headers, rest[:length])


def closed_by_server(sock: socket.socket, timeout: float = 5.0) -> bool:
    """True once the server has closed the connection (EOF or reset) within timeout seconds."""
    sock.settimeout(timeout)
    try:
        return sock.recv(1) == b""
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def assert_still_serving(webhook: Webhook, key: str = "det/ok/after.jpg") -> None:
    status, answer = webhook.post(webhook.body(key))
    assert (status, answer["enqueued"]) == (200, 1)


# --------------------------------------------------------------------------------------------------
# Size


def test_a_huge_declared_body_gets_413_at_once_and_the_connection_is_closed(webhook: Webhook) -> None:
    with connection(webhook) as sock:
        # Ten GiB declared, a dozen bytes sent: the answer must not wait for the rest.
        sock.sendall(head(webhook, content_length=10 * 1024**3) + b'{"Records": [')
        started = time.monotonic()
        answer = read_answer(sock)
        assert answer.status == 413
        assert "REACTOR_WEBHOOK_MAX_BODY" in answer.error
        assert answer.headers.get("connection") == "close"
        assert closed_by_server(sock), "the server kept the connection open to read (drain) the rest"
        assert time.monotonic() - started < 10
    assert webhook.moves() == 0
    assert_still_serving(webhook)


def test_a_chunked_body_over_the_limit_gets_413_without_being_read_to_its_end(webhook: Webhook) -> None:
    chunk = b"x" * 65536
    with connection(webhook) as sock:
        sock.sendall(head(webhook, chunked=True))
        # One chunk past the limit, and no terminating chunk: the body never ends.
        for _ in range(DEFAULT_MAX_BODY // len(chunk) + 1):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        answer = read_answer(sock)
        assert answer.status == 413
        assert "REACTOR_WEBHOOK_MAX_BODY" in answer.error
        assert closed_by_server(sock)
    assert webhook.moves() == 0
    assert_still_serving(webhook)


def test_a_body_of_exactly_the_limit_is_read_and_judged(webhook: Webhook) -> None:
    body = webhook.body("det/t1/x.jpg")
    padded = body[:-1] + b" " * (DEFAULT_MAX_BODY - len(body)) + b"}"
    assert len(padded) == DEFAULT_MAX_BODY
    status, answer = webhook.post(padded)
    assert (status, answer["enqueued"]) == (200, 1)
    status, answer = webhook.post(padded + b" ")
    assert status == 413


# --------------------------------------------------------------------------------------------------
# Shape


NESTED: tuple[bytes, ...] = (
    b"[" * 100_000,
    b'{"Records": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
    b'{"a":' * 50_000 + b"1" + b"}" * 50_000,
    b'{"Records": [{"eventName": ' + b"[" * 5_000 + b"]" * 5_000 + b"}]}",
)


def test_deeply_nested_json_gets_400(webhook: Webhook) -> None:
    for body in NESTED:
        status, answer = webhook.post(body)
        assert (status, "not a MinIO event" in answer["error"]) == (400, True), (body[:40], answer)
    assert webhook.moves() == 0
    assert_still_serving(webhook)


INVALID_UTF8: tuple[bytes, ...] = (
    b'{"Records": [], "x": "\xc0\xaf"}',  # an overlong '/'
    b'{"Records": [], "x": "\xed\xa0\x80"}',  # a surrogate, encoded
    b'{"Records": [], "x": "\xe6\xb5"}',  # a sequence cut short
    b'{"Records": [], "x": "\xf8\x88\x80\x80\x80"}',  # the old five-byte form
    b"\xef\xbb\xbf\xff{}",  # a BOM, then garbage
)


def test_invalid_utf8_gets_400(webhook: Webhook) -> None:
    for body in INVALID_UTF8:
        status, answer = webhook.post(body)
        assert (status, "UTF-8" in answer["error"]) == (400, True), (body, answer)
    assert webhook.moves() == 0


WRONG_CONTENT_TYPES = (
    "application/x-www-form-urlencoded",
    "multipart/form-data; boundary=xyz",
    "text/json",
    "application/jsonx",
    "application/octet-stream",
)


def test_a_wrong_content_type_gets_415_and_parameters_or_case_do_not_matter(webhook: Webhook) -> None:
    body = webhook.body("det/t1/x.jpg")
    for content_type in WRONG_CONTENT_TYPES:
        status, answer = webhook.post(body, content_type=content_type)
        assert (status, "application/json" in answer["error"]) == (415, True), (content_type, answer)
    assert webhook.moves() == 0
    status, answer = webhook.post(body, content_type="Application/JSON; charset=utf-8")
    assert (status, answer["enqueued"]) == (200, 1)


def _set(document: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy with value at a dotted path under Records[0] (a missing marker deletes it)."""
    result = copy.deepcopy(document)
    node: Any = result["Records"][0]
    *parents, last = path.split(".")
    for name in parents:
        node = node[name]
    if value is _DELETE:
        del node[last]
    else:
        node[last] = value
    return result


_DELETE = object()


MISSING_OR_WRONG: tuple[tuple[str, Any, str], ...] = (
    ("eventName", _DELETE, "Records[0].eventName is missing"),
    ("eventName", 7, "Records[0].eventName must be a string, got 7"),
    ("s3", _DELETE, "Records[0].s3.bucket.name is missing"),
    ("s3", [], "Records[0].s3 must be a JSON object, got an array"),
    ("s3.bucket", "images", "Records[0].s3.bucket must be a JSON object, got a string"),
    ("s3.bucket.name", None, "Records[0].s3.bucket.name is missing"),
    ("s3.bucket.name", "", "Records[0].s3.bucket.name is empty"),
    ("s3.object.key", _DELETE, "Records[0].s3.object.key is missing"),
    ("s3.object.key", {"a": 1}, "Records[0].s3.object.key must be a string, got an object"),
    ("s3.object.key", "%FF", "Records[0].s3.object.key '%FF' has percent-escapes"),
    ("s3.object.eTag", _DELETE, "Records[0].s3.object.eTag is missing"),
    ("s3.object.eTag", '""', "Records[0].s3.object.eTag is empty"),
    ("s3.object.size", "3", "Records[0].s3.object.size must be an integer, got '3'"),
    ("s3.object.size", 3.5, "Records[0].s3.object.size must be an integer, got 3.5"),
    ("s3.object.size", True, "Records[0].s3.object.size must be an integer, got true"),
    ("s3.object.size", -1, "Records[0].s3.object.size must be >= 0"),
    ("s3.object.sequencer", "xyz", "Records[0].s3.object.sequencer must be hexadecimal"),
    ("s3.object.versionId", 12, "Records[0].s3.object.versionId must be a string"),
    ("source", "minio", "Records[0].source must be a JSON object, got a string"),
)


def test_missing_fields_and_wrong_types_get_400_naming_the_path(webhook: Webhook) -> None:
    for path, value, message in MISSING_OR_WRONG:
        status, answer = webhook.post(json.dumps(_set(webhook.record(), path, value)).encode())
        assert (status, message in answer["error"]) == (400, True), (path, value, message, answer)
    assert webhook.moves() == 0


def test_the_path_names_the_bad_record_among_many(webhook: Webhook) -> None:
    document = webhook.record()
    good = document["Records"][0]
    bad = copy.deepcopy(good)
    bad["s3"]["object"]["size"] = "big"
    document["Records"] = [good, good, bad]
    status, answer = webhook.post(json.dumps(document).encode())
    assert status == 400
    assert "Records[2].s3.object.size must be an integer" in answer["error"]
    assert webhook.moves() == 0  # all or nothing: the good records of a refused body are not enqueued


UNSTORABLE: tuple[tuple[str, Any, str], ...] = (
    # Nothing MinIO sends, and nothing PostgreSQL can store: refused with a reason (400), never a
    # 500 that promises a retry that can never succeed.
    ("s3.object.key", "det%2Ft1%2Fa%00b.jpg", "NUL"),
    ("s3.object.key", "det%2Ft1%2F" + "a" * 3000, "1024"),
    ("s3.object.size", 2**63, "size"),
    ("s3.object.size", 10**30, "size"),
    ("s3.object.eTag", "e" * 5000, "eTag"),
    ("s3.object.versionId", "v" * 5000, "versionId"),
    ("s3.object.eTag", "ab\x00cd", "NUL"),
    ("s3.object.versionId", "\ud800", "surrogate"),
    ("s3.object.userMetadata", {"x-amz-meta-a": "\x00"}, "NUL"),
    ("s3.object.userMetadata", {"x-amz-meta-a": "\udfff"}, "surrogate"),
    ("s3.object.userMetadata", {"\x00": "a"}, "NUL"),
    ("eventTime", "\ud83d", "surrogate"),
)


def test_a_matching_upload_that_cannot_be_stored_gets_400_not_500(webhook: Webhook) -> None:
    for path, value, message in UNSTORABLE:
        status, answer = webhook.post(json.dumps(_set(webhook.record(), path, value)).encode())
        assert (status, message in str(answer)) == (400, True), (path, str(value)[:40], answer)
    assert webhook.moves() == 0
    # The largest upload MinIO can describe, in bytes that do not compress, is stored.
    rng = random.Random(1024)
    name = "".join(rng.choice("aé€😀Zq9-_ ~+%") for _ in range(600)).encode()[: 1024 - len("det/t1/")]
    key = "det/t1/" + name.decode("utf-8", "ignore")
    key += "x" * (1024 - len(key.encode()))
    document = _set(
        webhook.record(), "s3.object.versionId", "".join(rng.choices(string.printable[:94], k=1024))
    )
    document = _set(document, "s3.object.eTag", "".join(rng.choices(string.hexdigits, k=256)))
    document = _set(document, "s3.object.key", urllib.parse.quote_plus(key, safe=""))
    assert len(key.encode()) == 1024
    status, answer = webhook.post(json.dumps(document).encode())
    assert (status, answer) == (200, {"enqueued": 1, "duplicate": 0, "ignored": 0, "failed": 0})
    assert webhook.source_keys() == [key]


def test_non_json_number_constants_get_400(webhook: Webhook) -> None:
    for constant in ("NaN", "Infinity", "-Infinity", "1e999"):
        body = webhook.body("det/t1/x.jpg").replace(b'"awsRegion": ""', f'"awsRegion": {constant}'.encode())
        assert constant.encode() in body
        status, answer = webhook.post(body)
        assert (status, "Records[0].awsRegion" in str(answer)) == (400, True), (constant, answer)
    assert webhook.moves() == 0


# --------------------------------------------------------------------------------------------------
# Many records


def _many(webhook: Webhook, count: int) -> bytes:
    document = webhook.record()
    template = document["Records"][0]
    records = []
    for n in range(count):
        record = copy.deepcopy(template)
        record["s3"]["object"]["key"] = f"unmatched%2Fby%2Fany%2Frule%2F{n}.jpg"  # four segments: no match
        records.append(record)
    document["Records"] = records
    return json.dumps(document).encode()


def test_ten_thousand_records_are_answered_and_one_more_is_refused(start_webhook: StartWebhook) -> None:
    webhook = start_webhook(env={"REACTOR_WEBHOOK_MAX_BODY": str(32 * 1024 * 1024)})
    body = _many(webhook, 10_000)
    conn = http.client.HTTPConnection(LOOPBACK, webhook.port, timeout=120)
    try:
        started = time.monotonic()
        conn.request("POST", WEBHOOK_PATH, body=body, headers=json_headers(webhook.token))
        response = conn.getresponse()
        status, answer = response.status, json.loads(response.read())
        elapsed = time.monotonic() - started
    finally:
        conn.close()
    print(f"10,000 records ({len(body) >> 20} MiB) answered in {elapsed:.2f}s")
    assert status == 200, answer
    assert answer == {"enqueued": 0, "duplicate": 0, "ignored": 10_000, "failed": 0}
    # A few seconds here; the bound leaves room for a busy machine, not for a quadratic slip.
    assert elapsed < 30, f"{elapsed:.1f}s for 10,000 records"
    status, answer = post(webhook.url, _many(webhook, 10_001), token=webhook.token)
    assert status == 400
    assert "at most 10000 records" in answer["error"]
    assert webhook.moves() == 0
    assert_still_serving(webhook)


def json_headers(token: str | None) -> dict[str, str]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return headers


# --------------------------------------------------------------------------------------------------
# Slow clients


def test_a_client_trickling_its_body_gets_408_while_others_are_served(webhook: Webhook) -> None:
    idle: list[socket.socket] = []
    with connection(webhook) as body_sock, connection(webhook) as header_sock:
        try:
            # A hundred connections that stop half-way through their headers, held open throughout.
            for _ in range(100):
                sock = socket.create_connection((LOOPBACK, webhook.port), timeout=10)
                idle.append(sock)
                sock.sendall(b"POST " + WEBHOOK_PATH.encode() + b" HTTP/1.1\r\nHost: x\r\n")
            body_sock.sendall(head(webhook, content_length=1000))
            header_bytes = head(webhook, content_length=10) + b"x" * 10_000  # more than the test lasts
            started = time.monotonic()
            served: list[int] = []
            answer: Answer | None = None
            for tick in range(int(BODY_TIMEOUT) + 40):  # one byte a second on each slow connection
                if select.select([body_sock], [], [], 1.0)[0]:
                    answer = read_answer(body_sock)
                    break
                with contextlib.suppress(OSError):
                    body_sock.sendall(b" ")
                header_sock.sendall(header_bytes[tick : tick + 1])
                if tick in (2, 5, 8):
                    status, result = webhook.post(webhook.body(f"det/ok/{tick}.jpg"))
                    served.append(status if result["enqueued"] == 1 else -status)
                    served.append(post_health(webhook))
            elapsed = time.monotonic() - started
            assert answer is not None, "the trickling client was never answered"
            assert answer.status == 408
            assert "seconds" in answer.error
            assert BODY_TIMEOUT - 1 <= elapsed <= BODY_TIMEOUT + 30
            assert closed_by_server(body_sock)
            assert served == [200] * 6, "others were not served while slow clients were connected"
            assert webhook.moves() == 3
            # uvicorn has no timeout for a request whose headers never end: those connections stay
            # open (see the report); what matters here is that they do not stop anyone else.
            assert_still_serving(webhook)
        finally:
            for sock in idle:
                sock.close()


def post_health(webhook: Webhook) -> int:
    conn = http.client.HTTPConnection(LOOPBACK, webhook.port, timeout=10)
    try:
        conn.request("GET", "/healthz")
        response = conn.getresponse()
        response.read()
        return int(response.status)
    finally:
        conn.close()


# --------------------------------------------------------------------------------------------------
# A flood


MALFORMED: tuple[bytes, ...] = (
    b"not json",
    b"[]",
    b'{"Records": "x"}',
    b"\xff\xfe",
    b"[" * 5_000,
    b'{"Records": [{"eventName": "s3:ObjectCreated:Put"}]}',
    b'{"Records": [{"eventName": "s3:ObjectCreated:Put", "s3": {"bucket": {"name": "b"}, '
    b'"object": {"key": "k", "size": "1", "eTag": "e"}}}]}',
)

KINDS = ("valid", "valid", "valid", "duplicate", "malformed", "wrong_token", "no_token", "unmatched")


@dataclass
class FloodReport:
    counts: Counter[str] = field(default_factory=Counter)
    enqueued_keys: list[str] = field(default_factory=list)
    wrong: list[str] = field(default_factory=list)  # first few unexpected answers, for the message
    wrong_count: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def mismatch(self, text: str) -> None:
        with self.lock:
            self.wrong_count += 1
            if len(self.wrong) < 20:
                self.wrong.append(text)


ANSWERS: dict[str, dict[str, int]] = {
    "valid": {"enqueued": 1, "duplicate": 0, "ignored": 0, "failed": 0},
    "duplicate": {"enqueued": 0, "duplicate": 1, "ignored": 0, "failed": 0},
    "unmatched": {"enqueued": 0, "duplicate": 0, "ignored": 1, "failed": 0},
}


def _as_documented(kind: str, status: int, answer: Any) -> bool:
    if kind in ANSWERS:
        return status == 200 and answer == ANSWERS[kind]
    error = answer.get("error", "") if isinstance(answer, dict) else ""
    if kind == "malformed":
        return status == 400 and "not a MinIO event" in error
    return status == 401 and "REACTOR_WEBHOOK_TOKEN" in error


def _client(webhook: Webhook, name: str, number: int, deadline: float, report: FloodReport) -> None:
    rng = random.Random(number)
    conn = http.client.HTTPConnection(LOOPBACK, webhook.port, timeout=30)
    sent: list[bytes] = []
    keys: list[str] = []
    counts: Counter[str] = Counter()
    try:
        for n in range(100_000):  # bounded; the deadline ends it long before
            if time.monotonic() >= deadline:
                break
            kind = rng.choice(KINDS)
            if kind == "duplicate" and not sent:
                kind = "valid"
            token: str | None = webhook.token
            key = ""
            if kind == "valid":
                key = f"{name}/c{number}/{n}-é +%.jpg"
                body = webhook.body(key)
            elif kind == "duplicate":
                body = rng.choice(sent)
            elif kind == "malformed":
                body = rng.choice(MALFORMED)
            elif kind == "unmatched":
                body = webhook.body(f"no/match/for/this/{number}-{n}")
            else:
                body = webhook.body(f"{name}/c{number}/denied-{n}.jpg")
                token = "wrong-token" if kind == "wrong_token" else None
            try:
                conn.request("POST", WEBHOOK_PATH, body=body, headers=json_headers(token))
                response = conn.getresponse()
                status, payload = response.status, response.read()
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                report.mismatch(f"{kind}: {type(exc).__name__}: {exc}")
                continue
            counts[kind] += 1
            try:
                answer = json.loads(payload)
            except ValueError:
                answer = payload
            if not _as_documented(kind, status, answer):
                report.mismatch(f"{kind}: got {status} {answer!r}")
            elif kind == "valid":
                sent.append(body)
                keys.append(key)
    finally:
        conn.close()
        with report.lock:
            report.counts.update(counts)
            report.enqueued_keys.extend(keys)


def flood(webhook: Webhook, name: str, seconds: float, clients: int = FLOOD_CLIENTS) -> FloodReport:
    """clients threads posting for seconds; name keeps this flood's keys apart from any other's."""
    report = FloodReport()
    deadline = time.monotonic() + seconds
    threads = [
        threading.Thread(target=_client, args=(webhook, name, n, deadline, report), daemon=True)
        for n in range(clients)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=seconds + 120)
    assert not any(thread.is_alive() for thread in threads), "a flood client never finished"
    return report


@pytest.mark.parametrize(
    "seconds",
    [
        pytest.param(5.0, id="5s"),
        pytest.param(FLOOD_SECONDS, id=f"{FLOOD_SECONDS:g}s", marks=pytest.mark.slow),
    ],
)
def test_a_flood_of_clients_gets_exact_answers_memory_stays_flat_and_nothing_is_lost(
    webhook: Webhook, seconds: float
) -> None:
    warm_up = flood(
        webhook, "warm-up", 1.0, clients=5
    )  # threads, pools and caches exist before the first reading
    assert warm_up.wrong_count == 0, warm_up.wrong
    before = webhook.rss()
    report = flood(webhook, "flood", seconds)
    after = webhook.rss()
    assert report.wrong_count == 0, f"{report.wrong_count} unexpected answers, e.g. {report.wrong}"
    assert all(report.counts[kind] > 0 for kind in set(KINDS)), report.counts
    assert webhook.process.alive
    assert after - before < RSS_GROWTH_LIMIT, f"RSS grew from {before >> 20} MiB to {after >> 20} MiB"
    # Every valid event answered 200 is in the outbox exactly once, and nothing else is.
    expected = sorted(warm_up.enqueued_keys + report.enqueued_keys)
    assert len(set(expected)) == len(expected)
    assert sorted(webhook.source_keys()) == expected
    print(f"flood {seconds:g}s: {sum(report.counts.values())} requests {dict(report.counts)}, "
          f"RSS {before >> 20} -> {after >> 20} MiB")  # fmt: skip
