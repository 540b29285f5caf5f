"""The `xdc` command: thin wiring from arguments to the library. No logic lives here."""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import yaml

from xdc.config import XdcConfig, config_path_from_env, load_config, masked_view
from xdc.errors import XdcError

DEFAULT_RUN_DIR = ".xdc/stack"
log = logging.getLogger("xdc")


def _cfg(args: argparse.Namespace) -> XdcConfig:
    path = args.config or os.environ.get("XDC_CONFIG")
    if not path and Path(args.run_dir, "xdc.yaml").exists():
        path = str(Path(args.run_dir, "xdc.yaml"))  # the local stack's config
    path = config_path_from_env(path)
    from xdc.stack import load_secrets
    load_secrets(Path(path).parent)  # a stack's generated credentials, if this is one
    return load_config(path, dc=args.dc)


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# -- commands --------------------------------------------------------------------------------
def cmd_config_check(args: argparse.Namespace) -> int:
    from xdc.stack import load_secrets
    load_secrets(Path(args.file).parent)
    cfg = load_config(args.file, dc=args.dc)
    print(yaml.safe_dump(masked_view(cfg), sort_keys=False), end="")
    print(f"# ok: {len(cfg.datacenters)} datacenters, {len(cfg.routes)} routes", file=sys.stderr)
    return 0


def cmd_stack(args: argparse.Namespace) -> int:
    from xdc import stack
    if args.action == "up":
        cfg = stack.up(args.run_dir, nodes=args.nodes, durable_kafka=args.durable_kafka)
        print(f"stack up: config {Path(args.run_dir, 'xdc.yaml')} ({', '.join(cfg.datacenters)})")
        return 0
    if args.action == "status":
        rows = stack.status(args.run_dir)
        for r in rows:
            print("  ".join(f"{k}={v}" for k, v in r.items()))
        return 0 if rows and all(r["alive"] for r in rows) else 1
    n = stack.down(args.run_dir)
    print(f"stack down: stopped {n}")
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    from mirror.ingest import ingest
    from xdc.progress import counter
    cfg = _cfg(args)
    with counter("ingest", unit="file") as bar:
        rep = ingest(cfg, args.dc or cfg.require_local_dc(), args.dir, args.bucket, args.prefix, progress=bar)
    _print(rep.to_dict())
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    from mirror.ingest import scan
    cfg = _cfg(args)
    _print(scan(cfg, args.dc or cfg.require_local_dc(), args.bucket, args.prefix, dry_run=args.dry_run).to_dict())
    return 0


def _run_service(cfg: XdcConfig, service: Any, args: argparse.Namespace) -> int:
    """A long-running loop (mirror, resize worker) with /metrics, /healthz, /readyz while it runs."""
    from xdc.serve import serving
    with service as s, serving(cfg, live=lambda: s.alive, ready=lambda: s.caught_up):
        stats = s.run(once=not args.follow, max_seconds=args.max_seconds)
    _print(stats.to_dict())
    return 0


def cmd_mirror(args: argparse.Namespace) -> int:
    from mirror.runner import Mirror
    cfg = _cfg(args)
    return _run_service(cfg, Mirror(cfg, args.dc), args)


def cmd_dlq(args: argparse.Namespace) -> int:
    from mirror import dlq
    from xdc.kafka import make_producer
    cfg = _cfg(args)
    dc = args.dc or cfg.require_local_dc()
    k = cfg.dc(dc).kafka
    letters = list(dlq.read_letters(cfg.kafka_bootstrap(dc), k.topics.dead_letter))
    if args.reason:
        letters = [d for d in letters if d.reason == args.reason]
    if args.action == "list":
        for d in letters:
            print(json.dumps(d.to_dict()))
        print(f"# {len(letters)} dead letters by reason: {dlq.summarize(letters)}", file=sys.stderr)
        return 0
    producers: dict[str, Any] = {}

    def producer_for(origin: str) -> Any:
        if origin not in producers:
            producers[origin] = make_producer(cfg.kafka_bootstrap(origin))
        return producers[origin]
    try:
        n = dlq.replay(letters, producer_for, default_dc=dc, topic=args.to_topic)
    finally:
        for p in producers.values():
            p.close(timeout=5)
    print(f"replayed {n} dead letters")
    return 0


def cmd_resize_run(args: argparse.Namespace) -> int:
    from resize.worker import ResizeWorker
    cfg = _cfg(args)
    return _run_service(cfg, ResizeWorker(cfg, args.dc), args)


