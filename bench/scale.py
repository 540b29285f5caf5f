"""Scale-out bench (run by hand): the metadata apply of one and two mirror replicas on PostgreSQL
state against a bare kafka-python consume of the same backlog, and the pause when one of two
replicas is killed under load. Everything is measured in one run on the local stack.

    .venv/bin/python bench/scale.py [--events 300000] [--partitions 4] [--batch-records 2000]
                                    [--kill-rate 3000] [--phases consume,one,two,kill]

Starts the local stack (devtools.stack.up: two Apache Kafka brokers, PostgreSQL, no cache nodes) in
a temp run dir and stops it in `finally`. Each phase has a topic, a consumer group and a PostgreSQL
schema of its own; events are metadata puts (route lidar/), distinct keys.

  consume  bare kafka-python: a consumer with the mirror's client settings polls the backlog and
           counts the messages (the ceiling of any consumer in one Python process)
  one      one Mirror process applies the backlog into PostgreSQL state
  two      two Mirror processes (one consumer group) apply a backlog of the same size
  kill     two `xdc mirror run --follow` processes under a paced load; one is killed with SIGKILL;
           the pause is the time from the kill until every partition is applied again (the
           survivor takes the dead replica's partitions once its session times out: 6 s)

The rate phases are gated: the consumers join the group on an empty topic, stop polling (they stay
members: heartbeats go on), the backlog is produced, then all start together; the clock runs from
the start until the state (or the bare consumers' count) holds every event. Prints each rate, the
ratios the issue sets goals for (one/consume >= 0.5, two/one >= 1.5, pause < 10 s) and MET/MISSED.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import yaml  # noqa: E402

from devtools import postgres, stack  # noqa: E402
from devtools.procs import stop_groups  # noqa: E402
from xdc.config import XdcConfig, parse_config  # noqa: E402
from xdc.events import encode_notification, message_key, new_sequencer, s3_record  # noqa: E402
from xdc.io.kafka import ensure_topics, make_producer  # noqa: E402
from xdc.topology import Topology  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SRC = "idca-drive"
GOALS = {"one_vs_consume": 0.5, "two_vs_one": 1.5, "pause_s": 10.0}


# -- phase configs ------------------------------------------------------------------------------
def phase_config(cfg: XdcConfig, name: str, pg_port: int) -> dict[str, Any]:
    """The stack's config with an events topic, a consumer group and a state schema of this phase."""
    data = cfg.model_dump(mode="json", exclude={"base_dir"})
    data["mirror"]["group_id"] = f"scale-{name}"
    schema = f"scale_{name}"
    postgres.create_schema(pg_port, "xdc_b", schema)
    for dc, d in data["datacenters"].items():
        d["kafka"]["topics"] = {"events": f"scale.{name}.events", "applied": f"scale.{name}.applied",
                                "releases": f"scale.{name}.releases", "dead_letter": f"scale.{name}.dlq"}
        if dc == "B":
            d["state_url"] = postgres.url(pg_port, "xdc_b", schema=schema)
    pcfg = parse_config(data, base_dir=cfg.base_dir)
    for dc in pcfg.datacenters:
        k = pcfg.dc(dc).kafka
        ensure_topics(list(k.bootstrap_servers), list(k.topics.model_dump().values()), k.partitions)
    return data


def _env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k.startswith("XDC_")}


# -- producing ----------------------------------------------------------------------------------
def _produce_proc(boot: list[str], topic: str, first: int, count: int, tag: str) -> None:
    p = make_producer(boot, acks=1, enable_idempotence=False, linger_ms=20, batch_size=512 * 1024)
    try:
        t = time.time()
        for i in range(first, first + count):
            key = f"lidar/{tag}/{i:09d}.bin"
            rec = s3_record("put", SRC, key, size=4096, etag="e" * 32, sequencer=new_sequencer(), event_time=t)
            p.send(topic, key=message_key(SRC, key), value=encode_notification([rec]))
        p.flush(timeout=120)
    finally:
        p.close(timeout=10)


