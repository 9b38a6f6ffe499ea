"""`reactor setup`: create the buckets the rules name and subscribe sources to the webhook ARN."""

from __future__ import annotations

import urllib3
from minio import Minio
from minio.error import MinioException, S3Error
from minio.notificationconfig import NotificationConfig, PrefixFilterRule, QueueConfig

from reactor.errors import ReactorError
from reactor.rules import RuleSet

# Uploads only: s3:ObjectCreated:* would also fire on tagging, retention and legal-hold changes.
SUBSCRIBED_EVENTS = (
    "s3:ObjectCreated:Put",
    "s3:ObjectCreated:Post",
    "s3:ObjectCreated:CompleteMultipartUpload",
    "s3:ObjectCreated:Copy",
)
CONFIG_ID_PREFIX = "reactor-"


def _queue_signature(config: QueueConfig) -> tuple[str, tuple[str, ...], str]:
    prefix = config.prefix_filter_rule.value if config.prefix_filter_rule else ""
    return (config.queue or "", tuple(sorted(config.events)), prefix)


def setup(client: Minio, rules: RuleSet, arn: str | None) -> list[str]:
    """Idempotent: returns what it changed, one line each (empty when nothing was to do)."""
    changes: list[str] = []
    try:
        for bucket in sorted(rules.buckets):
            if not client.bucket_exists(bucket):
                client.make_bucket(bucket)
                changes.append(f"created bucket {bucket}")
        if arn:
            for bucket in sorted(rules.source_buckets):
                if _subscribe(client, bucket, rules.prefixes(bucket), arn):
                    changes.append(f"subscribed {bucket} (prefixes {list(rules.prefixes(bucket))}) to {arn}")
    except ReactorError:
        raise
    except S3Error as exc:
        hint = ""
        if "ARN" in (exc.code or "") or "arn" in str(exc).lower():
            hint = (
                "; the ARN must name a target configured on the MinIO server "
                "(MINIO_NOTIFY_WEBHOOK_ENABLE_<ID>=on ...), e.g. arn:minio:sqs::<ID>:webhook"
            )
        raise ReactorError(f"setup failed: MinIO answered {exc.code}: {exc.message}{hint}") from exc
    except (MinioException, urllib3.exceptions.HTTPError, OSError) as exc:
        raise ReactorError(
            f"setup failed: cannot talk to MinIO ({type(exc).__name__}: {exc}); check REACTOR_MINIO_ENDPOINT "
            "and REACTOR_MINIO_SECURE"
        ) from None
    return changes


def _subscribe(client: Minio, bucket: str, prefixes: tuple[str, ...], arn: str) -> bool:
    current = client.get_bucket_notification(bucket)
    foreign = [q for q in current.queue_config_list if not (q.config_id or "").startswith(CONFIG_ID_PREFIX)]
    mine_now = sorted(
        _queue_signature(q)
        for q in current.queue_config_list
        if (q.config_id or "").startswith(CONFIG_ID_PREFIX)
    )
    wanted = [
        QueueConfig(
            queue=arn,
            events=list(SUBSCRIBED_EVENTS),
            config_id=f"{CONFIG_ID_PREFIX}{i}",
            prefix_filter_rule=PrefixFilterRule(prefix) if prefix else None,
        )
        for i, prefix in enumerate(prefixes)
    ]
    if mine_now == sorted(_queue_signature(q) for q in wanted):
        return False
    client.set_bucket_notification(
        bucket,
        NotificationConfig(
            cloud_func_config_list=current.cloud_func_config_list,
            queue_config_list=[*foreign, *wanted],
            topic_config_list=current.topic_config_list,
        ),
    )
    return True