def cmd_resize_file(args: argparse.Namespace) -> int:
    from resize.frame import resize_file
    from xdc.config import ResizeSettings
    settings = ResizeSettings(bucket="local", quality=args.quality)
    out = resize_file(Path(args.input), Path(args.output), settings)
    print(f"{args.input}: {out.source_width}x{out.source_height} -> {out.width}x{out.height} ({out.action})")
    return 0


def cmd_prewarm(args: argparse.Namespace) -> int:
    from cache_client import prewarm
    from cache_client.selectors import roots_from_args
    cfg = _cfg(args)
    dc = args.dc or cfg.require_local_dc()
    sel = {"select": args.select, "root": roots_from_args(args.root)}
    if args.action == "plan":
        plan = prewarm.plan_prewarm(cfg, dc, args.list, args.dataset, prefix=args.prefix, trim=args.trim, **sel)
        print(plan.summary(), file=sys.stderr)
        _print(plan.to_dict(args.max_files))
    elif args.action == "run":
        rep = prewarm.run_prewarm(cfg, dc, args.list, args.dataset, version=args.version, prefix=args.prefix,
                                  trim=args.trim, wait=not args.no_wait, **sel)
        print(rep.summary(), file=sys.stderr)
        _print(rep.to_dict(args.max_files))
        return 0 if rep.complete else 1
    elif args.action == "check":
        chk = prewarm.check_list(cfg, dc, args.list, prefix=args.prefix, **sel)
        print(chk.summary(), file=sys.stderr)
        _print(chk.to_dict(args.max_files))
    else:
        fr = prewarm.free_list(cfg, dc, args.list, args.dataset, version=args.version, prefix=args.prefix,
                               force=args.force, **sel)
        print(fr.summary(), file=sys.stderr)
        _print(fr.to_dict())
    return 0


def cmd_prewarm_follow(args: argparse.Namespace) -> int:
    from cache_client.release import follow_releases
    cfg = _cfg(args)
    reports = follow_releases(cfg, args.dc or cfg.require_local_dc(), once=args.once, max_seconds=args.max_seconds)
    _print([r.to_dict(20) for r in reports])
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    import time as _time

    from cache_client.release import publish_release
    from mirror.events import ReleaseEvent
    cfg = _cfg(args)
    ev = ReleaseEvent(args.dataset, args.version, args.manifest, _time.time(), tuple(args.datacenters or ()),
                      prefix=args.prefix)
    publish_release(cfg, args.dc or cfg.require_local_dc(), ev)
    print(ev.to_json().decode())
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    import time as _time

    from xdc.dashboard import serve_dashboard, snapshot_html
    cfg = _cfg(args)
    if args.snapshot:
        Path(args.snapshot).write_text(snapshot_html(cfg))
        print(f"wrote {args.snapshot}")
        return 0
    handle = serve_dashboard(cfg, args.host, args.port)
    print(f"dashboard: {handle.url}", flush=True)
    try:
        while True:
            _time.sleep(3600)
    finally:
        handle.stop()