def produce_backlog(ctx: Any, cfg: XdcConfig, topic: str, events: int, tag: str, procs: int = 2) -> float:
    """`events` metadata puts, distinct keys, from `procs` producer processes; returns seconds."""
    boot = list(cfg.dc("A").kafka.bootstrap_servers)
    t0 = time.monotonic()
    share = events // procs
    ps = [ctx.Process(target=_produce_proc, args=(boot, topic, i * share, share if i < procs - 1 else events - i * share,
                                                   tag)) for i in range(procs)]
    for p in ps:
        p.start()
    for p in ps:
        p.join()
        if p.exitcode != 0:
            raise SystemExit(f"producer exited with {p.exitcode}")
    return time.monotonic() - t0


# -- the gated consumers (children) -------------------------------------------------------------
def _mirror_child(data: dict[str, Any], base_dir: str, env: dict[str, str], idx: int, q: Any, joined: Any,
                  go: Any, stop: Any, profile: str | None = None) -> None:
    from mirror.runner import Mirror
    from xdc.metrics import Metrics, new_registry
    os.environ.update(env)
    cfg = parse_config(data, base_dir=Path(base_dir))
    with Topology(cfg, "B") as topo, Mirror(topo, metrics=Metrics(new_registry())) as m:
        m.on_assigned = lambda src, parts, consumer: q.put((idx, "assigned", sorted(p.partition for p in parts)))  # type: ignore[method-assign]
        m.run(stop=joined)  # joins the group on the empty topic
        q.put((idx, "paused", None))
        go.wait()
        cpu = time.process_time()
        if profile:
            import cProfile
            prof = cProfile.Profile()
            st = prof.runcall(m.run, stop=stop)
            prof.dump_stats(f"{profile}.{idx}")
        else:
            st = m.run(stop=stop)
        q.put((idx, "done", {**st.to_dict(), "cpu_s": time.process_time() - cpu}))


def _bare_child(data: dict[str, Any], base_dir: str, env: dict[str, str], idx: int, q: Any, joined: Any,
                go: Any, stop: Any, count: Any) -> None:
    from kafka import ConsumerRebalanceListener
    os.environ.update(env)
    cfg = parse_config(data, base_dir=Path(base_dir))
    batch = cfg.mirror.batch_max_records

    class Listener(ConsumerRebalanceListener):
        def on_partitions_revoked(self, revoked: Any) -> None:
            pass

        def on_partitions_assigned(self, assigned: Any) -> None:
            q.put((idx, "assigned", sorted(p.partition for p in assigned)))

    with Topology(cfg, "B") as topo:
        src = topo.site("A")
        c = src.consumer(cfg.mirror.group_id)
        c.subscribe([src.topics.events], listener=Listener())
        while not joined.is_set():
            c.poll(timeout_ms=200, max_records=batch)
        q.put((idx, "paused", None))
        go.wait()
        cpu = time.process_time()
        n = 0
        while not stop.is_set():
            for msgs in c.poll(timeout_ms=200, max_records=batch).values():
                n += len(msgs)
            with count.get_lock():
                count.value = n
        c.close(autocommit=False)
        q.put((idx, "done", {"records": n, "cpu_s": time.process_time() - cpu}))


