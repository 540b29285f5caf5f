"""The dev tools' commands, plugged into `xdc` (entry point group `xdc.commands`): `stack`, `demo`.

    xdc stack up [--nodes N] [--cache juicefs|alluxio] [--state sqlite|postgres] [--run-dir DIR]
                 [--wan RATE]
    xdc stack status|down
    xdc stack cut|restore            (WAN mode: the link between the two datacenters)
    xdc demo [--frames N] [--out DIR] [--keep]

`stack up` prints the two variables that point the other commands at the stack
(XDC_CONFIG and XDC_ENV_FILE, the generated credentials).
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

from devtools import stack
from devtools.demo import run_demo

DEFAULT_RUN_DIR = ".xdc/stack"


def cmd_stack(args: argparse.Namespace) -> int:
    if args.action == "up":
        t0 = time.monotonic()
        cfg = stack.up(args.run_dir, nodes=args.nodes, state=args.state, cache=args.cache,
                       cache_size_mib=args.cache_size_mib, wan_rate=args.wan)
        run = Path(args.run_dir).resolve()
        print(f"stack up in {time.monotonic() - t0:.0f}s: {', '.join(cfg.datacenters)} "
              f"(cache: {args.cache}, state: {args.state}{f', WAN link {args.wan}' if args.wan else ''})")
        print(f"export XDC_CONFIG={run / stack.CONFIG_FILE} XDC_ENV_FILE={run / stack.SECRETS_FILE}")
        if args.wan:
            wan = stack.wan(run)
            for dc in cfg.datacenters:
                print(f"{dc}: internal {wan.internal(dc)}, external {wan.external(dc)}; "
                      f"run a process there with: {' '.join(wan.exec_prefix(dc))} CMD")
        return 0
    if args.action in ("cut", "restore"):
        wan = stack.wan(args.run_dir)
        if args.action == "cut":
            wan.cut()
        else:
            wan.restore()
        print(f"WAN link between {' and '.join(wan.dcs)}: {'down' if args.action == 'cut' else 'up'}")
        return 0
    if args.action == "status":
        rows = stack.status(args.run_dir)
        for r in rows:
            print("  ".join(f"{k}={v}" for k, v in r.items()))
        return 0 if rows and all(r["alive"] for r in rows) else 1
    print(f"stack down: stopped {stack.down(args.run_dir)}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    return run_demo(Path(args.out), frames=args.frames, keep=args.keep, state=args.state)


def register(sub: Any) -> None:
    """Add `stack` and `demo` to the `xdc` parser's subcommands."""
    sp = sub.add_parser("stack", help="start/inspect/stop the local two-datacenter stack (dev tools)")
    sp.set_defaults(fn=cmd_stack)
    sp.add_argument("action", choices=["up", "status", "down", "cut", "restore"])
    sp.add_argument("--run-dir", default=os.environ.get("XDC_RUN_DIR", DEFAULT_RUN_DIR))
    sp.add_argument("--nodes", type=int, default=2, help="cache nodes per datacenter (Alluxio: workers)")
    sp.add_argument("--cache", choices=stack.CACHES, default="juicefs",
                    help="cache cluster per datacenter: JuiceFS mounts, or an Alluxio 2.9 cluster (~1 GiB RSS each)")
    sp.add_argument("--cache-size-mib", type=int, default=512, help="cache space per node")
    sp.add_argument("--state", choices=["sqlite", "postgres"], default="sqlite", help="state backend")
    sp.add_argument("--wan", metavar="RATE", help="WAN mode (root): each datacenter in a network namespace of its "
                                                   "own, joined by one link shaped to RATE (tc tbf, e.g. 100mbit)")

    sp = sub.add_parser("demo", help="the whole flow on the local stack, with a report (dev tools)")
    sp.set_defaults(fn=cmd_demo)
    sp.add_argument("--frames", type=int, default=200)
    sp.add_argument("--out", default=".xdc/demo", help="run directory: samples, stack, report")
    sp.add_argument("--keep", action="store_true", help="leave the stack running")
    sp.add_argument("--state", choices=["sqlite", "postgres"], default="sqlite", help="state backend")
