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
import signal
import sys
import time
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from pathlib import Path
from typing import Any

import yaml

from cache_client.prewarm import fluid, pipeline
from cache_client.prewarm.reconcile import reconcile
from cache_client.prewarm.release import follow_releases, publish_release
from cache_client.selectors import roots_from_args
from mirror import dlq
from mirror.ingest import ingest, scan
from mirror.runner import Mirror
from mirror.verify import verify_route
from resize.frame import resize_file
from resize.worker import ResizeWorker
from xdc.app.env import load_env_file
from xdc.app.progress import counter
from xdc.app.services import serving
from xdc.config import ResizeSettings, config_path_from_env, load_config
from xdc.errors import ConfigError, XdcError
from xdc.events import ReleaseEvent
from xdc.observe import configs, impact, telemetry, timeline
from xdc.observe.dashboard import serve_dashboard, snapshot_html
from xdc.observe.lag import record_lag_snapshot
from xdc.observe.problems import list_problems, render_problems
from xdc.topology import Topology, masked_view

log = logging.getLogger("xdc")
Command = Callable[[argparse.Namespace], int]
COMMAND_PLUGINS = "xdc.commands"


_OBSERVED: list[telemetry.Telemetry] = []  # closed (flushed) by main() when the command ends
LONG_RUNNING = {"mirror", "resize", "prewarm follow", "dashboard"}  # record their config and heartbeat


def topology(args: argparse.Namespace, *, observe: bool = True) -> Topology:
    """The config of --config / $XDC_CONFIG seen from --dc / $XDC_DC / local_dc. The first one of a
    command sets up its telemetry (traces, problem signatures, config record), unless `observe`
    is False (commands that only read the state)."""
    topo = Topology(load_config(config_path_from_env(args.config), dc=args.dc))
    if observe and not _OBSERVED:
        name = args.command if args.command != "prewarm" or args.sub != "follow" else "prewarm follow"
        _OBSERVED.append(telemetry.start(topo, args.command, long_running=name in LONG_RUNNING))
    return topo


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
        rep = ingest(topo.here, args.dir, args.bucket, args.prefix, progress=bar,
                     announce=True if args.announce else None)
    _print(rep.to_dict())
    return 0


def cmd_scan(args: argparse.Namespace) -> int:
    with topology(args) as topo:
        _print(scan(topo.here, args.bucket, args.prefix, dry_run=args.dry_run).to_dict())
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    with topology(args) as topo:
        names = [args.route] if args.route else [r.name for r in topo.config.routes]
        reports = [verify_route(topo, n, repair=args.repair, max_sample=args.max_differences) for n in names]
    for rep in reports:
        print(rep.summary(), file=sys.stderr)
    _print([rep.to_dict() for rep in reports])
    return 1 if any(rep.drift for rep in reports) and not args.repair else 0


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
                           root=roots_from_args(args.root), make_room=getattr(args, "make_room", False))
    with topology(args) as topo:
        site = topo.here
        if args.action == "plan":
            plan = pipeline.plan_prewarm(site, req, trim=args.trim)
            print(plan.summary(), file=sys.stderr)
            _print(plan.to_dict(args.max_files))
        elif args.action == "run":
            rep = pipeline.run_prewarm(site, req, trim=args.trim, wait=not args.no_wait,
                                       publish_ready="try")  # published when it can be: warned, never lost
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


def cmd_prewarm_retire(args: argparse.Namespace) -> int:
    with topology(args) as topo:
        done = pipeline.retire(topo.here, args.dataset, args.version)
    if not done:
        print(f"xdc: error: {args.dataset}@{args.version} is not registered in {topo.here_name}", file=sys.stderr)
        return 1
    print(f"retired {args.dataset}@{args.version}")
    return 0


