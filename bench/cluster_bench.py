#!/usr/bin/env python3
"""
Several nodes on one PostgreSQL (issue 16): drain rate, statements per job,
claim latency, a node's start with a long queue, and status GETs against a
SQLite node's.

It starts its own throwaway PostgreSQL cluster as tests/pg.py does (initdb as
the C{postgres} user, a free loopback port, fsync off), with
C{pg_stat_statements} preloaded, and real C{transcoder serve} nodes on
loopback sharing one temp data dir.

  drain    JOBS jobs of a stream copy of a 1 s clip (ffmpeg -c copy into
           Matroska) are uploaded to a --workers 0 node, which is then
           stopped; then NODES nodes with --workers 1 each drain them (1 and
           3 nodes by default).  Jobs per second: JOBS over the time from the
           first job's start to the last one's end, as the nodes recorded them.
  stmts    pg_stat_statements' calls by the nodes' role in the bench's
           database, from before the first upload until the last job
           succeeded, over JOBS: everything the nodes said (claims that found
           nothing, lease renewals, heartbeats, the 2 s re-checks and the
           re-reads each NOTIFY causes included), with and without
           BEGIN/COMMIT.  The bench's own queries run as another role.
  claim    QUEUED rows (10,000 and 100,000) inserted in one INSERT ... SELECT,
           then VACUUM ANALYZE; CLAIMS calls of PostgresClusterStore.claim on a
           running reactor, each timed from the call to its Deferred firing
           (thread hop included): p50, p99, max; plus the claim SELECT's plan.
  start    a --workers 0 node started on the 100,000-row table: time until
           GET /health answers 200, and its RSS then.
  status   a SQLite node and a PostgreSQL node, each with --workers 1 and
           LOAD_JOBS jobs draining, while THREADS threads GET one job's status
           in a loop for SECONDS: p50 and p99 of each (target: PostgreSQL at
           most twice SQLite).

usage: cluster_bench.py [--jobs 1000] [--nodes 1,3] [--queued 10000,100000]
                        [--claims 2000] [--workdir DIR] [--keep]
needs: ffmpeg, Debian's postgresql package, the project's venv with the
postgres extra (.venv/bin/python).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))

import psycopg  # noqa: E402
from load_test import FAST_PROFILE, Server, make_clip  # noqa: E402
from pg import _as_postgres, _bindir, _free_port, _run  # noqa: E402

FINISHED = ("succeeded", "failed", "cancelled")
BENCH_ROLE = "bench"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))]


# -- PostgreSQL ---------------------------------------------------------------


@contextmanager
def postgres(top: Path) -> Iterator[int]:
    """tests/pg.py's throwaway cluster, with pg_stat_statements preloaded; yields its port."""
    bindir = _bindir()
    if bindir is None:
        raise SystemExit("no PostgreSQL server: apt-get install postgresql")
    if os.geteuid() == 0:
        import pwd

        pw = pwd.getpwnam("postgres")
        os.chown(top, pw.pw_uid, pw.pw_gid)
    data, pglog = top / "pgdata", top / "pg.log"
    _run([str(bindir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres",
          "-E", "UTF8", "--locale", "C.UTF-8", "--no-sync"])  # fmt: skip
    port = _free_port()
    opts = (
        f"-p {port} -k {top} -c listen_addresses=127.0.0.1 -c fsync=off "
        "-c synchronous_commit=off -c full_page_writes=off -c max_connections=200 "
        "-c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.max=10000"
    )
    _run([str(bindir / "pg_ctl"), "-D", str(data), "-l", str(pglog), "-w", "-t", "60",
          "-o", opts, "start"], pglog)  # fmt: skip
    try:
        yield port
    finally:
        subprocess.run(
            _as_postgres([str(bindir / "pg_ctl"), "-D", str(data), "-m", "fast", "stop"]),
            capture_output=True,
            timeout=60,
        )


def dsn(port: int, database: str = "postgres", user: str = "postgres") -> str:
    return f"postgresql://{user}@127.0.0.1:{port}/{database}"


def create_database(port: int, name: str) -> str:
    with psycopg.connect(dsn(port), autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return dsn(port, name)


def statements(port: int, database: str) -> dict[str, int]:
    """Calls per normalized statement made by the nodes' role in C{database}."""
    # The extension lives in the database postgres; its view shows every database.
    with psycopg.connect(dsn(port, user=BENCH_ROLE), autocommit=True) as conn:
        rows = conn.execute(
            "SELECT s.query, s.calls FROM pg_stat_statements s"
            " JOIN pg_roles r ON r.oid = s.userid JOIN pg_database d ON d.oid = s.dbid"
            " WHERE r.rolname = 'postgres' AND d.datname = %s",
            (database,),
        ).fetchall()
    return {q: int(c) for q, c in rows}


def reset_statements(port: int) -> None:
    with psycopg.connect(dsn(port, user=BENCH_ROLE), autocommit=True) as conn:
        conn.execute("SELECT pg_stat_statements_reset()")


# -- nodes --------------------------------------------------------------------


def node(work: Path, store: str, name: str, workers: int, profiles: Path) -> Server:
    return Server(
        sys.executable, work / "data", work / f"{name}.log", "--store", store,
        "--node-name", name, "--workers", str(workers), "--profiles", str(profiles),
        "--min-free-disk", "0", "--max-queued", "200000",
    )  # fmt: skip


def upload(port: int, clip: bytes, count: int) -> list[str]:
    ids = []
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    for i in range(count):
        conn.request("PUT", f"/jobs?profile=copy-fast&filename=q{i}.mp4", body=clip)
        r = conn.getresponse()
        doc = json.loads(r.read())
        if r.status != 201:
            raise SystemExit(f"upload {i}: HTTP {r.status} {doc}")
        ids.append(doc["id"])
    conn.close()
    return ids


def counts(port: int, database: str) -> dict[str, int]:
    with psycopg.connect(dsn(port, database, BENCH_ROLE), autocommit=True) as conn:
        rows = conn.execute("SELECT state, count(*) FROM jobs GROUP BY state").fetchall()
    return {s: int(c) for s, c in rows}


def drain(work: Path, port: int, clip: bytes, profiles: Path, jobs: int, nodes: int) -> dict:
    database = f"drain_{nodes}"
    store = create_database(port, database)
    run = work / database
    run.mkdir()
    # Creates the schema, so that the reset below leaves out only the migrations.
    ingest = node(run, store, "ingest", 0, profiles)
    reset_statements(port)
    t0 = time.monotonic()
    upload(ingest.port, clip, jobs)
    uploaded = time.monotonic() - t0
    ingest.stop()
    log(f"{jobs} jobs uploaded in {uploaded:.1f} s; {nodes} node(s) drain them")
    t1 = time.monotonic()
    servers = [node(run, store, f"enc-{i + 1}", 1, profiles) for i in range(nodes)]
    try:
        while True:
            c = counts(port, database)
            if sum(c.get(s, 0) for s in FINISHED) >= jobs:
                break
            if time.monotonic() - t1 > jobs * 3:
                raise SystemExit(f"the jobs did not finish: {c}")
            time.sleep(0.5)
        stmts = statements(port, database)
        with psycopg.connect(dsn(port, database, BENCH_ROLE), autocommit=True) as conn:
            first, last = conn.execute(
                "SELECT min((record->>'started_at')::float8), max((record->>'finished_at')::float8)"
                " FROM jobs"
            ).fetchone()
            per_node = dict(
                conn.execute("SELECT node, count(*) FROM jobs GROUP BY node").fetchall()
            )
            attempts = conn.execute("SELECT max(attempt) FROM jobs").fetchone()[0]
    finally:
        for s in servers:
            s.stop()
    total = sum(stmts.values())
    tx = sum(n for q, n in stmts.items() if q.strip().upper() in ("BEGIN", "COMMIT", "ROLLBACK"))
    top = sorted(stmts.items(), key=lambda kv: -kv[1])[:8]
    return {
        "nodes": nodes,
        "jobs": jobs,
        "states": c,
        "per_node": per_node,
        "max_attempt": attempts,
        "drain_s": last - first,
        "jobs_per_s": jobs / (last - first),
        "upload_s": uploaded,
        "statements": total,
        "statements_per_job": total / jobs,
        "statements_per_job_no_tx": (total - tx) / jobs,
        "top": [(" ".join(q.split())[:110], n) for q, n in top],
    }


# -- claims -------------------------------------------------------------------

_FILL = """
INSERT INTO jobs (id, seq, state, created_at, record)
SELECT 'b' || g, nextval('jobs_seq'), 'queued', now(),
       jsonb_set(jsonb_set(%s::jsonb, '{id}', to_jsonb('b' || g)), '{seq}', to_jsonb(g))
FROM generate_series(1, %s) g
"""


def fill(port: int, database: str, queued: int) -> None:
    from transcoder.core.jobs import InputFile, Job
    from transcoder.core.postgres import record_json

    job = Job(
        id="x", profile="copy-fast", params={},
        inputs=[InputFile(name="file", filename="q.mp4", path="input-file", size=5000,
                          sha256="0" * 64)],
        created_at=time.time(),
    )  # fmt: skip
    with psycopg.connect(dsn(port, database), autocommit=True) as conn:
        conn.execute(_FILL, (record_json(job), queued))
        conn.execute("VACUUM ANALYZE jobs")


def claim_latency(port: int, sizes: list[int], claims: int) -> list[dict]:
    """The claim measurements for each queue size, in one run of the reactor (it runs once)."""
    from twisted.internet import reactor
    from twisted.internet.defer import ensureDeferred

    from transcoder.core.pgcluster import PostgresClusterStore

    out: list[dict] = []

    async def measure(queued: int) -> None:
        database = f"claims_{queued}"
        store = PostgresClusterStore(create_database(port, database), reactor)  # migrates
        fill(port, database, queued)
        times: list[float] = []
        for _ in range(claims):
            t = time.perf_counter()
            # A lease far away: the node started on this table later requeues nothing.
            job = await store.claim("bench", 36000.0)
            times.append(time.perf_counter() - t)
            assert job is not None
        await store.close()
        with psycopg.connect(dsn(port, database), autocommit=True) as conn:
            plan = conn.execute(
                "EXPLAIN (ANALYZE, BUFFERS) SELECT record::text, attempt FROM jobs"
                " WHERE state = 'queued' ORDER BY priority DESC, seq FOR UPDATE SKIP LOCKED"
                " LIMIT 1"
            ).fetchall()
        ms = [t * 1000 for t in times]
        r = {"queued": queued, "claims": claims, "p50_ms": pct(ms, 50), "p99_ms": pct(ms, 99),
             "max_ms": max(ms), "plan": [row[0] for row in plan], "database": database}  # fmt: skip
        log(json.dumps(r, indent=1))
        out.append(r)

    async def measure_all() -> None:
        for queued in sizes:
            await measure(queued)

    def run() -> None:
        d = ensureDeferred(measure_all())
        d.addErrback(lambda f: f.printTraceback(file=sys.stderr))
        d.addBoth(lambda _: reactor.stop())

    reactor.callWhenRunning(run)
    reactor.run()
    return out


def node_start(work: Path, port: int, database: str, profiles: Path) -> dict:
    run = work / "start"
    run.mkdir()
    t = time.monotonic()
    server = node(run, dsn(port, database), "big", 0, profiles)
    while True:
        try:
            conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                break
        except OSError:
            pass
        time.sleep(0.05)
    took = time.monotonic() - t
    rss = server.status_bytes("VmRSS")
    hwm = server.status_bytes("VmHWM")
    server.stop()
    rows = counts(port, database)
    return {"rows": sum(rows.values()), "start_s": took, "rss_mib": rss / 2**20,
            "peak_mib": hwm / 2**20}  # fmt: skip


# -- status GETs --------------------------------------------------------------


def status_gets(server: Server, job_id: str, threads: int, seconds: float) -> list[float]:
    lat: list[float] = []
    lock = threading.Lock()
    end = time.monotonic() + seconds

    def loop() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=30)
        mine = []
        while time.monotonic() < end:
            t = time.perf_counter()
            conn.request("GET", f"/jobs/{job_id}")
            r = conn.getresponse()
            r.read()
            mine.append((time.perf_counter() - t) * 1000)
            if r.status != 200:
                raise SystemExit(f"GET /jobs/{job_id}: {r.status}")
        with lock:
            lat.extend(mine)

    ts = [threading.Thread(target=loop) for _ in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return lat


def status(work: Path, port: int, clip: bytes, profiles: Path, jobs: int, threads: int,
           seconds: float) -> dict:  # fmt: skip
    out = {}
    for kind in ("sqlite", "postgresql"):
        run = work / f"status-{kind}"
        run.mkdir()
        if kind == "sqlite":
            server = Server(
                sys.executable, run / "data", run / "node.log", "--workers", "1",
                "--profiles", str(profiles), "--min-free-disk", "0", "--max-queued", "5000",
            )  # fmt: skip
        else:
            server = node(run, create_database(port, "status"), "status", 1, profiles)
        try:
            ids = upload(server.port, clip, jobs)
            lat = status_gets(server, ids[-1], threads, seconds)
        finally:
            server.stop()
        out[kind] = {"gets": len(lat), "p50_ms": pct(lat, 50), "p99_ms": pct(lat, 99)}
    out["ratio_p50"] = out["postgresql"]["p50_ms"] / out["sqlite"]["p50_ms"]
    out["ratio_p99"] = out["postgresql"]["p99_ms"] / out["sqlite"]["p99_ms"]
    return out


# -- main ---------------------------------------------------------------------


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--jobs", type=int, default=1000)
    p.add_argument("--nodes", default="1,3")
    p.add_argument("--queued", default="10000,100000")
    p.add_argument("--claims", type=int, default=2000)
    p.add_argument("--status-jobs", type=int, default=200)
    p.add_argument("--threads", type=int, default=8)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--json", type=Path)
    p.add_argument("--workdir", type=Path)
    p.add_argument("--keep", action="store_true")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="transcoder-cluster-", dir=args.workdir))
    cleanup = [work]
    results: dict[str, Any] = {"load_before": os.getloadavg()}
    try:
        clip_path = work / "clip.mp4"
        make_clip(clip_path)
        clip = clip_path.read_bytes()
        profiles = work / "fast.toml"
        profiles.write_text(FAST_PROFILE)
        # Apart from work, which is root's alone: the cluster runs as the postgres user.
        pg = Path(tempfile.mkdtemp(prefix="transcoder-pg-"))
        cleanup.append(pg)
        with postgres(pg) as port:
            with psycopg.connect(dsn(port), autocommit=True) as conn:
                conn.execute(f"CREATE ROLE {BENCH_ROLE} SUPERUSER LOGIN")
                conn.execute("CREATE EXTENSION pg_stat_statements")
            results["drain"] = []
            for n in (int(x) for x in args.nodes.split(",")):
                r = drain(work, port, clip, profiles, args.jobs, n)
                log(json.dumps(r, indent=1))
                results["drain"].append(r)
            results["status"] = status(work, port, clip, profiles, args.status_jobs,
                                       args.threads, args.seconds)  # fmt: skip
            log(json.dumps(results["status"], indent=1))
            sizes = [int(x) for x in args.queued.split(",")]
            results["claims"] = claim_latency(port, sizes, args.claims)
            results["start"] = node_start(work, port, f"claims_{max(sizes)}", profiles)
            log(json.dumps(results["start"], indent=1))
        results["load_after"] = os.getloadavg()
    finally:
        if args.json:
            args.json.write_text(json.dumps(results, indent=1))
        if not args.keep:
            for path in cleanup:
                shutil.rmtree(path, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
