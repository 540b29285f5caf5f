"""The Prometheus alert rules: promtool check + unit tests, and names that match xdc/metrics.py.

promtool comes from Debian's `prometheus` package (scripts/setup.sh installs it). Without it these
tests fail rather than skip: CI must run the rule unit tests.
"""
from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from xdc.metrics import Metrics, new_registry

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "helm" / "xdc-mirror" / "files" / "alerts.rules.yaml"
RULE_TESTS = Path(__file__).with_name("alerts.test.yaml")
ALERTS = {"XdcReplicationLagHigh", "XdcConsumerLagGrowing", "XdcDeadLettersRising",
          "XdcPrewarmPastDeadline", "XdcDatasetNotReady", "XdcVerifyDrift", "XdcNewProblem", "XdcEventGap",
          "XdcTwoWayConflicts"}

METRIC_RE = re.compile(r"\bxdc_[a-z0-9_]+\b")
SELECTOR_RE = re.compile(r"\b(xdc_[a-z0-9_]+)\s*\{([^}]*)\}")
MATCHER_RE = re.compile(r"([A-Za-z_][A-Za-z0-9_]*)\s*(?:=~|!~|!=|=)")
GROUPING_RE = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")


def promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found on PATH: install Debian package 'prometheus' "
                    "(scripts/setup.sh does: apt-get install prometheus)")
    return path


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run([promtool(), *args], capture_output=True, text=True, timeout=120, cwd=ROOT)
    if proc.returncode != 0:
        print(proc.stdout)
        print(proc.stderr)
    return proc


def unknown_names(exprs: list[str], series: dict[str, frozenset[str]]) -> list[str]:
    """Problems in PromQL texts: undefined xdc_* names, or labels the metric does not carry."""
    problems = []
    all_labels = set().union(*series.values())
    for expr in exprs:
        for name in METRIC_RE.findall(expr):
            if name not in series:
                problems.append(f"unknown metric {name} in: {expr.strip()}")
        for name, matchers in SELECTOR_RE.findall(expr):
            for label in MATCHER_RE.findall(matchers):
                if name in series and label not in series[name]:
                    problems.append(f"{name} has no label {label!r} in: {expr.strip()}")
        for group in GROUPING_RE.findall(expr):
            for label in filter(None, (x.strip() for x in group.split(","))):
                if label not in all_labels:
                    problems.append(f"no xdc metric has label {label!r} in: {expr.strip()}")
    return problems


def load_rules() -> list[dict]:
    doc = yaml.safe_load(RULES.read_text())
    return [rule for group in doc["groups"] for rule in group["rules"]]


def test_promtool_check_rules() -> None:
    proc = run_promtool("check", "rules", str(RULES))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in proc.stdout


def test_promtool_unit_tests_pass() -> None:
    proc = run_promtool("test", "rules", str(RULE_TESTS))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    """Each alert has at least one expected firing alert and one `exp_alerts: []` case."""
    doc = yaml.safe_load(RULE_TESTS.read_text())
    fires: set[str] = set()
    quiet: set[str] = set()
    for test in doc["tests"]:
        for case in test.get("alert_rule_test", []):
            (fires if case.get("exp_alerts") else quiet).add(case["alertname"])
    assert fires == ALERTS
    assert quiet == ALERTS


def test_alerts_have_severity_and_annotations() -> None:
    rules = load_rules()
    assert {r["alert"] for r in rules} == ALERTS
    for rule in rules:
        assert rule["labels"]["severity"] in {"warning", "critical"}, rule["alert"]
        assert {"summary", "description"} <= rule["annotations"].keys(), rule["alert"]
        assert "$labels." in rule["annotations"]["summary"], rule["alert"]


def test_lag_objective_is_60s_over_p99_by_route() -> None:
    (rule,) = [r for r in load_rules() if r["alert"] == "XdcReplicationLagHigh"]
    expr = " ".join(rule["expr"].split())
    assert expr.startswith("histogram_quantile(0.99, sum by (le, route) (rate(xdc_replication_lag_seconds_bucket[5m])))")
    assert expr.endswith("> 60")
    assert rule["for"] == "5m"


def test_rule_files_use_only_defined_metrics_and_labels() -> None:
    series = Metrics(new_registry()).series_labels()
    rules = load_rules()
    texts = [r["expr"] for r in rules] + [v for r in rules for v in r["annotations"].values()]
    assert unknown_names(texts, series) == []
    # and the checker itself catches mistakes
    assert unknown_names(["rate(xdc_nope_total[5m])"], series)
    assert unknown_names(['xdc_dataset_ready{route="x"}'], series)
    assert unknown_names(["sum by (bucket) (xdc_objects_pending)"], series)


def test_new_problem_alert_is_a_15_minute_window_on_the_state_first_sighting() -> None:
    (rule,) = [r for r in load_rules() if r["alert"] == "XdcNewProblem"]
    expr = " ".join(rule["expr"].split())
    assert expr == "max by (component, signature) (xdc_problem_first_seen_timestamp_seconds) > time() - 900"
    assert "for" not in rule  # at once: a new kind of problem is news now
