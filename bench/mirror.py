"""Mirror benchmark (run by hand): ratios measured in one run on the local stack.

1. metadata apply rate / raw kafka-python consume rate of the same topic (goal >= 0.8)
2. data copy MiB/s / s5cmd MiB/s between the same two S3 endpoints, for each object size given
   (default 8 MiB and 64 MiB; goal >= 1.0). s5cmd takes one endpoint per invocation, so its
   cross-endpoint copy is download + upload (through /dev/shm: no disk); both legs are timed
   together, as a person using it between two datacenters would. `--multipart` writes the sources in 8 MiB parts (as
   boto3 and the AWS CLI do) instead of one PUT each: the mirror then keeps their multipart ETags.
   Each size runs `--rounds` times on fresh objects, mirror and s5cmd taking turns at going first
   (an even count: as many firsts each); the median ratio is the figure (one round on 2 shared
   cores varies by +-15 %).

    python bench/mirror.py [--events 50000] [--object-mib 8 64] [--data-mib 320] [--multipart] [--rounds 6]
                           [--copy-concurrency N]
"""
from __future__ import annotations

import argparse
import io
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from kafka import KafkaConsumer  # noqa: E402

from devtools import stack  # noqa: E402
from mirror.runner import Mirror  # noqa: E402
from xdc.events import encode_notification, message_key, new_sequencer, s3_record  # noqa: E402
from xdc.io.consume import Prepared  # noqa: E402
from xdc.io.kafka import make_producer  # noqa: E402
from xdc.metrics import Metrics, new_registry  # noqa: E402
from xdc.topology import Topology  # noqa: E402

MIB = 2**20


SPLIT: dict[str, float] = {}  # where the last timed_mirror spent its time


