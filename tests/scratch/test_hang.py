import os, random, signal, subprocess, sys, threading, time, traceback
from pathlib import Path
from tests.mirror.chaos_support import Workload, write_config, child_env
from tests.mirror.test_crash import _spawn, FAST_GROUP
from mirror.runner import Mirror
from xdc.metrics import Metrics, new_registry
from xdc.topology import Topology
from xdc.config import load_config


def test_hang(xcfg, tag, tmp_path):
    rng = random.Random(1694759592)
    nth = rng.randint(1, 3)
    cfg_file = write_config(xcfg, tmp_path / "xdc.yaml", {
        "datacenters": {dc: {"kafka": FAST_GROUP} for dc in xcfg.datacenters},
        "mirror": {"batch_max_records": 10, "batch_max_seconds": 0.2}})
    w = Workload(xcfg, tag, seed=rng.randrange(2**32))
    for _ in range(60):
        w.step()
    w.close()
    log = tmp_path / "m.log"
    p = _spawn(cfg_file, "--follow", log, crash_at=f"mirror.after_copy:{nth}")
    print("rc", p.wait(timeout=120), log.read_text()[-300:])
    for attempt in range(2):
        dlog = tmp_path / f"drain{attempt}.log"
        with open(dlog, "wb") as out:
            d = subprocess.Popen([sys.executable, "/tmp/rl-drain.py", "--config", str(cfg_file), "--dc", "B", "mirror", "run", "--once"],
                                 cwd=Path(__file__).resolve().parents[2], env=child_env(), stdout=out, stderr=subprocess.STDOUT)
            rc = d.wait(timeout=200)
        print("DRAIN", attempt, rc, dlog)
        txt = dlog.read_text()
        print(txt[txt.find('{'):][:200])