def cmd_prewarm_export(args: argparse.Namespace) -> int:
    req = pipeline.Request(args.list, args.dataset, args.version, args.prefix, select=args.select,
                           root=roots_from_args(args.root))
    with topology(args) as topo:
        site = topo.here
        settings = fluid.settings_of(site, {
            "dataset": args.fluid_dataset, "namespace": args.namespace, "path_root": args.path_root,
            "load_metadata": args.load_metadata, "policy": args.policy, "schedule": args.schedule,
            "replicas": args.replicas, "chunk_files": args.chunk_files})
        res = pipeline.resolve(site, req)
        sizes = None
        if not args.no_wait:  # the ready gate, through the object store: Fluid loads only what is there
            stat = fluid.store_sizes(site)
            pipeline.wait_ready(site, res.files, stat=stat)
            sizes = stat(res.files)
        export = fluid.export_fluid(site, req, settings, res=res, sizes=sizes)
        if args.out == "-":
            sys.stdout.write(export.yaml())
        else:
            fluid.write_export(site, export, args.out)
    print(export.summary(), file=sys.stderr)
    return 0


def cmd_prewarm_follow(args: argparse.Namespace) -> int:
    with topology(args) as topo:
        reports = follow_releases(topo, once=args.once, max_seconds=args.max_seconds)
    _print([r.to_dict(20) for r in reports])
    return 0


def cmd_prewarm_reconcile(args: argparse.Namespace) -> int:
    with topology(args) as topo:
        rep = reconcile(topo.here, grace_s=args.grace, dry_run=args.dry_run)
    print(rep.summary(), file=sys.stderr)
    _print(rep.to_dict())
    return 1 if any(r["outcome"] in ("failed", "pending", "incomplete") for r in rep.redriven) else 0


def cmd_release(args: argparse.Namespace) -> int:
    ev = ReleaseEvent(args.dataset, args.version, args.manifest, time.time(), tuple(args.datacenters or ()),
                      prefix=args.prefix, select=args.select, root=roots_from_args(args.root),
                      make_room=args.make_room)
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
        env = args.token_env or topo.config.metrics.token_env
        token = None
        if env:
            token = os.environ.get(env)
            if not token:
                raise ConfigError(f"dashboard: environment variable {env} (the token) is not set")
        handle = serve_dashboard(topo, args.host, args.port, token=token)
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


def cmd_trace(args: argparse.Namespace) -> int:
    with topology(args, observe=False) as topo:
        tl = timeline.timeline(topo, args.key, dc=args.key_dc, trace_id=args.trace)
    if tl is None:
        print(f"no trace kept for {args.key} (traced objects are sampled: tracing.sample_ratio)", file=sys.stderr)
        return 1
    if args.json:
        _print(tl.to_dict())
    else:
        print(timeline.render(tl))
    return 0


def cmd_config_history(args: argparse.Namespace) -> int:
    with topology(args, observe=False) as topo:
        rows = configs.history(topo, limit=args.limit)
        procs = configs.processes(topo)
    if args.json:
        _print({"versions": rows, **procs})
        return 0
    print(f"{'version':12}  {'first seen (UTC)':19}  {'last seen':19}  processes  running  datacenters")
    for r in rows:
        mark = "  <- this file" if r["hash"].startswith(procs["file_version"]) else ""
        print(f"{configs.short(r['hash']):12}  {_when(r['first_seen'])}  {_when(r['last_seen'])}  "
              f"{r['processes']:9d}  {r['running']:7d}  {','.join(r['datacenters'])}{mark}")
    if procs["mixed"]:
        print(f"# processes run different versions: {', '.join(procs['running_versions'])}", file=sys.stderr)
    return 0


def cmd_config_diff(args: argparse.Namespace) -> int:
    with topology(args, observe=False) as topo:
        out = configs.diff(topo, args.a, args.b)
    print(out or "# no difference", end="" if out else "\n")
    return 0


def cmd_config_impact(args: argparse.Namespace) -> int:
    new = load_config(args.file, allow_bucket_collisions=True)
    with topology(args, observe=False) as topo:
        rep = impact.impact(topo, new, list_sources=not args.no_list)
    if args.json:
        _print(rep.to_dict())
    else:
        print(rep.summary())
    return 0


def cmd_problems(args: argparse.Namespace) -> int:
    with topology(args, observe=False) as topo:
        rows = list_problems(topo, since_s=args.since, limit=args.limit)
    if args.json:
        _print(rows)
    else:
        print(render_problems(rows))
    return 0


def _when(t: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(t)) if t else "-".ljust(19)


