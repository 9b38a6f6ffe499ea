"""Least privilege in MinIO: the reactor runs end to end as a user holding only docker/minio-policy.json
(with this test's bucket names), and that user can touch nothing outside what the rules name.

Buckets are created and subscribed once by `reactor setup` as the admin, as docs/security.md says.
"""

from __future__ import annotations

import io
import json
import os
import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import urllib3
from minio import Minio
from minio.commonconfig import ENABLED
from minio.credentials.providers import StaticProvider
from minio.error import S3Error
from minio.minioadmin import MinioAdmin
from minio.versioningconfig import VersioningConfig

from reactor.devstack import REPO_ROOT
from reactor.rules import load_rules
from tests.support.e2e import (
    history,
    keys,
    nudging,
    put,
    sha256_of,
    sql,
    wait_listening,
    wait_settled,
    write_rules,
)
from tests.support.stack import BucketNames, MinioStack, ReactorSpawner, reactor_env, run_cli

POLICY_FILE = REPO_ROOT / "docker" / "minio-policy.json"
EXAMPLE_BUCKETS = ("images", "alerts", "uploads")
_ARN = re.compile(r"^arn:aws:s3:::(?P<bucket>[a-z0-9.-]+)(?P<rest>/.*)?$")


def render_policy(mapping: Mapping[str, str]) -> dict[str, Any]:
    """docker/minio-policy.json with each example bucket replaced, as an operator would."""
    policy: dict[str, Any] = json.loads(POLICY_FILE.read_text(encoding="utf-8"))
    for statement in policy["Statement"]:
        rendered = []
        for resource in statement["Resource"]:
            match = _ARN.match(resource)
            assert match is not None, resource
            assert match["bucket"] in mapping, resource
            rendered.append(f"arn:aws:s3:::{mapping[match['bucket']]}{match['rest'] or ''}")
        statement["Resource"] = rendered
    return policy


def example_rules(images: str, alerts: str, uploads: str) -> list[dict[str, str]]:
    """examples/rules.toml with the buckets renamed."""
    return [
        {
            "name": "alerts",
            "source_bucket": images,
            "pattern": "{task_type}/{task_id}/{filename}",
            "target_bucket": alerts,
            "target": "{task_type}/{task_id}/{filename}",
            "order_key": "{task_id}",
        },
        {
            "name": "finished-uploads",
            "source_bucket": uploads,
            "pattern": "incoming/{task_id}/{filename:path}",
            "target_bucket": uploads,
            "target": "done/{task_id}/{filename}",
            "order_key": "{task_id}",
            "on_conflict": "skip",
        },
    ]


def bounded_http() -> urllib3.PoolManager:
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=5.0, read=30.0), retries=urllib3.Retry(total=1)
    )


@dataclass(frozen=True)
class ServiceUser:
    access_key: str
    secret_key: str
    policy_name: str
    buckets: dict[str, str]  # example bucket name -> this test's bucket

    def client(self, minio: MinioStack) -> Minio:
        return Minio(
            minio.endpoint,
            access_key=self.access_key,
            secret_key=self.secret_key,
            secure=False,
            http_client=bounded_http(),
        )

    def env(self) -> dict[str, str]:
        return {"REACTOR_MINIO_ACCESS_KEY": self.access_key, "REACTOR_MINIO_SECRET_KEY": self.secret_key}


@pytest.fixture
def service_user(minio: MinioStack, buckets: BucketNames) -> Iterator[ServiceUser]:
    """A MinIO user with exactly the shipped policy (this test's buckets substituted); removed afterwards."""
    admin = MinioAdmin(
        endpoint=minio.endpoint,
        credentials=StaticProvider(minio.access_key, minio.secret_key),
        secure=False,
        http_client=bounded_http(),
    )
    names = {"images": buckets("lp-img"), "alerts": buckets("lp-alr"), "uploads": buckets("lp-upl")}
    user = ServiceUser(
        access_key=f"reactor-svc-{secrets.token_hex(4)}",
        secret_key=secrets.token_urlsafe(24),
        policy_name=f"reactor-{secrets.token_hex(4)}",
        buckets=names,
    )
    admin.policy_add(user.policy_name, policy=render_policy(names))
    try:
        admin.user_add(user.access_key, user.secret_key)
        try:
            admin.attach_policy([user.policy_name], user=user.access_key)
            yield user
        finally:
            admin.user_remove(user.access_key)
    finally:
        admin.policy_remove(user.policy_name)
    assert user.policy_name not in json.loads(admin.policy_list())