def cpu_seconds(run: Path) -> dict[str, float]:
    """CPU seconds so far of this process, of its finished children (s5cmd) and of the stack's
    processes by name (proxies, gateways, brokers): who pays for a phase's bytes on 2 cores."""
    me = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    out = {"copier": me.ru_utime + me.ru_stime, "s5cmd": kids.ru_utime + kids.ru_stime}
    state = stack.StackState.load(run / "stack")
    for proc in state.procs if state else []:
        try:
            fields = Path(f"/proc/{proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        name = proc.name.split("-")[0]
        out[name] = out.get(name, 0.0) + (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    return out


def cpu_used(before: dict[str, float], after: dict[str, float]) -> str:
    used = {k: after[k] - before.get(k, 0.0) for k in after if after[k] - before.get(k, 0.0) >= 0.05}
    return ", ".join(f"{k} {v:.2f}" for k, v in sorted(used.items(), key=lambda kv: -kv[1]))


def timed_mirror(cfg, group: str) -> tuple[int, int, float]:  # type: ignore[no-untyped-def]
    """Run the mirror once; time from its first batch to its last (group join excluded). SPLIT
    gets the batches, the seconds from each batch's prepare to the end of its durable part, and the
    seconds of those in the copy step (the rest: decide, state commit, publish). Batches overlap
    (the next is prepared while one is made durable): the first two can exceed the total."""
    topo = Topology(cfg, "B")
    m = Mirror(topo, metrics=Metrics(new_registry()), group_id=group)
    first: list[float] = []
    last: list[float] = []
    SPLIT.clear()
    SPLIT.update(batches=0, handler_s=0.0, copy_s=0.0)
    inner, inner_copy = m.prepare, m._apply_content

    def prepare(batch):  # type: ignore[no-untyped-def]
        # the loop prepares a batch (decide, copy) and makes it durable on its writer thread while
        # it prepares the next: a batch is timed from its prepare to the end of its durable part
        t0 = time.perf_counter()
        if not first:
            first.append(t0)
        p = inner(batch)
        durable = p.durable

        def timed_durable():  # type: ignore[no-untyped-def]
            durable()
            last[:] = [time.perf_counter()]
            SPLIT["handler_s"] += last[0] - t0
        SPLIT["batches"] += 1
        return Prepared(p.letters, timed_durable)

    def copy(todo, current, letters):  # type: ignore[no-untyped-def]
        t0 = time.perf_counter()
        try:
            return inner_copy(todo, current, letters)
        finally:
            SPLIT["copy_s"] += time.perf_counter() - t0
    m.prepare = prepare  # type: ignore[method-assign]
    m._apply_content = copy  # type: ignore[method-assign]
    try:
        st = m.run(once=True)
    finally:
        m.close()
        topo.close()
    SPLIT["total_s"] = (last[0] - first[0]) if first else 0.0
    return st.applied, st.bytes_copied, SPLIT["total_s"]


def raw_consume(cfg, topic: str, n: int) -> float:  # type: ignore[no-untyped-def]
    c = KafkaConsumer(topic, bootstrap_servers=cfg.dc("A").kafka.bootstrap_servers, group_id=f"raw-{time.time_ns()}",
                      auto_offset_reset="earliest", enable_auto_commit=False, session_timeout_ms=6000,
                      heartbeat_interval_ms=1000, max_poll_records=500)
    got, t0 = 0, None
    try:
        while got < n:
            polled = c.poll(timeout_ms=1000, max_records=500)
            for msgs in polled.values():
                if t0 is None:
                    t0 = time.perf_counter()
                got += len(msgs)
        return time.perf_counter() - (t0 or time.perf_counter())
    finally:
        c.close()


def write_sources(cfg, p, prefix: str, n: int, size_mib: int, multipart: bool) -> None:  # type: ignore[no-untyped-def]
    """n fresh objects of size_mib in IDC-A, each announced on its events topic."""
    topic = cfg.dc("A").kafka.topics.events
    src_bucket = cfg.routes[0].source.bucket
    topo = Topology(cfg, "A")
    a = topo.here.store
    blob = os.urandom(size_mib * MIB)
    for i in range(n):
        key = f"{prefix}{i:04d}.bin"
        body = blob[i:] + blob[:i]
        if multipart:
            a.client.upload_fileobj(io.BytesIO(body), src_bucket, key)  # boto3's default: 8 MiB parts
            info = a.head(src_bucket, key)
        else:
            info = a.put(src_bucket, key, body)
        p.send(topic, key=message_key(src_bucket, info.key),
               value=encode_notification([s3_record("put", src_bucket, info.key, size=info.size,
                                                    etag=info.etag, sequencer=new_sequencer())]))
    p.flush()
    topo.close()


def mirror_copy(cfg, run: Path, prefix: str, n: int) -> tuple[float, str, int]:  # type: ignore[no-untyped-def]
    """The mirror's verified copies of the announced objects: MiB/s, where its time and the
    machine's CPU went, and how many ETags the target kept."""
    cpu0 = cpu_seconds(run)
    _, copied, copy_s = timed_mirror(cfg, "bench-meta")  # same group: resumes after the earlier events
    split, cpu = dict(SPLIT), cpu_used(cpu0, cpu_seconds(run))
    src_bucket, dst_bucket = cfg.routes[0].source.bucket, cfg.routes[0].target.bucket
    a, b = Topology(cfg, "A").here.store, Topology(cfg, "B").here.store
    kept = sum(1 for i in range(n) if b.head(dst_bucket, f"{prefix}{i:04d}.bin").etag
               == a.head(src_bucket, f"{prefix}{i:04d}.bin").etag)
    where = (f"{split['batches']:.0f} batches in {split['total_s']:.2f} s: prepare to durable {split['handler_s']:.2f} s, "
             f"of which the copy step {split['copy_s']:.2f} s; CPU s (group join included) {cpu}")
    return copied / MIB / copy_s, where, kept


def s5cmd_copy(cfg, run: Path, prefix: str, total: int) -> tuple[float, str]:  # type: ignore[no-untyped-def]
    """s5cmd download, then upload, of the same objects: MiB/s and where the CPU went. The files
    wait in memory (/dev/shm) where there is one: the strongest baseline, no disk in its way."""
    src_bucket, dst_bucket = cfg.routes[0].source.bucket, cfg.routes[0].target.bucket
    s5 = shutil.which("s5cmd") or str(Path(sys.executable).parent / "s5cmd")
    shm = Path("/dev/shm")
    tmp = Path(tempfile.mkdtemp(prefix="xdc-bench-s5-", dir=shm if shm.is_dir() else run))
    env = {**os.environ, "AWS_ACCESS_KEY_ID": os.environ["XDC_A_ACCESS_KEY"],
           "AWS_SECRET_ACCESS_KEY": os.environ["XDC_A_SECRET_KEY"], "AWS_REGION": "us-east-1"}
    env_b = {**env, "AWS_ACCESS_KEY_ID": os.environ["XDC_B_ACCESS_KEY"],
             "AWS_SECRET_ACCESS_KEY": os.environ["XDC_B_SECRET_KEY"]}
    cpu0 = cpu_seconds(run)
    t0 = time.perf_counter()
    subprocess.run([s5, "--endpoint-url", cfg.dc("A").s3.internal_url, "cp", f"s3://{src_bucket}/{prefix}*", f"{tmp}/"],
                   check=True, env=env, capture_output=True)
    subprocess.run([s5, "--endpoint-url", cfg.dc("B").s3.internal_url, "cp", f"{tmp}/", f"s3://{dst_bucket}/s5cmd-{prefix}"],
                   check=True, env=env_b, capture_output=True)
    s5_s = time.perf_counter() - t0
    cpu = cpu_used(cpu0, cpu_seconds(run))
    shutil.rmtree(tmp, ignore_errors=True)
    return total / MIB / s5_s, f"CPU s {cpu}"


def data_phase(cfg, p, size_mib: int, data_mib: int, multipart: bool, rounds: int, run: Path  # type: ignore[no-untyped-def]
               ) -> None:
    """One object size, `rounds` times on fresh objects: the mirror's verified copies and s5cmd's
    download+upload of the same objects, taking turns at going first (the first reader of objects
    just written shares the machine with the gateway's write-back of them)."""
    n = max(4, data_mib // size_mib)
    ratios = []
    for r in range(rounds):
        prefix = f"camera/bench-{size_mib}{'-mp' if multipart else ''}-{r}/"
        write_sources(cfg, p, prefix, n, size_mib, multipart)
        if r % 2 == 0:
            mirror_mibs, where, kept = mirror_copy(cfg, run, prefix, n)
            s5_mibs, s5_where = s5cmd_copy(cfg, run, prefix, n * size_mib * MIB)
        else:
            s5_mibs, s5_where = s5cmd_copy(cfg, run, prefix, n * size_mib * MIB)
            mirror_mibs, where, kept = mirror_copy(cfg, run, prefix, n)
        ratios.append(mirror_mibs / s5_mibs)
        print(f"data {n} x {size_mib} MiB{' multipart' if multipart else ''}, round {r + 1} "
              f"({'mirror' if r % 2 == 0 else 's5cmd'} first): mirror copy {mirror_mibs:.1f} MiB/s (verified; ETag kept "
              f"{kept}/{n}); s5cmd download+upload {s5_mibs:.1f} MiB/s; ratio {ratios[-1]:.2f}", flush=True)
        print(f"    mirror: {where}\n    s5cmd: {s5_where}", flush=True)
    print(f"data {n} x {size_mib} MiB: median ratio of {rounds} rounds {statistics.median(ratios):.2f} "
          f"(goal >= 1.0)", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=50_000)
    ap.add_argument("--object-mib", type=int, nargs="+", default=[8, 64])
    ap.add_argument("--data-mib", type=int, default=320, help="bytes per object size (objects = this / size)")
    ap.add_argument("--multipart", action="store_true", help="write the sources in 8 MiB parts (boto3's way)")
    ap.add_argument("--rounds", type=int, default=6, help="rounds per object size (fresh objects each)")
    ap.add_argument("--copy-concurrency", type=int, default=None, help="mirror.copy_concurrency (default: the config's)")
    args = ap.parse_args()
    run = Path(tempfile.mkdtemp(prefix="xdc-bench-mirror-"))
    try:
        cfg = stack.up(run / "stack", nodes=0)
        if args.copy_concurrency:
            cfg = cfg.model_copy(update={"mirror": cfg.mirror.model_copy(update={"copy_concurrency": args.copy_concurrency})})
        topic = cfg.dc("A").kafka.topics.events
        src_bucket = cfg.routes[0].source.bucket

        # 1. metadata apply vs raw consume
        p = make_producer(cfg.dc("A").kafka.bootstrap_servers)
        for i in range(args.events):
            key = f"lidar/bench/{i:08d}.bin"
            p.send(topic, key=message_key(src_bucket, key),
                   value=encode_notification([s3_record("put", src_bucket, key, size=1000, etag="x" * 32,
                                                        sequencer=new_sequencer())]))
        p.flush()
        raw_s = raw_consume(cfg, topic, args.events)
        applied, _, mir_s = timed_mirror(cfg, "bench-meta")
        raw_rate, apply_rate = args.events / raw_s, applied / mir_s
        print(f"metadata: raw kafka-python consume {raw_rate:,.0f} msg/s; mirror apply {apply_rate:,.0f} events/s "
              f"({applied} applied); ratio {apply_rate / raw_rate:.2f} (goal >= 0.8)", flush=True)

        # 2. data copy vs s5cmd, per object size
        for size in args.object_mib:
            data_phase(cfg, p, size, args.data_mib, args.multipart, args.rounds, run)
        p.close()
    finally:
        stack.down(run / "stack")
        shutil.rmtree(run, ignore_errors=True)


if __name__ == "__main__":
    main()