# -- parser ----------------------------------------------------------------------------------
def service_options(sp: argparse.ArgumentParser) -> None:
    """Options shared by the long-running loops (mirror, resize worker)."""
    g = sp.add_mutually_exclusive_group()
    g.add_argument("--once", action="store_true", help="stop when caught up (default)")
    g.add_argument("--follow", action="store_true", help="run until stopped")
    sp.add_argument("--max-seconds", type=float)


def list_options(sp: argparse.ArgumentParser) -> None:
    """How paths are read out of a dataset index (prewarm commands and releases alike)."""
    sp.add_argument("--select", metavar="EXPR",
                    help="where the paths are: JMESPath for pkl/json/jsonl (e.g. 'infos[].cams.*.data_path'), "
                         "column names for csv/parquet (e.g. 'cam_front,lidar'); default: the detected shape's")
    sp.add_argument("--root", metavar="[TAG=]PREFIX", action="append",
                    help="s3://bucket/prefix joined to relative paths; TAG=PREFIX (repeatable) for per-modality "
                         "roots relative to it, as mmdet3d's data_prefix (pts=samples/LIDAR_TOP, CAM_FRONT=...)")


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

    c = sub.add_parser("config", help="config file tools, history and impact").add_subparsers(dest="sub", required=True)
    add("check", cmd_config_check, "validate a config and print it resolved, secrets masked", c).add_argument("file")
    sp = add("history", cmd_config_history, "config versions the processes ran, newest first", c)
    sp.add_argument("--limit", type=int, default=20)
    sp.add_argument("--json", action="store_true")
    sp = add("diff", cmd_config_diff, "diff two configs (each a recorded hash or prefix, or a file)", c)
    sp.add_argument("a")
    sp.add_argument("b")
    sp = add("impact", cmd_config_impact, "what a proposed config would change, before it is applied", c)
    sp.add_argument("file", help="the proposed config (YAML)")
    sp.add_argument("--no-list", action="store_true", help="do not list source buckets for newly covered objects")
    sp.add_argument("--json", action="store_true")

    sp = add("trace", cmd_trace, "one object's timeline across both datacenters (from the kept spans)")
    sp.add_argument("key", help="bucket/key in any datacenter")
    sp.add_argument("--dc", dest="key_dc", help="the datacenter whose bucket KEY names (default: by bucket name)")
    sp.add_argument("--trace", help="this trace id (default: the most recent one of the object)")
    sp.add_argument("--json", action="store_true")

    sp = add("problems", cmd_problems, "log signatures (new kinds of problems), newest first")
    sp.add_argument("--since", type=float, help="only those first seen in the last SECONDS")
    sp.add_argument("--limit", type=int, default=50)
    sp.add_argument("--json", action="store_true")

    sp = add("ingest", cmd_ingest, "upload a directory (announced by the store, or by ingest itself)")
    sp.add_argument("dir")
    sp.add_argument("--bucket", required=True)
    sp.add_argument("--prefix", default="")
    sp.add_argument("--announce", action="store_true",
                    help="publish an event per object even if the config says the store notifies")

    sp = add("scan", cmd_scan, "diff a bucket against the target's state and publish missed events")
    sp.add_argument("--bucket", required=True)
    sp.add_argument("--prefix", default="")
    sp.add_argument("--dry-run", action="store_true")

    sp = add("verify", cmd_verify, "list source and target of a route and compare them (exit 1 on drift)")
    sp.add_argument("--route", help="a route name (default: every route)")
    sp.add_argument("--repair", action="store_true", help="publish the events that fix each difference")
    sp.add_argument("--max-differences", type=int, default=20, help="differences listed in the output")

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
        list_options(sp)
        sp.add_argument("--dataset")
        sp.add_argument("--version", default="")
        sp.add_argument("--prefix", help="keys must stay under this bucket/prefix")
        sp.add_argument("--max-files", type=int, default=50, help="files listed in the JSON output")
        if action in ("plan", "run"):
            sp.add_argument("--trim", action="store_true", help="drop what does not fit instead of refusing")
            sp.add_argument("--make-room", action="store_true",
                            help="where the warm would pass a node's high watermark, free retired datasets (oldest "
                                 "first) down to its low watermark" + (" (plan: only say which)" if action == "plan" else ""))
        if action == "run":
            sp.add_argument("--no-wait", action="store_true", help="skip the ready gate")
        if action == "free":
            sp.add_argument("--force", action="store_true", help="evict files other datasets still use")
    sp = add("retire", cmd_prewarm_retire, "mark a dataset version retired: its files stay cached until a warm "
             "needs the room (--make-room)", pw)
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--version", default="")
    sp = add("export", cmd_prewarm_export, "write the list as Fluid DataLoad manifests (for caches Fluid runs)", pw)
    sp.add_argument("--list", required=True, help="file list or dataset index, a path or s3://bucket/key")
    list_options(sp)
    sp.add_argument("--dataset")
    sp.add_argument("--version", default="")
    sp.add_argument("--prefix", help="keys must stay under this bucket/prefix")
    sp.add_argument("--format", choices=["fluid"], default="fluid")
    sp.add_argument("--out", default="-", help="- (stdout), FILE.yaml, a directory, or s3://bucket/prefix")
    sp.add_argument("--no-wait", action="store_true", help="skip the ready gate (every file in the object store)")
    g = sp.add_argument_group("Fluid (default: the datacenter's cache.fluid)")
    g.add_argument("--fluid-dataset", help="the Fluid Dataset the DataLoads load into")
    g.add_argument("--namespace")
    g.add_argument("--path-root", help="where the volume's /bucket/key is in the Dataset (default /)")
    g.add_argument("--load-metadata", action=argparse.BooleanOptionalAction, default=None,
                   help="sync the Dataset's metadata first (first DataLoad only)")
    g.add_argument("--policy", choices=["Once", "Cron", "OnEvent"])
    g.add_argument("--schedule", help="cron expression (policy Cron)")
    g.add_argument("--replicas", type=int, help="spec.target[].replicas")
    g.add_argument("--chunk-files", type=int, help="most paths per DataLoad")
    sp = add("follow", cmd_prewarm_follow, "prewarm each released dataset in this datacenter", pw)
    sp.add_argument("--once", action="store_true")
    sp.add_argument("--max-seconds", type=float)
    sp = add("reconcile", cmd_prewarm_reconcile,
             "drive again every release this datacenter has no result for (releases topics vs ledger vs registrations)", pw)
    sp.add_argument("--dry-run", action="store_true", help="only list what would be driven again")
    sp.add_argument("--grace", type=float, help="seconds a release is left alone after it was published or tried "
                                                "(default: prewarm.reconcile_after_seconds)")

    sp = add("release", cmd_release, "publish a dataset release event")
    sp.add_argument("--dataset", required=True)
    sp.add_argument("--version", required=True)
    sp.add_argument("--manifest", required=True, help="path or s3://bucket/key of the file list or dataset index")
    sp.add_argument("--datacenters", nargs="*")
    sp.add_argument("--prefix")
    list_options(sp)
    sp.add_argument("--make-room", action="store_true",
                    help="free retired datasets where the warm would pass a node's high watermark")

    sp = add("dashboard", cmd_dashboard, "serve the operators' dashboard")
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=8080)
    sp.add_argument("--snapshot", help="write a static HTML snapshot to this file and exit")
    sp.add_argument("--token-env", help="env var holding the token the page then asks for (required on any host "
                                        "but 127.0.0.1; default: metrics.token_env)")

    lg = sub.add_parser("lag", help="sync lag").add_subparsers(dest="sub", required=True)
    add("snapshot", cmd_lag_snapshot, "record a lag snapshot per route into this datacenter", lg)

    for ep in entry_points(group=COMMAND_PLUGINS):
        ep.load()(sub)  # a plug-in adds its subcommands (each sets `fn`)
    return p


class Terminated(BaseException):
    """SIGTERM (e.g. Kubernetes stopping a pod): unwind like Ctrl-C, so clean-up runs."""


def _terminate(signum: int, frame: Any) -> None:
    raise Terminated()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # the loops end through their normal clean-up: telemetry flushed, the process record closed
    signal.signal(signal.SIGTERM, _terminate)
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
        for t in _OBSERVED:  # a problem signature too (not logged twice on stderr)
            t.problem(logging.ERROR, "xdc %s failed: %s", args.command, exc)
        print(f"xdc: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Terminated:
        return 143
    finally:
        while _OBSERVED:
            _OBSERVED.pop().close()


if __name__ == "__main__":
    sys.exit(main())