def gated_phase(ctx: Any, cfg: XdcConfig, pg_port: int, name: str, kind: str, replicas: int,
                events: int, profile: str | None = None) -> dict[str, Any]:
    data = phase_config(cfg, name, pg_port)
    pcfg = parse_config(data, base_dir=cfg.base_dir)
    partitions = pcfg.dc("A").kafka.partitions
    q, joined, go, stop = ctx.Queue(), ctx.Event(), ctx.Event(), ctx.Event()
    counts = [ctx.Value("q", 0) for _ in range(replicas)]
    children = []
    for i in range(replicas):
        args = (data, str(cfg.base_dir), _env(), i, q, joined, go, stop)
        target = _mirror_child if kind == "mirror" else _bare_child
        children.append(ctx.Process(target=target, args=args + ((counts[i],) if kind == "bare" else (profile,))))
    for c in children:
        c.start()
    try:
        _wait_stable(q, replicas, partitions, children)
        joined.set()
        paused = 0
        while paused < replicas:
            idx, what, _ = q.get(timeout=120)
            paused += what == "paused"
        secs = produce_backlog(ctx, pcfg, pcfg.dc("A").kafka.topics.events, events, name)
        print(f"[{name}] backlog of {events} events produced in {secs:.1f}s", flush=True)
        wal0 = _wal_lsn(pcfg) if kind == "mirror" else 0
        with Topology(pcfg, "B") as topo:
            group = topo.here.group("mirror")
            if kind == "mirror":
                def progress() -> int:
                    return sum(topo.here.state.catalog.offsets(group).values())
            else:
                def progress() -> int:
                    return sum(c.value for c in counts)
            t0 = time.monotonic()
            go.set()
            deadline = t0 + 600
            while progress() < events:
                if time.monotonic() > deadline or not all(c.is_alive() for c in children):
                    raise SystemExit(f"[{name}] stuck at {progress()}/{events}")
                time.sleep(0.02)
            took = time.monotonic() - t0
        stop.set()
        stats = {}
        while len(stats) < replicas:
            idx, what, payload = q.get(timeout=120)
            if what == "done":
                stats[idx] = payload
        rate = events / took
        cpu_us = 1e6 * sum(s["cpu_s"] for s in stats.values()) / events
        if kind == "mirror":
            wal = (_wal_lsn(pcfg) - wal0) / events
            sizes = _table_bytes(pcfg)
            print(f"[{name}] PostgreSQL: {wal:,.0f} bytes of WAL per event; objects table "
                  f"{sizes['heap'] / sizes['rows']:,.0f} bytes/row heap + {sizes['indexes'] / sizes['rows']:,.0f} "
                  f"bytes/row indexes ({sizes['rows']:,} rows)", flush=True)
        print(f"[{name}] {replicas} x {kind}: {events} events in {took:.2f}s = {rate:,.0f}/s; "
              f"{cpu_us:.1f} us of CPU per event in the consumer processes", flush=True)
        return {"rate": rate, "seconds": took, "cpu_us": cpu_us, "stats": stats}
    finally:
        stop.set()
        go.set()
        joined.set()
        for c in children:
            c.join(60)
            if c.is_alive():
                c.kill()


def _wait_stable(q: Any, replicas: int, partitions: int, children: list[Any], quiet_s: float = 3.0) -> None:
    """Until every partition has exactly one owner, each replica owns some, and nothing moved for quiet_s."""
    owned: dict[int, list[int]] = {}
    last_change = time.monotonic()
    deadline = last_change + 120
    while True:
        try:
            idx, what, parts = q.get(timeout=0.2)
            if what == "assigned":
                owned[idx] = parts
                last_change = time.monotonic()
        except queue.Empty:
            pass
        flat = [p for ps in owned.values() for p in ps]
        good = (len(owned) == replicas and sorted(flat) == list(range(partitions))
                and all(owned.values()) if replicas <= partitions else len(set(flat)) == partitions)
        if good and time.monotonic() - last_change > quiet_s:
            return
        if time.monotonic() > deadline or not all(c.is_alive() for c in children):
            raise SystemExit(f"the group did not settle: {owned}")


def _wal_lsn(cfg: XdcConfig) -> int:
    """The server's WAL position in bytes (pg_current_wal_lsn)."""
    import psycopg
    with psycopg.connect(cfg.dc("B").state_url) as conn:
        row = conn.execute("SELECT pg_current_wal_lsn() - '0/0'::pg_lsn").fetchone()
    return int(row[0]) if row else 0