def test_the_shipped_policy_grants_exactly_what_the_example_rules_need() -> None:
    """docker/minio-policy.json follows examples/rules.toml: change one, and this says to change the other."""
    policy = json.loads(POLICY_FILE.read_text(encoding="utf-8"))
    rules = load_rules(REPO_ROOT / "examples" / "rules.toml")
    arn = "arn:aws:s3:::"
    expected = {
        "SourceBucketsListListenAndSubscribe": {f"{arn}{b}" for b in rules.source_buckets},
        "SourceObjectsReadAndDelete": {f"{arn}{r.source_bucket}/{r.prefix}*" for r in rules.rules},
        "TargetBucketsList": {f"{arn}{r.target_bucket}" for r in rules.rules},
        "TargetObjectsWriteAndVerify": {
            f"{arn}{r.target_bucket}/{r.target.split('{', 1)[0]}*" for r in rules.rules
        },
    }
    statements = {st["Sid"]: st for st in policy["Statement"]}
    assert policy["Version"] == "2012-10-17"
    assert {sid: set(st["Resource"]) for sid, st in statements.items()} == expected
    assert {sid: set(st["Action"]) for sid, st in statements.items()} == {
        "SourceBucketsListListenAndSubscribe": {
            "s3:ListBucket", "s3:ListBucketVersions", "s3:GetBucketVersioning", "s3:GetBucketLocation",
            "s3:ListenBucketNotification", "s3:GetBucketNotification", "s3:PutBucketNotification",
        },
        "SourceObjectsReadAndDelete": {
            "s3:GetObject", "s3:GetObjectVersion", "s3:DeleteObject", "s3:DeleteObjectVersion"
        },
        "TargetBucketsList": {"s3:ListBucket", "s3:GetBucketLocation"},
        "TargetObjectsWriteAndVerify": {"s3:PutObject", "s3:GetObject"},
    }  # fmt: skip
    for statement in policy["Statement"]:
        assert set(statement) == {"Sid", "Effect", "Action", "Resource"}, statement["Sid"]
        assert statement["Effect"] == "Allow"
    named = {_ARN.match(r)["bucket"] for st in policy["Statement"] for r in st["Resource"]}  # type: ignore[index]
    assert named == set(EXAMPLE_BUCKETS)


def test_the_reactor_moves_everything_as_a_user_with_only_the_shipped_policy(
    tmp_path: Path,
    minio: MinioStack,
    database_url: str,
    service_user: ServiceUser,
    spawn_reactor: ReactorSpawner,
) -> None:
    images, alerts, uploads = (service_user.buckets[b] for b in EXAMPLE_BUCKETS)
    rules = write_rules(tmp_path / "rules.toml", *example_rules(images, alerts, uploads))
    # Given the buckets created and subscribed by `reactor setup` as the admin, the source versioned
    admin_env = reactor_env(minio, database_url=database_url, rules_path=rules)
    run_cli(["setup"], env=admin_env, check=True)
    admin = minio.client()
    admin.set_bucket_versioning(images, VersioningConfig(ENABLED))
    # And `reactor setup` as the service user then finds nothing to change (it may read and renew
    # the subscriptions, never create a bucket)
    user_env = reactor_env(minio, database_url=database_url, rules_path=rules, env=service_user.env())
    assert run_cli(["setup"], env=user_env, check=True).stdout.strip() == "nothing to change"
    # And a reactor running as the service user on every way in: webhook, listen and sweep
    reactor = spawn_reactor(
        database_url=database_url,
        rules_path=rules,
        http_port=minio.webhook_port,
        env={
            **service_user.env(),
            "REACTOR_LISTEN": "true",
            "REACTOR_RECONCILE_INTERVAL": "1",
            "REACTOR_RECONCILE_GRACE": "0",
        },
    )
    wait_listening(admin, images, reactor.log_text)
    # When the admin uploads images (one multipart, one key twice) and nested files under incoming/
    digests = {
        (images, f"detect/t{i % 2}/{i}.jpg"): put(
            admin, images, f"detect/t{i % 2}/{i}.jpg", os.urandom(300 + i)
        )
        for i in range(8)
    }
    digests[(images, "video/t5/clip.mp4")] = put(
        admin, images, "video/t5/clip.mp4", os.urandom(11 * 1024 * 1024), part_size=5 * 1024 * 1024
    )
    put(admin, images, "detect/t7/twice.jpg", b"first")
    digests[(images, "detect/t7/twice.jpg")] = put(admin, images, "detect/t7/twice.jpg", b"second")
    for i in range(4):
        key = f"incoming/job{i % 2}/raw/cam {i}/f+{i}.bin"
        digests[(uploads, key)] = put(admin, uploads, key, os.urandom(500))
    with nudging(admin, images):
        rows = wait_settled(database_url, len(digests) + 1, timeout=90)
    # Then every upload is at its target with its bytes, the sources are gone, nothing failed
    by_source = {(r["source_bucket"], r["source_key"]): r for r in rows if r["status"] == "done"}
    for (bucket, key), digest in digests.items():
        target_bucket, target_key = (
            (alerts, key) if bucket == images else (uploads, key.replace("incoming/", "done/", 1))
        )
        assert sha256_of(admin, target_bucket, target_key) == digest, (bucket, key)
        assert (bucket, key) in by_source, (bucket, key)
    # (the first upload of the key sent twice may be superseded by the second; nothing else)
    assert {r["source_key"] for r in rows if r["status"] != "done"} <= {"detect/t7/twice.jpg"}, rows
    assert {r["status"] for r in rows} <= {"done", "superseded"}, rows
    assert keys(admin, images) == []
    # (exactly the moved versions were deleted: no version and no delete marker is left behind;
    # the canaries and nudges of the listen helpers leave their own, which do not count)
    left = admin.list_objects(images, recursive=True, include_version=True)
    assert [o.object_name for o in left if not str(o.object_name).startswith("zz-")] == []
    assert keys(admin, uploads, "incoming/") == []
    # And every move succeeded on its first attempt: no step was ever refused
    assert {r["attempts"] for r in history(database_url)} == {1}
    assert sql(
        database_url, "SELECT count(*) AS n FROM reactor.move_events WHERE kind = 'retry_scheduled'"
    ) == [{"n": 0}]
    log = reactor.log_text()
    for refusal in ("AccessDenied", "reconcile_failed", "listen_disconnected", "Traceback"):
        assert refusal not in log, refusal


