"""The `xdc` command: thin wiring from arguments to the library. No logic lives here.

Global options come before the subcommand: `xdc [--config FILE] [--dc DC] [--env-file FILE] CMD ...`.
Commands of installed plug-ins (entry point group `xdc.commands`, e.g. the dev tools' `stack` and
`demo`) are added to the parser; the runtime never imports them itself.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import yaml

from cache_client.prewarm import pipeline
from cache_client.prewarm.release import follow_releases, publish_release
from cache_client.selectors import roots_from_args
from mirror import dlq
from mirror.ingest import ingest, scan
from mirror.runner import Mirror
from resize.frame import resize_file
from resize.worker import ResizeWorker
from xdc.app.env import load_env_file
from xdc.app.progress import counter
from xdc.app.services import serving
from xdc.config import ResizeSettings, config_path_from_env, load_config
from xdc.errors import XdcError
from xdc.events import ReleaseEvent
from xdc.observe.dashboard import serve_dashboard, snapshot_html
from xdc.observe.lag import record_lag_snapshot
from xdc.topology import Topology, masked_view

log = logging.getLogger("xdc")
Command = Callable[[argparse.Namespace], int]
COMMAND_PLUGINS = "xdc.commands"


def topology(args: argparse.Namespace) -> Topology:
    """The config of --config / $XDC_CONFIG seen from --dc / $XDC_DC / local_dc."""
    return Topology(load_config(config_path_from_env(args.config), dc=args.dc))


def _print(obj: Any) -> None:
    print(json.dumps(obj, indent=2, default=str))


# -- commands --------------------------------------------------------------------------------
def cmd_config_check(args: argparse.Namespace) -> int:
    topo = Topology(load_config(args.file, dc=args.dc))
    print(yaml.safe_dump(masked_view(topo), sort_keys=False), end="")
    print(f"# ok: {len(topo.config.datacenters)} datacenters, {len(topo.config.routes)} routes", file=sys.stderr)
    return 0


def cmd_ingest(args: argparse.Namespace) -> int:
    with topology(args) as topo, counter("ingest", unit="file") as bar:
        rep = ingest(topo.here, args.dir, args.bucket, args.prefix, progress=bar)
    _print(rep.to_dict())
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    with topology(args) as topo:
        _print(scan(topo.here, args.bucket, args.prefix, dry_run=args.dry_run).to_dict())
    return 0


def _run_service(topo: Topology, service: Any, role: str, args: argparse.Namespace) -> int:
    """A long-running loop (mirror, resize worker) with /metrics, /healthz, /readyz while it runs.
    The state's lease comes first: a second process on a SQLite state is refused before it binds
    a port or joins the consumer group."""
    with topo, service as s, s.site.state.lease(role), \
            serving(topo.config, live=lambda: s.alive, ready=lambda: s.caught_up):
        stats = s.run(once=not args.follow, max_seconds=args.max_seconds)
    _print(stats.to_dict())
    return 0


def cmd_mirror(args: argparse.Namespace) -> int:
    topo = topology(args)
    return _run_service(topo, Mirror(topo), "mirror", args)


def cmd_resize_run(args: argparse.Namespace) -> int:
    topo = topology(args)
    return _run_service(topo, ResizeWorker(topo), "resize", args)


def cmd_resize_file(args: argparse.Namespace) -> int:
    out = resize_file(Path(args.input), Path(args.output), ResizeSettings(bucket="local", quality=args.quality))
    print(f"{args.input}: {out.source_width}x{out.source_height} -> {out.width}x{out.height} ({out.action})")
    return 0


def cmd_dlq(args: argparse.Namespace) -> int:
    with topology(args) as topo:
        letters = dlq.read_letters(topo.here, reason=args.reason)
        if args.action == "list":
            for d in letters:
                print(json.dumps(d.to_dict()))
            print(f"# {len(letters)} dead letters by reason: {dlq.summarize(letters)}", file=sys.stderr)
            return 0
        n = dlq.replay(topo, letters, topic=args.to_topic)
    print(f"replayed {n} dead letters")
    return 0


def cmd_prewarm(args: argparse.Namespace) -> int:
    req = pipeline.Request(args.list, args.dataset, args.version, args.prefix, select=args.select,
                           root=roots_from_args(args.root))
    with topology(args) as topo:
        site = topo.here
        if args.action == "plan":
            plan = pipeline.plan_prewarm(site, req, trim=args.trim)
            print(plan.summary(), file=sys.stderr)
            _print(plan.to_dict(args.max_files))
        elif args.action == "run":
            rep = pipeline.run_prewarm(site, req, trim=args.trim, wait=not args.no_wait)
            print(rep.summary(), file=sys.stderr)
            _print(rep.to_dict(args.max_files))
            return 0 if rep.complete else 1
        elif args.action == "check":
            chk = pipeline.check_list(site, req)
            print(chk.summary(), file=sys.stderr)
            _print(chk.to_dict(args.max_files))
        else:
            fr = pipeline.free_list(site, req, force=args.force)
            print(fr.summary(), file=sys.stderr)
            _print(fr.to_dict())
    return 0


def cmd_prewarm_follow(args: argparse.Namespace) -> int:
    with topology(args) as topo:
        reports = follow_releases(topo, once=args.once, max_seconds=args.max_seconds)
    _print([r.to_dict(20) for r in reports])
    return 0


def cmd_release(args: argparse.Namespace) -> int:
    ev = ReleaseEvent(args.dataset, args.version, args.manifest, time.time(), tuple(args.datacenters or ()),
                      prefix=args.prefix)
    with topology(args) as topo:
        publish_release(topo.here, ev)
    print(ev.to_json().decode())
    return 0


def cmd_dashboard(args: argparse.Namespace) -> int:
    with topology(args) as topo:
        if args.snapshot:
            Path(args.snapshot).write_text(snapshot_html(topo))
            print(f"wrote {args.snapshot}")
            return 0
        handle = serve_dashboard(topo, args.host, args.port)
        print(f"dashboard: {handle.url}", flush=True)
        try:
            while True:
                time.sleep(3600)
        finally:
            handle.stop()


def cmd_lag_snapshot(args: argparse.Namespace) -> int:
    with topology(args) as topo:
        _print(record_lag_snapshot(topo.here))
    return 0


# -- parser ----------------------------------------------------------------------------------
def service_options(sp: argparse.ArgumentParser) -> None:
    """Options shared by the long-running loops (mirror, resize worker)."""
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--once", action="store_true", help="stop when caught up (default)")
    g.add_argument("--follow", action="store_true", help="run until stopped")
    sp.add_argument("--max-seconds", type=float)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="xdc", description="Cross-datacenter mirror and cache prewarm")
    p.add_argument("--config", help="config file (default: $XDC_CONFIG)")
    p.add_argument("--dc", help="datacenter this process runs in (default: $XDC_DC, else the config's local_dc)")
    p.add_argument("--env-file", default=os.environ.get("XDC_ENV_FILE"),
                   help="KEY=VALUE lines put into the environment first, e.g. credentials (default: $XDC_ENV_FILE)")
    p.add_argument("-v", "--verbose", action="store_true")
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Command, help_: str, parent: Any = sub) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, help=help_)
        sp.set_defaults(fn=fn)
        return sp

    c = sub.add_parser("config", help="config file tools").add_subparsers(dest="sub", required=True)
    add("check", cmd_config_check, "validate a config and print it resolved, secrets masked", c).add_argument("file")

    sp = add("ingest", cmd_ingest, "upload a directory and publish its S3 events")
    sp.add_argument("dir")
    sp.add_argument("--bucket", required=True)
    sp.add_argument("--prefix", default="")

    sp = add("scan", cmd_scan, "diff a bucket against the target's state and publish missed events")
    sp.add_argument("--bucket", required=True)
    sp.add_argument("--prefix", default="")
    sp.add_argument("--dry-run", action="store_true")

    m = sub.add_parser("mirror", help="the mirror").add_subparsers(dest="sub", required=True)
    service_options(add("run", cmd_mirror, "apply change events into this datacenter", m))

    d = sub.add_parser("dlq", help="dead letters").add_subparsers(dest="sub", required=True)
    for action in ("list", "replay"):
        sp = add(action, cmd_dlq, f"{action} dead letters of this datacenter", d)
        sp.set_defaults(action=action)
        sp.add_argument("--reason", help="only letters with this reason")
        if action == "replay":
            sp.add_argument("--to-topic", help="default: each letter's origin topic")

    r = sub.add_parser("resize", help="4K -> 720p").add_subparsers(dest="sub", required=True)
    service_options(add("run", cmd_resize_run, "resize new frames of the landing datacenter", r))
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
                        help="file list or dataset index, a path or s3://bucket/key: txt, csv, parquet, pkl "
                             "(mmdet3d infos), json (COCO, nuScenes sample_data), jsonl")
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

    for ep in entry_points(group=COMMAND_PLUGINS):
        ep.load()(sub)  # a plug-in adds its subcommands (each sets `fn`)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    for noisy in ("kafka", "botocore", "boto3", "s3transfer", "urllib3"):
        logging.getLogger(noisy).setLevel(logging.WARNING if args.verbose else logging.ERROR)
    # libvips' own log lines (also in resize children, which follow this level) only with -v
    logging.getLogger("pyvips").setLevel(logging.DEBUG if args.verbose else logging.ERROR)
    try:
        if args.env_file:
            load_env_file(args.env_file)
        return int(args.fn(args) or 0)
    except XdcError as exc:
        print(f"xdc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