def _table_bytes(cfg: XdcConfig) -> dict[str, int]:
    import psycopg
    with psycopg.connect(cfg.dc("B").state_url) as conn:
        conn.execute("ANALYZE objects")
        heap, idx, rows = conn.execute(
            "SELECT pg_table_size('objects'), pg_indexes_size('objects'), (SELECT count(*) FROM objects)").fetchone()  # type: ignore[misc]
    return {"heap": int(heap), "indexes": int(idx), "rows": max(1, int(rows))}


# -- the kill phase -----------------------------------------------------------------------------
def kill_phase(cfg: XdcConfig, pg_port: int, rate: float, run: Path, warmup_s: float = 15.0,
               after_s: float = 15.0) -> dict[str, Any]:
    data = phase_config(cfg, "kill", pg_port)
    pcfg = parse_config(data, base_dir=cfg.base_dir)
    cfg_file = run / "kill.yaml"
    cfg_file.write_text(yaml.safe_dump(data, sort_keys=False))
    topic = pcfg.dc("A").kafka.topics.events
    stop_producing = threading.Event()
    sent = [0]

    def paced() -> None:
        p = make_producer(list(pcfg.dc("A").kafka.bootstrap_servers), linger_ms=5)
        t0, tick = time.monotonic(), 0
        try:
            while not stop_producing.is_set():
                due = t0 + tick * 0.01
                if due > time.monotonic():
                    time.sleep(due - time.monotonic())
                for _ in range(int(rate * 0.01)):
                    key = f"lidar/kill/{sent[0]:09d}.bin"
                    rec = s3_record("put", SRC, key, size=1, etag="e", sequencer=new_sequencer(), event_time=time.time())
                    p.send(topic, key=message_key(SRC, key), value=encode_notification([rec]))
                    sent[0] += 1
                tick += 1
            p.flush(timeout=60)
        finally:
            p.close(timeout=10)

    logs = [run / f"replica-{i}.log" for i in range(2)]
    procs: list[subprocess.Popen[bytes]] = []
    producer = threading.Thread(target=paced, name="paced")
    with Topology(pcfg, "B") as topo:
        cat, group = topo.here.state.catalog, topo.here.group("mirror")
        try:
            for log in logs:
                with open(log, "ab") as out:
                    procs.append(subprocess.Popen(
                        [sys.executable, "-m", "xdc.app.cli", "--config", str(cfg_file), "--dc", "B", "mirror", "run",
                         "--follow"], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                        start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}))
            producer.start()
            time.sleep(warmup_s)
            owners = [_assigned(log) for log in logs]
            print(f"[kill] before the kill: replica 0 owns {owners[0]}, replica 1 owns {owners[1]}", flush=True)
            before = cat.offsets(group)
            victim = procs[1]
            t_kill = time.monotonic()
            os.killpg(victim.pid, signal.SIGKILL)
            victim.wait(10)
            resumed: dict[tuple[str, int], float] = {}
            while len(resumed) < len(before) and time.monotonic() - t_kill < 120:
                now = cat.offsets(group)
                t = time.monotonic()
                for tp, off in now.items():
                    if tp not in resumed and off > before.get(tp, 0):
                        resumed[tp] = t - t_kill
                time.sleep(0.02)
            time.sleep(after_s)
            stop_producing.set()
            producer.join(60)
            deadline = time.monotonic() + 120
            while sum(cat.offsets(group).values()) < sent[0] and time.monotonic() < deadline:
                time.sleep(0.2)
            applied = sum(cat.offsets(group).values())
        finally:
            stop_producing.set()
            stop_groups(procs)
        pause = max(resumed.values()) if len(resumed) == len(before) else float("inf")
        survivor_owns = _assigned(logs[0])
        rows = cat.counts()["objects"]
    print(f"[kill] per partition, seconds from the kill to the next apply: "
          f"{ {f'{t}[{p}]': round(s, 2) for (t, p), s in sorted(resumed.items())} }")
    print(f"[kill] survivor owns {survivor_owns}; pause {pause:.2f}s; sent {sent[0]}, offsets applied {applied}, "
          f"catalog rows {rows}", flush=True)
    return {"pause_s": pause, "sent": sent[0], "applied": applied, "rows": rows}


