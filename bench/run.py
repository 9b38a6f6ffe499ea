"""`make bench` / `python -m bench.run [--quick] [--rows ...] [--workloads ...]`.

Starts its own PostgreSQL and MinIO on loopback free ports, runs every selected row on every selected
workload, then the claim-path micro benchmark; prints the tables and writes them, with the machine, the
versions, the date and the parameters, to bench/results/latest.md (--quick: bench/results/quick.md).
Everything it starts is stopped at the end, whatever happens.
"""

from __future__ import annotations

import argparse
import datetime as dt
import shlex
import shutil
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from minio import Minio

from bench import claim, procr
from bench.baselines import run_raw, run_seed, run_serial
from bench.common import RowResult, Workload, empty_bucket, s3_client, workloads
from bench.reactor_rows import MODES, run_reactor_row
from bench.services import BenchMinio, machine, start_minio, start_postgres, versions
from reactor.devstack import TEST_PG_SETTINGS, PostgresServer, StackError
from reactor.objectstore import MinioStore

ROWS = ("raw", "seed", "serial", "procrastinate", "listen", "webhook", "webhook-queue", "x3")
ROW_LABEL = {
    "raw": "raw",
    "seed": "seed-style",
    "serial": "serial",
    "procrastinate": "procrastinate",
    **{name: mode.row for name, mode in MODES.items()},
}
RESULTS = Path(__file__).resolve().parent / "results"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="counts / 10 (smoke run); writes quick.md")
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma list of {','.join(ROWS)}")
    parser.add_argument("--workloads", default="spread,one-task,big,steady", help="comma list")
    parser.add_argument(
        "--concurrency", type=int, default=8, help="moves at once (raw threads, REACTOR_CONCURRENCY)"
    )
    parser.add_argument(
        "--timeout", type=float, default=None, help="seconds per row and workload (240; quick 180)"
    )
    parser.add_argument("--no-claim", action="store_true", help="skip the claim-path micro benchmark")
    parser.add_argument("--claim-only", action="store_true", help="only the claim-path micro benchmark")
    parser.add_argument("--claim-seconds", type=float, default=None, help="per claim run (10; quick 3)")
    parser.add_argument("--claim-threads", type=int, default=4)
    parser.add_argument("--claim-batch", type=int, default=64, help="moves claimed per round trip")
    parser.add_argument(
        "--procrastinate-poll",
        type=float,
        default=1.0,
        help="procrastinate fetch_job_polling_interval (its default is 5; 1 = the reactor's fallback poll)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the state dir (data, logs)")
    parser.add_argument("--output", type=Path, default=None, help="results file")
    parser.add_argument("extra", nargs="*", help=argparse.SUPPRESS)  # tolerate an empty "$(BENCH_ARGS)"
    return parser


def _say(text: str = "") -> None:
    print(text, flush=True)


def _fmt(value: float | None, spec: str = ".0f") -> str:
    return "—" if value is None else format(value, spec)