def _denied(call: Callable[[], object]) -> str:
    """The S3 error code of the call (a listing is consumed, since it is lazy)."""

    def run() -> None:
        result = call()
        if isinstance(result, Iterator):
            list(result)

    with pytest.raises(S3Error) as caught:
        run()
    return str(caught.value.code)


def test_the_service_user_cannot_touch_anything_outside_the_rules(
    tmp_path: Path, minio: MinioStack, database_url: str, buckets: BucketNames, service_user: ServiceUser
) -> None:
    images, alerts, uploads = (service_user.buckets[b] for b in EXAMPLE_BUCKETS)
    rules = write_rules(tmp_path / "rules.toml", *example_rules(images, alerts, uploads))
    run_cli(["setup"], env=reactor_env(minio, database_url=database_url, rules_path=rules), check=True)
    admin = minio.client()
    other = buckets.make("lp-other")
    admin.put_object(other, "secret.txt", io.BytesIO(b"secret"), 6)
    admin.put_object(uploads, "elsewhere/x.bin", io.BytesIO(b"x"), 1)
    admin.put_object(alerts, "detect/t1/moved.jpg", io.BytesIO(b"m"), 1)
    user = service_user.client(minio)

    # A bucket no rule names: no put, get, stat, delete or list
    assert _denied(lambda: user.put_object(other, "new.txt", io.BytesIO(b"n"), 1)) == "AccessDenied"
    assert _denied(lambda: user.get_object(other, "secret.txt")) == "AccessDenied"
    assert _denied(lambda: user.stat_object(other, "secret.txt")) == "AccessDenied"
    assert _denied(lambda: user.remove_object(other, "secret.txt")) == "AccessDenied"
    assert _denied(lambda: user.list_objects(other, recursive=True)) == "AccessDenied"
    assert _denied(lambda: user.make_bucket(buckets("lp-new"))) == "AccessDenied"
    # (MinIO answers ListBuckets without s3:ListAllMyBuckets with the buckets the user may touch)
    assert {b.name for b in user.list_buckets()} == {images, alerts, uploads}
    # Sources are read and deleted, never written; targets written and read, never deleted
    assert (
        _denied(lambda: user.put_object(images, "detect/t1/forged.jpg", io.BytesIO(b"f"), 1))
        == "AccessDenied"
    )
    assert _denied(lambda: user.remove_object(alerts, "detect/t1/moved.jpg")) == "AccessDenied"
    # In a bucket that is both (uploads), only the rules' prefixes: incoming/ as source, done/ as target
    assert _denied(lambda: user.get_object(uploads, "elsewhere/x.bin")) == "AccessDenied"
    assert _denied(lambda: user.remove_object(uploads, "elsewhere/x.bin")) == "AccessDenied"
    assert (
        _denied(lambda: user.put_object(uploads, "incoming/t1/x.bin", io.BytesIO(b"f"), 1)) == "AccessDenied"
    )
    assert _denied(lambda: user.remove_object(uploads, "done/t1/x.bin")) == "AccessDenied"
    # Nor may it change what the buckets are
    assert _denied(lambda: user.set_bucket_versioning(images, VersioningConfig(ENABLED))) == "AccessDenied"
    assert _denied(lambda: user.delete_bucket_notification(other)) == "AccessDenied"
    assert _denied(lambda: user.remove_bucket(alerts)) == "AccessDenied"
    # Everything is where the admin left it
    assert keys(admin, other) == ["secret.txt"]
    assert keys(admin, alerts) == ["detect/t1/moved.jpg"]
    assert keys(admin, uploads) == ["elsewhere/x.bin"]
    # And `reactor setup` as this user cannot create a missing bucket: it says so, without a traceback
    missing = buckets("lp-missing")
    extra = {
        "name": "more",
        "source_bucket": images,
        "pattern": "more/{f}",
        "target_bucket": missing,
        "target": "{f}",
    }
    more = write_rules(tmp_path / "more.toml", *example_rules(images, alerts, uploads), extra)
    result = run_cli(
        ["setup"], env=reactor_env(minio, database_url=database_url, rules_path=more, env=service_user.env())
    )
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr
    assert "AccessDenied" in result.stderr
