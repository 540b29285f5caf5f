"""Tracing overhead bench (run by hand): the mirror's apply rate with tracing on at the default
sampling against tracing off, measured in the same run on the local stack.

    python bench/trace.py [--events 20000] [--rounds 2] [--mode metadata|data] [--ratio R]

Starts the local stack (no cache nodes, SQLite state) in a temp run dir and stops it in `finally`.
Phases alternate off, on, off, on, ... (`--rounds` pairs), each on an events topic, a consumer
group and a state of its own. A phase produces its backlog first, as ingest would: with tracing on
every event carries a traceparent (sampled at the ratio, else flags 00), with it off none. Then the
mirror drains it in this process, with the process's telemetry set up as `xdc mirror run` does
(tracing by the config: the built-in state sink, problem signatures); the apply rate is events
over the time from the mirror's first batch to its last (group join excluded).

Metadata mode (the default) is the worst case for the overhead: nothing but the per-event work.
Prints each phase, the median rate of each side, on/off (goal >= 0.95) and the spans kept.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from devtools import stack  # noqa: E402
from mirror.runner import Mirror  # noqa: E402
from xdc import trace  # noqa: E402
from xdc.config import TracingSettings, XdcConfig, parse_config  # noqa: E402
from xdc.events import encode_notification, message_key, new_sequencer, s3_record  # noqa: E402
from xdc.io.consume import Prepared  # noqa: E402
from xdc.io.kafka import ensure_topics, make_producer  # noqa: E402
from xdc.metrics import Metrics, new_registry  # noqa: E402
from xdc.observe import telemetry  # noqa: E402
from xdc.topology import Topology  # noqa: E402

SRC = "idca-drive"
GOAL = 0.95


def phase_config(cfg: XdcConfig, name: str, run: Path, tracing: bool, ratio: float) -> XdcConfig:
    data = cfg.model_dump(mode="json", exclude={"base_dir"})
    data["mirror"]["group_id"] = f"bench-{name}"
    for dc, d in data["datacenters"].items():
        d["kafka"]["topics"]["events"] = f"bench.{name}.events"
        d["kafka"]["topics"]["applied"] = f"bench.{name}.applied"
        d["state_url"] = f"sqlite:///{run / f'{name}-{dc}.db'}"
    data["tracing"] = {"enabled": tracing, "sample_ratio": ratio}
    return parse_config(data, base_dir=cfg.base_dir)


def produce(cfg: XdcConfig, n: int, mode: str, tag: str, tracing: bool, ratio: float) -> None:
    """The backlog, as ingest publishes it (with tracing on: a traceparent per event)."""
    topo = Topology(cfg, "A")
    k = cfg.dc("A").kafka
    ensure_topics(topo.here.brokers, list(k.topics.model_dump().values()), k.partitions)
    prefix = "lidar/" if mode == "metadata" else "camera/"
    store = topo.here.store if mode == "data" else None
    body = b"x" * 4096
    p = make_producer(topo.here.brokers, linger_ms=20, batch_size=512 * 1024)
    sink: list[dict[str, Any]] = []
    if tracing:  # the producer side's spans are not what is measured: kept in memory
        trace.configure(TracingSettings(sample_ratio=ratio), component="ingest", dc="A",
                        exporters=[trace.RowExporter(sink.extend)])
    try:
        for i in range(n):
            key = f"{prefix}{tag}/{i:07d}.bin"
            etag = store.put(SRC, key, body).etag if store is not None else "e"
            span = trace.root("ingest.object", attributes=trace.attrs(dc="A", key=f"{SRC}/{key}"))
            rec = s3_record("put", SRC, key, size=len(body), etag=etag, sequencer=new_sequencer(), event_time=time.time())
            p.send(cfg.dc("A").kafka.topics.events, key=message_key(SRC, key), value=encode_notification([rec]),
                   headers=trace.new_object_headers(span) or None)
            trace.end(span)
        p.flush(timeout=120)
    finally:
        p.close(timeout=10)
        trace.shutdown()
        topo.close()


def drain(cfg: XdcConfig, n: int) -> tuple[float, float, int, int]:
    """Apply the backlog; (events per second first batch -> last, events per CPU second of this
    process over the same span, applied, spans kept in B)."""
    topo = Topology(cfg, "B")
    tel = telemetry.start(topo, "mirror", metrics=Metrics(new_registry()))
    m = Mirror(topo, metrics=Metrics(new_registry()))
    first: list[tuple[float, float]] = []
    last: list[tuple[float, float]] = []
    inner = m.prepare

    def prepare(batch: Any) -> Prepared:
        # the loop makes a batch durable on its writer thread while it prepares the next: the span
        # runs from the first prepare to the end of the last durable part
        if not first:
            first.append((time.perf_counter(), time.process_time()))
        p = inner(batch)

        def durable() -> None:
            p.durable()
            last[:] = [(time.perf_counter(), time.process_time())]
        return Prepared(p.letters, durable)
    m.prepare = prepare  # type: ignore[method-assign]
    try:
        applied = 0
        deadline = time.monotonic() + 600
        while applied < n and time.monotonic() < deadline:
            applied = m.run(once=True).applied  # cumulative over runs
    finally:
        m.close()
        tel.close()  # spans flushed into the state
    spans = topo.here.state.traces.count()
    topo.close()
    wall = last[0][0] - first[0][0] if first else 0.0
    cpu = last[0][1] - first[0][1] if first else 0.0  # every thread of the process: the exporter too
    return (applied / wall if wall else 0.0), (applied / cpu if cpu else 0.0), applied, spans


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--events", type=int, default=20000)
    ap.add_argument("--rounds", type=int, default=2, help="off/on pairs")
    ap.add_argument("--mode", choices=("metadata", "data"), default="metadata")
    ap.add_argument("--ratio", type=float, default=TracingSettings().sample_ratio, help="default: the config's default")
    args = ap.parse_args()

    run = Path(tempfile.mkdtemp(prefix="xdc-bench-trace-"))
    try:
        t = time.monotonic()
        cfg = stack.up(run, nodes=0)
        print(f"stack up in {time.monotonic() - t:.1f}s ({run}); {args.events} {args.mode} events per phase, "
              f"sampling {args.ratio}", flush=True)
        rates: dict[bool, list[float]] = {False: [], True: []}
        cpu_rates: dict[bool, list[float]] = {False: [], True: []}
        spans_on = 0
        for r in range(args.rounds):
            for tracing in ((False, True) if r % 2 == 0 else (True, False)):  # alternate who goes first
                name = f"r{r}-{'on' if tracing else 'off'}"
                pcfg = phase_config(cfg, name, run, tracing, args.ratio)
                produce(pcfg, args.events, args.mode, name, tracing, args.ratio)
                rate, cpu_rate, applied, spans = drain(pcfg, args.events)
                rates[tracing].append(rate)
                cpu_rates[tracing].append(cpu_rate)
                spans_on += spans if tracing else 0
                print(f"  {name:8s} applied {applied:6d} at {rate:8.0f}/s wall, {cpu_rate:8.0f}/CPU-s; "
                      f"spans kept {spans}", flush=True)
        off, on = statistics.median(rates[False]), statistics.median(rates[True])
        ratio = on / off if off else 0.0
        coff, con = statistics.median(cpu_rates[False]), statistics.median(cpu_rates[True])
        cratio = con / coff if coff else 0.0
        print(f"apply rate, median: tracing off {off:.0f}/s, on {on:.0f}/s (sampling {args.ratio}) -> "
              f"{ratio:.3f}x of off (goal >= {GOAL}): {'MET' if ratio >= GOAL else 'MISSED'}; "
              f"{spans_on} spans kept by the on phases")
        print(f"per CPU second of the mirror process, median: off {coff:.0f}, on {con:.0f} -> {cratio:.3f}x "
              "(less sensitive to other work on the machine)")
        return 0
    finally:
        stack.down(run)


if __name__ == "__main__":
    sys.exit(main())
