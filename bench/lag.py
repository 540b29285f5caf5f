"""Replication lag bench (run by hand): a steady event stream through the real mirror.

    .venv/bin/python bench/lag.py [--rate 5000] [--seconds 60] [--producers 2] [--state sqlite,postgres]
                                  [--batch-records 2000] [--batch-seconds 0.05] [--profile FILE]

Starts the local stack (devtools.stack.up, no cache nodes, PostgreSQL too) in a temp run dir and
stops it in `finally`. Phases at the same paced rate (metadata mode, route lidar/, event time =
send time), each on a topic and consumer group of its own:
  baseline: a plain group-less consumer only decodes the messages (Kafka's own produce->consume
            latency on this machine, measured in this run)
  mirror:   Mirror(Topology(cfg, "B")).run() in its own process (batch settings from the flags), once
            per state backend of --state; lag taken from the state (applied_time - event_time)
Prints p50/p99/max of each, the mirror's sustained apply rate per backend, p99 vs the goal (500 ms),
and the apply rate of each backend against the first one's. --profile writes a cProfile of the
mirror process (pstats file) and prints the top.
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from devtools import stack  # noqa: E402
from xdc.config import XdcConfig, parse_config  # noqa: E402
from xdc.events import encode_notification, message_key, new_sequencer, s3_record  # noqa: E402
from xdc.io.kafka import ensure_topics, make_producer  # noqa: E402
from xdc.stats import percentile  # noqa: E402
from xdc.topology import Topology  # noqa: E402


def bootstrap(cfg: XdcConfig, dc: str) -> list[str]:
    return list(cfg.dc(dc).kafka.bootstrap_servers)

SRC = "idca-drive"
GOAL_P99_S = 0.5
TICK_S = 0.02  # producers send a batch every 20 ms: "steady" at the scale of the lag measured


def produce_paced(cfg: XdcConfig, topic: str, rate: float, seconds: float, producers: int, tag: str) -> dict[str, float]:
    """`producers` threads, each sending rate/producers events per second in paced ticks."""
    per_tick = rate * TICK_S / producers
    sent = [0] * producers
    late_ticks = [0] * producers

    def run(i: int) -> None:
        p = make_producer(bootstrap(cfg, "A"), acks=1, linger_ms=2, batch_size=256 * 1024)
        try:
            t0 = time.monotonic()
            owed = 0.0
            tick = 0
            while True:
                due = t0 + tick * TICK_S
                now = time.monotonic()
                if due - t0 >= seconds:
                    break
                if due > now:
                    time.sleep(due - now)
                elif now - due > TICK_S:
                    late_ticks[i] += 1
                owed += per_tick
                n = int(owed)
                owed -= n
                for _ in range(n):
                    key = f"lidar/{tag}/{i}-{sent[i]}.bin"
                    rec = s3_record("put", SRC, key, size=4096, etag="e", sequencer=new_sequencer(),
                                    event_time=time.time())
                    p.send(topic, key=message_key(SRC, key), value=encode_notification([rec]))
                    sent[i] += 1
                tick += 1
            p.flush(timeout=60)
        finally:
            p.close(timeout=10)

    t0 = time.monotonic()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(producers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    return {"sent": sum(sent), "seconds": took, "rate": sum(sent) / took, "late_ticks": sum(late_ticks)}


# -- baseline: Kafka alone ----------------------------------------------------------------------
def _baseline_consumer(boot: list[str], topic: str, expect: int, ready: Any, out: Any) -> None:
    import json

    from kafka import KafkaConsumer, TopicPartition

    from xdc.events import parse_time
    c = KafkaConsumer(bootstrap_servers=boot, group_id=None, enable_auto_commit=False,
                      fetch_max_wait_ms=50)
    tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
    c.assign(tps)
    c.seek_to_end()
    for tp in tps:
        c.position(tp)
    ready.set()
    lags: list[float] = []
    deadline = time.monotonic() + 600
    while len(lags) < expect and time.monotonic() < deadline:
        for msgs in c.poll(timeout_ms=200, max_records=5000).values():
            now = time.time()
            for m in msgs:
                ev = json.loads(m.value)["Records"][0]
                lags.append(now - parse_time(ev["eventTime"]))
    c.close()
    out.put(lags)


# -- the mirror, in its own process ---------------------------------------------------------------
def _mirror_proc(cfg_data: dict[str, Any], base_dir: str, env: dict[str, str], stop: Any, ready: Any,
                 profile: str | None) -> None:
    import mirror.runner as runner_mod
    import xdc.io.consume as consume_mod
    from mirror.runner import Mirror
    from xdc.metrics import Metrics, new_registry
    os.environ.update(env)
    cfg = parse_config(cfg_data, base_dir=Path(base_dir))
    with Topology(cfg, "B") as topo, Mirror(topo, metrics=Metrics(new_registry())) as m:
        m.run(once=True)  # join the group and drain whatever is there before the clock starts
        # wall time per phase of the loop (wrappers on the instance / module, this process only)
        phases: dict[str, list[float]] = {}

        def timed(name: str, fn: Any) -> Any:
            def wrapper(*a: Any, **kw: Any) -> Any:
                t = time.perf_counter()
                try:
                    return fn(*a, **kw)
                finally:
                    acc = phases.setdefault(name, [0.0, 0])
                    acc[0] += time.perf_counter() - t
                    acc[1] += 1
            return wrapper
        for c in m._consumers.values():
            c.poll = timed("kafka poll", c.poll)
        backend = topo.here.state.backend
        m.catalog.commit_batch = timed(f"state commit_batch ({backend})", m.catalog.commit_batch)
        m.catalog.get_many = timed(f"state get_many ({backend})", m.catalog.get_many)
        m.flush_outbox = timed("flush_outbox (publish applied)", m.flush_outbox)
        m.loop.handler = m  # the loop calls m.prepare (then its durable part): time it through the instance
        m.prepare = timed("prepare (decide, copy)", m.prepare)  # type: ignore[method-assign]
        m._observe_consumer_lag = timed("consumer lag gauge (committed())", m._observe_consumer_lag)
        consume_mod.commit = timed("kafka offset commit", consume_mod.commit)
        runner_mod.parse_message = timed("parse_message", runner_mod.parse_message)
        ready.set()
        if profile:
            import cProfile
            prof = cProfile.Profile()
            prof.enable()
            m.run(stop=stop)
            prof.disable()
            prof.dump_stats(profile)
        else:
            t = time.perf_counter()
            m.run(stop=stop)
            total = time.perf_counter() - t
            print(f"mirror loop phases over {total:.1f}s of wall time:")
            for name, (sec, n) in sorted(phases.items(), key=lambda kv: -kv[1][0]):
                print(f"  {name:38s} {sec:7.2f}s {100 * sec / total:5.1f}%  {n:7d} calls  {1000 * sec / max(n, 1):8.3f} ms/call")
            sys.stdout.flush()


def phase_config(cfg: XdcConfig, backend: str, pg_urls: dict[str, str], run: Path) -> dict[str, Any]:
    """The stack's config with an events topic, a group and a state of this phase's own."""
    data = cfg.model_dump(mode="json", exclude={"base_dir"})
    data["mirror"]["group_id"] = f"bench-{backend}"
    for dc, d in data["datacenters"].items():
        d["kafka"]["topics"]["events"] = f"bench.{backend}.events"
        d["state_url"] = pg_urls[dc] if backend == "postgres" else f"sqlite:///{run / f'bench-{dc}.db'}"
    return data


def mirror_phase(cfg: XdcConfig, backend: str, run: Path, args: argparse.Namespace, ctx: Any) -> dict[str, float]:
    data = phase_config(cfg, backend, {dc: cfg.dc(dc).state_url for dc in cfg.datacenters}, run)
    pcfg = parse_config(data, base_dir=cfg.base_dir)
    topic = pcfg.dc("A").kafka.topics.events
    ensure_topics(bootstrap(cfg, "A"), [topic], args.partitions)
    stop, ready = ctx.Event(), ctx.Event()
    env = {k: v for k, v in os.environ.items() if k.startswith("XDC_")}
    mproc = ctx.Process(target=_mirror_proc, args=(data, str(cfg.base_dir), env, stop, ready, args.profile))
    mproc.start()
    if not ready.wait(120):
        raise SystemExit("mirror did not join in 120 s")
    prod = produce_paced(cfg, topic, args.rate, args.seconds, args.producers, "run")
    print(f"[{backend}] produced {prod['sent']:.0f} events in {prod['seconds']:.1f}s = {prod['rate']:.0f}/s "
          f"(target {args.rate:.0f}/s, {prod['late_ticks']:.0f} late ticks)", flush=True)
    with Topology(pcfg, "B") as topo:
        cat = topo.here.state.catalog
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if cat.route_totals().get("lidar", {}).get("objects", 0) >= prod["sent"]:
                break
            time.sleep(0.5)
        stop.set()
        mproc.join(60)
        rows = sorted(((e.event_time, e.applied_time) for e in cat.live_objects()), key=lambda r: r[1])
    lags = [max(0.0, a - e) for e, a in rows]
    span = rows[-1][1] - rows[0][1] if len(rows) > 1 else 0.0
    # sustained: applied per second over the middle 80 % of the run (no ramp up / drain)
    t0, t1 = rows[0][1] + 0.1 * span, rows[0][1] + 0.9 * span
    mid = sum(1 for _, a in rows if t0 <= a <= t1)
    rate = mid / (t1 - t0) if t1 > t0 else 0.0
    p50, p99 = percentile(lags, 50) or 0.0, percentile(lags, 99) or 0.0
    print(f"[{backend}] mirror: applied {len(rows)}/{prod['sent']:.0f}; lag p50 {p50 * 1000:.0f} ms  "
          f"p99 {p99 * 1000:.0f} ms  max {max(lags) * 1000:.0f} ms")
    print(f"[{backend}] sustained apply rate {rate:.0f}/s (middle 80 %), "
          f"{len(rows) / span if span else 0:.0f}/s overall; offered {prod['rate']:.0f}/s")
    print(f"[{backend}] p99 vs goal {GOAL_P99_S * 1000:.0f} ms: {p99 / GOAL_P99_S:.2f}x -> "
          f"{'MET' if p99 < GOAL_P99_S else 'MISSED'}", flush=True)
    return {"p50": p50, "p99": p99, "rate": rate}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rate", type=float, default=5000)
    ap.add_argument("--seconds", type=float, default=60)
    ap.add_argument("--baseline-seconds", type=float, default=10)
    ap.add_argument("--producers", type=int, default=2)
    ap.add_argument("--batch-records", type=int, default=2000)
    ap.add_argument("--batch-seconds", type=float, default=0.05)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--state", default="sqlite,postgres", help="state backends, in order (the first is the reference)")
    ap.add_argument("--profile", default=None, help="write a cProfile of the mirror process here")
    args = ap.parse_args()

    run = Path(tempfile.mkdtemp(prefix="xdc-bench-lag-"))
    ctx = mp.get_context("spawn")
    try:
        t = time.monotonic()
        cfg = stack.up(run, nodes=0, state="postgres", config_overrides={
            "mirror": {"batch_max_records": args.batch_records, "batch_max_seconds": args.batch_seconds},
            "datacenters": {dc: {"kafka": {"partitions": args.partitions}} for dc in ("A", "B")}})
        print(f"stack up in {time.monotonic() - t:.1f}s ({run})", flush=True)

        # baseline: Kafka produce -> consume, nothing else (own topic: the mirror never sees it)
        btopic = "bench.baseline"
        ensure_topics(bootstrap(cfg, "A"), [btopic], args.partitions)
        q, ready = ctx.Queue(), ctx.Event()
        expect = int(args.rate * args.baseline_seconds)
        cons = ctx.Process(target=_baseline_consumer, args=(bootstrap(cfg, "A"), btopic, expect, ready, q))
        cons.start()
        ready.wait(60)
        prod = produce_paced(cfg, btopic, args.rate, args.baseline_seconds, args.producers, "base")
        base = q.get(timeout=120)
        cons.join(30)
        print(f"baseline (kafka only): sent {prod['sent']:.0f} at {prod['rate']:.0f}/s; "
              f"lag p50 {percentile(base, 50) * 1000:.1f} ms  p99 {percentile(base, 99) * 1000:.1f} ms  "
              f"max {max(base) * 1000:.1f} ms  (n={len(base)})", flush=True)

        results = {b: mirror_phase(cfg, b, run, args, ctx) for b in args.state.split(",")}
        first = next(iter(results))
        for b, r in results.items():
            print(f"{b}: p99 {r['p99'] * 1000:.0f} ms, apply {r['rate']:.0f}/s = "
                  f"{r['rate'] / results[first]['rate']:.2f}x of {first}; "
                  f"p99 vs kafka-only baseline {r['p99'] / (percentile(base, 99) or 1e-9):.1f}x")
        if args.profile and os.path.exists(args.profile):
            import pstats
            pstats.Stats(args.profile).sort_stats("cumulative").print_stats(25)
        return 0
    finally:
        stack.down(run)


if __name__ == "__main__":
    sys.exit(main())