def _assigned(log: Path) -> str:
    lines = [ln for ln in log.read_text(errors="replace").splitlines() if ": assigned " in ln]
    return lines[-1].split(": assigned ", 1)[1] if lines else "nothing"


# -- main -----------------------------------------------------------------------------------------
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=300_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--batch-records", type=int, default=2000)
    ap.add_argument("--batch-seconds", type=float, default=0.05)
    ap.add_argument("--kill-rate", type=float, default=3000, help="events/s offered in the kill phase")
    ap.add_argument("--phases", default="consume,one,two,kill")
    ap.add_argument("--profile", help="cProfile each mirror process of the rate phases into FILE.<phase>.<n>")
    args = ap.parse_args()
    phases = args.phases.split(",")

    run = Path(tempfile.mkdtemp(prefix="xdc-bench-scale-"))
    ctx = mp.get_context("spawn")
    try:
        t = time.monotonic()
        cfg = stack.up(run, nodes=0, state="postgres", config_overrides={
            "mirror": {"batch_max_records": args.batch_records, "batch_max_seconds": args.batch_seconds},
            "datacenters": {dc: {"kafka": {"partitions": args.partitions}} for dc in ("A", "B")}})
        pg_port = int(cfg.dc("B").state_url.split(":")[2].split("/")[0])
        print(f"stack up in {time.monotonic() - t:.1f}s ({run}); {args.partitions} partitions, "
              f"batches of {args.batch_records}; {os.cpu_count()} cores", flush=True)
        r: dict[str, Any] = {}
        if "consume" in phases:
            r["consume"] = gated_phase(ctx, cfg, pg_port, "consume", "bare", 1, args.events)
        if "one" in phases:
            r["one"] = gated_phase(ctx, cfg, pg_port, "one", "mirror", 1, args.events,
                                   args.profile and f"{args.profile}.one")
        if "two" in phases:
            r["two"] = gated_phase(ctx, cfg, pg_port, "two", "mirror", 2, args.events,
                                   args.profile and f"{args.profile}.two")
        if "kill" in phases:
            r["kill"] = kill_phase(cfg, pg_port, args.kill_rate, run)

        print("\nsummary")
        for k in ("consume", "one", "two"):
            if k in r:
                print(f"  {k:8s} {r[k]['rate']:>10,.0f} events/s")
        if "consume" in r and "one" in r:
            x = r["one"]["rate"] / r["consume"]["rate"]
            print(f"  one replica / bare consume = {x:.2f} (goal >= {GOALS['one_vs_consume']}, stretch 0.8): "
                  f"{'MET' if x >= GOALS['one_vs_consume'] else 'MISSED'}")
        if "one" in r and "two" in r:
            x = r["two"]["rate"] / r["one"]["rate"]
            print(f"  two replicas / one = {x:.2f} (goal >= {GOALS['two_vs_one']}): "
                  f"{'MET' if x >= GOALS['two_vs_one'] else 'MISSED'}")
        if "kill" in r:
            p = r["kill"]["pause_s"]
            print(f"  pause after kill -9 of one of two replicas = {p:.2f}s (goal < {GOALS['pause_s']:g}s, "
                  f"session timeout {cfg.dc('A').kafka.session_timeout_ms / 1000:g}s): "
                  f"{'MET' if p < GOALS['pause_s'] else 'MISSED'}")
        return 0
    finally:
        stack.down(run)


if __name__ == "__main__":
    sys.exit(main())