def cmd_lag_snapshot(args: argparse.Namespace) -> int:
    from xdc.lag import record_lag_snapshot
    cfg = _cfg(args)
    _print(record_lag_snapshot(cfg, args.dc or cfg.require_local_dc()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from xdc.demo import run_demo
    return run_demo(Path(args.out), frames=args.frames, keep=args.keep)


# -- parser ----------------------------------------------------------------------------------
def _service_options(sp: argparse.ArgumentParser) -> None:
    """Options shared by the long-running loops (mirror, resize worker)."""
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--once", action="store_true", help="stop when caught up (default)")
    g.add_argument("--follow", action="store_true", help="run until stopped")
    sp.add_argument("--max-seconds", type=float)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xdc", description="Cross-datacenter mirror and cache prewarm")
    p.add_argument("--config", help="config file (default: $XDC_CONFIG, else the local stack's)")
    p.add_argument("--dc", help="datacenter this process runs in (default: config local_dc / $XDC_DC)")
    p.add_argument("--run-dir", default=os.environ.get("XDC_RUN_DIR", DEFAULT_RUN_DIR),
                   help="local stack run directory")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str,
            parent: Any = sub) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, help=help_)
        sp.set_defaults(fn=fn)
        return sp

    c = sub.add_parser("config", help="config file tools").add_subparsers(dest="sub", required=True)
    sp = add("check", cmd_config_check, "validate a config and print it resolved, secrets masked", c)
    sp.add_argument("file")

    sp = add("stack", cmd_stack, "start/inspect/stop the local two-datacenter stack")
    sp.add_argument("action", choices=["up", "status", "down"])
    sp.add_argument("--nodes", type=int, default=2, help="cache nodes per datacenter")
    sp.add_argument("--durable-kafka", action="store_true", help="broker storage on the DC's S3 endpoint")

    sp = add("ingest", cmd_ingest, "upload a directory and publish its S3 events")
    sp.add_argument("dir")
    sp.add_argument("--bucket", required=True)
    sp.add_argument("--prefix", default="")

    sp = add("scan", cmd_scan, "diff a bucket against the catalog and publish missed events")
    sp.add_argument("--bucket", required=True)
    sp.add_argument("--prefix", default="")
    sp.add_argument("--dry-run", action="store_true")

    m = sub.add_parser("mirror", help="the mirror").add_subparsers(dest="sub", required=True)
    sp = add("run", cmd_mirror, "apply change events into this datacenter", m)
    _service_options(sp)

    d = sub.add_parser("dlq", help="dead letters").add_subparsers(dest="sub", required=True)
    for action in ("list", "replay"):
        sp = add(action, cmd_dlq, f"{action} dead letters of this datacenter", d)
        sp.set_defaults(action=action)
        sp.add_argument("--reason", help="only letters with this reason")
        if action == "replay":
            sp.add_argument("--to-topic", help="default: each letter's origin topic")

    r = sub.add_parser("resize", help="4K -> 720p").add_subparsers(dest="sub", required=True)
    sp = add("run", cmd_resize_run, "resize new frames of the landing datacenter", r)
    _service_options(sp)
    sp = add("file", cmd_resize_file, "resize one file", r)
    sp.add_argument("input")
    sp.add_argument("output")
    sp.add_argument("--quality", type=int, default=90)

    pw = sub.add_parser("prewarm", help="cache prewarm, check and free by file list").add_subparsers(
        dest="sub", required=True)
    for action, help_ in (("plan", "files, bytes, already cached, per node, ETA (nothing is loaded)"),
                          ("run", "ready gate -> plan -> warm -> check -> re-warm misses -> report"),
                          ("check", "per-file cache status"),
                          ("free", "evict from every node, keeping files of other active datasets")):
        sp = add(action, cmd_prewarm, help_, pw)
        sp.set_defaults(action=action)
        sp.add_argument("--list", required=True,
                        help="file list or dataset index: txt, csv, parquet, pkl (mmdet3d infos), json (COCO, "
                             "nuScenes sample_data), jsonl")
        sp.add_argument("--select", metavar="EXPR",
                        help="where the paths are: JMESPath for pkl/json/jsonl (e.g. 'infos[].cams.*.data_path'), "
                             "column names for csv/parquet (e.g. 'cam_front,lidar'); default: the detected shape's")
        sp.add_argument("--root", metavar="[TAG=]PREFIX", action="append",
                        help="s3://bucket/prefix joined to relative paths; TAG=PREFIX (repeatable) for per-modality "
                             "roots relative to it, as mmdet3d's data_prefix (pts=samples/LIDAR_TOP, CAM_FRONT=...)")
        sp.add_argument("--dataset")
        sp.add_argument("--version", default="")
        sp.add_argument("--prefix", help="keys must stay under this bucket/prefix")
        sp.add_argument("--max-files", type=int, default=50, help="files listed in the JSON output")
        if action in ("plan", "run"):
            sp.add_argument("--trim", action="store_true", help="drop what does not fit instead of refusing")
        if action == "run":
            sp.add_argument("--no-wait", action="store_true", help="skip the ready gate")
        if action == "free":
            sp.add_argument("--force", action="store_true", help="evict files other datasets still use")
    sp = add("follow", cmd_prewarm_follow, "prewarm each released dataset in this datacenter", pw)
    sp.add_argument("--once", action="store_true")
    sp.add_argument("--max-seconds", type=float)

    sp = add("release", cmd_release, "publish a dataset release event")
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--version", required=True)
    sp.add_argument("--manifest", required=True, help="path or s3://bucket/key of the file list")
    sp.add_argument("--datacenters", nargs="*")
    sp.add_argument("--prefix")

    sp = add("dashboard", cmd_dashboard, "serve the operators' dashboard")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8080)
    sp.add_argument("--snapshot", help="write a static HTML snapshot to this file and exit")

    lg = sub.add_parser("lag", help="sync lag").add_subparsers(dest="sub", required=True)
    add("snapshot", cmd_lag_snapshot, "record a lag snapshot per route into this datacenter", lg)

    sp = add("demo", cmd_demo, "the whole flow on the local stack, with a report")
    sp.add_argument("--frames", type=int, default=200)
    sp.add_argument("--out", default=".xdc/demo", help="run directory: samples, stack, report")
    sp.add_argument("--keep", action="store_true", help="leave the stack running")

    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("kafka", "botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING if args.verbose else logging.ERROR)
    try:
        return int(args.fn(args) or 0)
    except XdcError as exc:
        print(f"xdc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