def results_table(results: Sequence[RowResult]) -> str:
    raw = {r.workload: r.moves_per_s for r in results if r.row == "raw" and r.moves_per_s}
    lines = [
        "| workload | row | moved | moves/s | vs raw | p50 ms | p95 ms | p99 ms | DB xacts/move | "
        "DB stmts/move | CPU s/1k moves | peak RSS MiB | notes |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        ratio = r.moves_per_s / raw[r.workload] if r.moves_per_s and raw.get(r.workload) else None
        ms = [None if (p := r.percentile(q)) is None else p * 1000 for q in (50, 95, 99)]
        per_move = r.db_xacts / r.moved if r.db_xacts is not None and r.moved else None
        cpu = r.cpu_seconds * 1000 / r.moved if r.cpu_seconds is not None and r.moved else None
        rss = r.peak_rss_kib / 1024 if r.peak_rss_kib else None
        stmts = sum(r.statements.values()) / r.moved if r.statements is not None and r.moved else None
        if r.db_xacts == 0 and r.statements is None:
            stmts = 0.0
        lines.append(
            f"| {r.workload} | {r.row} | {r.moved}/{r.count} | {_fmt(r.moves_per_s, '.1f')} | "
            f"{_fmt(ratio, '.2f')} | {_fmt(ms[0])} | {_fmt(ms[1])} | {_fmt(ms[2])} | "
            f"{_fmt(per_move, '.1f')} | {_fmt(stmts, '.1f')} | {_fmt(cpu, '.1f')} | {_fmt(rss)} | "
            f"{'; '.join(r.notes)} |"
        )
    return "\n".join(lines)


def ingestion_table(results: Sequence[RowResult]) -> str:
    lines = [
        "| workload | row | events/s enqueued (first to last enqueue) | webhook handler p50 ms | "
        "handler mean ms | POSTs answered 200 | last enqueue - last upload s |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if not r.row.startswith("reactor"):
            continue
        x = r.extra
        lines.append(
            f"| {r.workload} | {r.row} | {_fmt(x.get('ingest_per_s'))} | "
            f"{_fmt(x.get('handler_p50_ms'), '.2f')} | "
            f"{_fmt(x.get('handler_mean_ms'), '.2f')} | {_fmt(x.get('webhook_posts'))} | "
            f"{_fmt(x.get('ingest_lag_s'), '.2f')} |"
        )
    return "\n".join(lines)


METHOD = """\
How each column is measured (all on this one machine, one clock):
- moved: targets present and sources gone, checked by listing both buckets after the row.
- moves/s: moves finished / (last source removed - first upload started). Reactor rows: max(finished_at)
  from reactor.move_history; procrastinate: its 'succeeded' event; raw and seed-style: the mover's clock.
- p50/p95/p99: from the upload's PUT returning (uploader's clock) to the source removed (same sources).
- vs raw: moves/s divided by raw's on the same workload.
- DB xacts/move: pg_stat_database (xact_commit + xact_rollback) delta of the row's own database, minus
  the bench's own polling queries, per move. It includes start-up, shutdown and the background jobs
  (poll every 1 s, lease recovery, the reconcile sweep at start), which weigh more on small runs.
- DB stmts/move: statements the clients sent (pg_stat_statements, track=top, BEGIN and COMMIT
  included), minus the bench's own, per move: the closest measure of round trips (the reactor runs
  autocommit statements without pool pre-ping, so none are hidden). "—" without pg_stat_statements.
- CPU s/1k moves: utime + stime (/proc/<pid>/stat) of all reactor (or procrastinate worker) processes,
  from ready to the last move finished, per 1,000 moves. raw and seed-style: CPU of their mover threads
  (time.thread_time), which run inside the bench process.
- peak RSS: VmHWM of the largest reactor (or procrastinate worker) process.
- serial: one thread running reactor.mover.Mover on each upload in arrival order (the one-task ceiling
  of any strictly ordered, verifying mover).
- raw, seed-style and serial get each upload in-process the moment its PUT returns; reactor rows get it via
  MinIO (listen stream or webhook); procrastinate gets it from a defer() in the uploader thread.
- Listen rows: while waiting for the last moves the bench uploads 5 tiny non-matching objects per second
  ("nudges"), because MinIO sends a listen stream in batches of some KiB and the tail of a burst would
  otherwise wait for more traffic (see README, Listen).
"""


def statements_breakdown(results: Sequence[RowResult]) -> list[str]:
    """Where the round trips of one reactor row go: statements per move, most frequent first."""
    picks = [r for r in results if r.row == MODES["webhook"].row and r.statements and r.moved]
    picks = picks or [r for r in results if r.row.startswith("reactor") and r.statements and r.moved]
    if not picks:
        return []
    r = max(picks, key=lambda x: x.moved)
    statements = r.statements or {}
    out = [
        f"## Statements per move: {r.row}, {r.workload} ({r.moved} moves, pg_stat_statements)",
        "",
        "| calls/move | statement |",
        "|---:|---|",
    ]
    for query_text, calls in sorted(statements.items(), key=lambda kv: -kv[1])[:12]:
        one_line = " ".join(query_text.split())
        one_line = one_line[:100] + ("..." if len(one_line) > 100 else "")
        out.append(f"| {calls / r.moved:.2f} | `{one_line.replace('|', '/')}` |")
    return [*out, ""]


def _names(tag: str, row: str, workload: str) -> tuple[str, str, str]:
    slug = row.replace("_", "-")
    db = f"bench_{tag}_{slug}_{workload}".replace("-", "_")
    return db, f"{slug}-{workload}-src-{tag}", f"{slug}-{workload}-dst-{tag}"


def _run_row(
    row: str,
    wl: Workload,
    *,
    pg: PostgresServer,
    minio: BenchMinio,
    client: Minio,
    root: Path,
    tag: str,
    concurrency: int,
    timeout: float,
    statements: bool,
    procrastinate_poll: float,
) -> RowResult:
    names = _names(tag, row, wl.name)
    _db, source, target = names
    deadline = time.monotonic() + timeout
    try:
        if row in ("raw", "seed", "serial"):
            client.make_bucket(source)
            client.make_bucket(target)
            if row == "raw":
                return run_raw(client, source, target, wl, concurrency=concurrency, deadline=deadline)
            if row == "serial":
                server = minio.server
                store = MinioStore(
                    endpoint=server.endpoint, access_key=server.access_key, secret_key=server.secret_key
                )
                return run_serial(client, store, source, target, wl, deadline=deadline)
            return run_seed(client, source, target, wl, deadline=deadline)
        if row == "procrastinate":
            client.make_bucket(source)
            client.make_bucket(target)
            return procr.run_procrastinate_row(
                wl,
                pg=pg,
                minio=minio,
                client=client,
                root=root,
                names=names,
                concurrency=concurrency,
                deadline=deadline,
                statements=statements,
                poll_interval=procrastinate_poll,
            )
        return run_reactor_row(
            MODES[row],
            wl,
            pg=pg,
            minio=minio,
            client=client,
            root=root,
            names=names,
            concurrency=concurrency,
            deadline=deadline,
            statements=statements,
        )
    except Exception as exc:
        failed = RowResult(row=ROW_LABEL[row], workload=wl.name, count=wl.count)
        failed.notes.append(f"error: {type(exc).__name__}: {exc}"[:300])
        return failed
    finally:
        for bucket in (source, target):
            if client.bucket_exists(bucket):
                empty_bucket(client, bucket)
        pg.drop_database(names[0])


def main(argv: Sequence[str] | None = None) -> int:  # noqa: PLR0915
    args = _parser().parse_args(argv)
    if any(a.strip() for a in args.extra):
        _parser().error(f"unexpected arguments: {args.extra}")
    rows = [r.strip() for r in args.rows.split(",") if r.strip()]
    unknown = [r for r in rows if r not in ROWS]
    all_workloads = workloads(quick=args.quick)
    chosen = [w.strip() for w in args.workloads.split(",") if w.strip()]
    unknown += [w for w in chosen if w not in all_workloads]
    if unknown:
        _parser().error(f"unknown rows or workloads: {unknown}")
    if args.claim_only:
        rows, chosen = [], []
    timeout = args.timeout or (180.0 if args.quick else 240.0)
    claim_seconds = args.claim_seconds or (3.0 if args.quick else 10.0)
    scale = 10 if args.quick else 1
    output = args.output or RESULTS / ("quick.md" if args.quick else "latest.md")

    if "procrastinate" in rows and not procr.available():
        _say(procr.NOT_INSTALLED)
        rows.remove("procrastinate")

    root = Path(tempfile.mkdtemp(prefix="reactor-bench-"))
    root.chmod(0o755)  # PostgreSQL runs as another OS user when we are root
    tag = root.name.rsplit("-", 1)[-1].lower()[:6].replace("_", "x")
    started_at = dt.datetime.now(dt.UTC)
    host = machine()
    _say(f"--> state in {root}; machine: {host['nproc']} cpu(s) {host['cpu']}, {host['memory']}")
    results: list[RowResult] = []
    claims: list[claim.ClaimResult] = []
    pg: PostgresServer | None = None
    vers: dict[str, str] = {}
    ok = False
    try:
        pg, statements = start_postgres(root)
        vers = versions(pg)
        _say(
            f"--> PostgreSQL {vers['PostgreSQL server']} on port {pg.port} (test-speed settings, "
            f"pg_stat_statements {'on' if statements else 'not available'})"
        )
        groups: list[tuple[str, bool, list[str]]] = [
            ("minio-plain", False, [r for r in rows if r != "webhook-queue"]),
            ("minio-queued", True, [r for r in rows if r == "webhook-queue"]),
        ]
        for name, queued, group_rows in groups:
            if not group_rows or not chosen:
                continue
            minio = start_minio(root, name, queued=queued)
            _say(f"--> MinIO {name} on {minio.server.endpoint}, webhook target -> port {minio.webhook_port}")
            client = s3_client(minio.server)
            try:
                for wl_name in chosen:
                    wl = all_workloads[wl_name]
                    _say(f"--> workload {wl.describe()}")
                    for row in group_rows:
                        t0 = time.monotonic()
                        result = _run_row(
                            row,
                            wl,
                            pg=pg,
                            minio=minio,
                            client=client,
                            root=root,
                            tag=tag,
                            concurrency=args.concurrency,
                            timeout=timeout,
                            statements=statements,
                            procrastinate_poll=args.procrastinate_poll,
                        )
                        results.append(result)
                        p50 = result.percentile(50)
                        _say(
                            f"    {result.row:<28} moved {result.moved}/{result.count}  "
                            f"{_fmt(result.moves_per_s, '.1f')} moves/s  "
                            f"p50 {_fmt(None if p50 is None else p50 * 1000)} ms  "
                            f"({time.monotonic() - t0:.0f}s) {'; '.join(result.notes)}"
                        )
            finally:
                minio.server.stop()
        if not args.no_claim:
            for history in (0, 1_000_000 // scale):
                _say(f"--> claim path: {100_000 // scale:,} pending over 1,000 keys, {history:,} in history")
                r = claim.run_claim_bench(
                    pg,
                    dbname=f"bench_{tag}_claim_{history}",
                    history=history,
                    pending=100_000 // scale,
                    threads=args.claim_threads,
                    batch=args.claim_batch,
                    seconds=claim_seconds,
                )
                claims.append(r)
                _say(
                    f"    {r.moves_per_s:,.0f} moves/s ({r.calls_per_s:,.0f} finish_and_claim round trips/s)"
                )
        ok = True
    except StackError as exc:
        _say(f"bench: error: {exc}")
        return 2
    finally:
        if pg is not None:
            pg.stop()
        if ok and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            _say(f"--> state and logs kept in {root}")

    order = {ROW_LABEL[r]: i for i, r in enumerate(ROWS)}
    wl_order = {w: i for i, w in enumerate(all_workloads)}
    results.sort(key=lambda r: (wl_order.get(r.workload, 99), order.get(r.row, 99)))
    report = render(
        results=results,
        claims=claims,
        host=host,
        vers=vers,
        argv=sys.argv,
        started_at=started_at,
        chosen=[all_workloads[w] for w in chosen],
        concurrency=args.concurrency,
        timeout=timeout,
        claim_args=(args.claim_threads, args.claim_batch, claim_seconds),
        procrastinate_note=(
            f"procrastinate fetch_job_polling_interval {args.procrastinate_poll:g} s"
            if procr.available()
            else procr.NOT_INSTALLED
        ),
    )
    _say()
    _say(report)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(report + "\n")
    _say(f"--> written to {output}")
    return 0


def render(
    *,
    results: Sequence[RowResult],
    claims: Sequence[claim.ClaimResult],
    host: dict[str, str],
    vers: dict[str, str],
    argv: Sequence[str],
    started_at: dt.datetime,
    chosen: Sequence[Workload],
    concurrency: int,
    timeout: float,
    claim_args: tuple[int, int, float],
    procrastinate_note: str | None,
) -> str:
    out: list[str] = [f"# reactor bench, {started_at:%Y-%m-%d %H:%M} UTC", ""]
    out.append(f"Command: `{shlex.join(['python', '-m', 'bench.run', *argv[1:]])}`")
    out.append("")
    out.append("Machine: " + ", ".join(f"{k} {v}" for k, v in host.items()))
    out.append("")
    out.append("Versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    out.append("")
    pg_settings = ", ".join(f"{k}={v}" for k, v in TEST_PG_SETTINGS.items())
    out += [
        "Parameters:",
        f"- concurrency {concurrency} (raw mover threads, REACTOR_CONCURRENCY, procrastinate worker "
        "concurrency)",
        f"- PostgreSQL with the tests' speed settings ({pg_settings}); synchronous_commit on",
        "- MinIO single drive on loopback; webhook rows: target without queue_dir, or with queue_dir and "
        "MINIO_API_SYNC_EVENTS=on (a second MinIO, used only by that row)",
        "- unversioned buckets, single-part uploads; reactor defaults otherwise (poll 1 s, lease 30 s, "
        "reconcile every 60 s with 30 s grace, INFO logs to a file)",
        f"- time limit per row and workload: {timeout:.0f} s",
    ]
    out += [f"- workload {w.describe()}" for w in chosen]
    if procrastinate_note:
        out.append(f"- {procrastinate_note}")
    out += [
        "",
        "Numbers are noisy: 2-core machine, uploader, MinIO, PostgreSQL and the movers share it, and other "
        "jobs may have been running.",
        "",
    ]
    if results:
        out += [
            "## Moves",
            "",
            results_table(results),
            "",
            "## Ingestion (reactor rows)",
            "",
            ingestion_table(results),
            "",
        ]
        out += statements_breakdown(results)
    if claims:
        threads, batch, seconds = claim_args
        out += [
            "## Claim path (Outbox alone, no-op moves)",
            "",
            f"{threads} threads each loop, as the poller's dispatcher does, one round trip "
            f"(reactor.finish_and_claim) that records the moves of its previous round as done and claims "
            f"up to {batch} more, for {seconds:g} s. A move = claimed, then finished (with its audit "
            "events: claimed, done).",
            "",
            claim.CLAIM_HEADER,
            *[claim.summarize(c) for c in claims],
            "",
        ]
        for c in claims:
            out += [
                f"Claim plan with {c.history:,} finished moves in history (the statement inside "
                "reactor.claim_moves, from auto_explain with ANALYZE, rolled back):",
                "",
                "```",
            ]
            out += c.plan
            out += ["```", ""]
    out += ["## Method", "", METHOD]
    return "\n".join(out)


if __name__ == "__main__":
    sys.exit(main())
