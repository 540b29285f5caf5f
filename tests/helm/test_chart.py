"""The Helm chart, rendered by real Helm 4 (helm-python-sdk), checked against Kubernetes schemas and
against the config loader the CLI uses."""
from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from devtools import helm_schema
from tests.helm.conftest import require
from xdc.config import XdcConfig, load_config, parse_config
from xdc.errors import ConfigError
from xdc.topology import Topology

kubernetes_validate = require("kubernetes_validate", "kubernetes-validate")

# prometheus-operator CRDs: no bundled schema; checked for shape below instead.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}
REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "helm" / "xdc-mirror"
EXAMPLES = sorted((CHART / "examples").glob("values-*.yaml"))
Manifest = dict[str, Any]
Render = Callable[..., list[tuple[str, Manifest]]]  # the `render` fixture (conftest.py)

# An old minor we support (Chart.yaml: kubeVersion >=1.27) and the newest with bundled schemas.
KUBE_VERSIONS = ("1.30.0", kubernetes_validate.latest_version())
CONFIGMAP_MAX_BYTES = 1_048_576
CONFIG_PATH = "/etc/xdc/xdc.yaml"

CASES = ["default", *(p.stem for p in EXAMPLES)]


@pytest.fixture(autouse=True)
def _no_dc_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("XDC_DC", raising=False)  # the loader reads it; tests pass dc explicitly


def read_values(path: Path) -> dict[str, Any]:
    """A values file parsed by Helm's own YAML reader (what `helm -f FILE` does)."""
    import helm_python as helm

    return helm.values_from_yaml(path.read_text())


def case_values(case: str) -> dict[str, Any]:
    """What `helm -f` gets for a case: nothing for the default, else the example file."""
    return {} if case == "default" else read_values(CHART / "examples" / f"{case}.yaml")


def merged_values(chart: Any, case: str) -> dict[str, Any]:
    return chart.merge_values(case_values(case))


def by_kind(docs: list[tuple[str, Manifest]], kind: str) -> dict[str, Manifest]:
    return {m["metadata"]["name"]: m for _, m in docs if m["kind"] == kind}


def containers(docs: list[tuple[str, Manifest]]) -> dict[str, dict[str, Any]]:
    """component name -> its (only) container."""
    out = {}
    for dep in by_kind(docs, "Deployment").values():
        component = dep["metadata"]["labels"]["app.kubernetes.io/component"]
        (container,) = dep["spec"]["template"]["spec"]["containers"]
        out[component] = container
    return out


def embedded_config(docs: list[tuple[str, Manifest]]) -> str:
    (cm,) = [m for name, m in by_kind(docs, "ConfigMap").items() if name.endswith("-config")]
    return cm["data"]["xdc.yaml"]


# -- values.schema.json ------------------------------------------------------------------------
def test_values_schema_is_generated_from_the_config_model() -> None:
    committed = (CHART / "values.schema.json").read_text()
    assert committed == helm_schema.render(), (
        "helm/xdc-mirror/values.schema.json is stale: "
        "python -m devtools.helm_schema > helm/xdc-mirror/values.schema.json"
    )


def test_schema_config_is_the_config_models_schema() -> None:
    schema = helm_schema.values_schema()
    model = XdcConfig.model_json_schema()
    assert schema["$defs"] == model["$defs"]
    assert set(schema["properties"]["config"]["properties"]) == set(model["properties"]) - {"base_dir"}
    assert schema["properties"]["config"]["additionalProperties"] is False


@pytest.mark.parametrize("case", CASES)
def test_values_validate_against_schema(case: str) -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())
    values = read_values(CHART / "values.yaml") if case == "default" else case_values(case)
    jsonschema.Draft202012Validator.check_schema(schema)
    jsonschema.validate(values, schema, cls=jsonschema.Draft202012Validator)


@pytest.mark.parametrize("where", [(), ("mirror",), ("datacenters", "idc-a", "s3")])
def test_unknown_config_key_is_rejected_by_schema_loader_and_helm(chart: Any, where: tuple[str, ...]) -> None:
    values = read_values(CHART / "values.yaml")
    config = values["config"]
    node = config
    for key in where:
        node = node[key]
    node["bogus_key"] = 1
    with pytest.raises(jsonschema.ValidationError, match="bogus_key"):
        jsonschema.validate(values, helm_schema.values_schema(), cls=jsonschema.Draft202012Validator)
    with pytest.raises(ConfigError, match="bogus_key: unknown key"):
        parse_config(config, dc=values["dc"])
    import helm_python as helm

    with pytest.raises(helm.HelmValuesError, match="bogus_key"):
        chart.render(values={"config": config}, name="xdc")


def test_unknown_chart_key_is_rejected_by_helm(chart: Any) -> None:
    import helm_python as helm

    with pytest.raises(helm.HelmValuesError, match="replica"):
        chart.render(values={"mirror": {"replica": 3}}, name="xdc")  # typo of replicas


# -- render + Kubernetes schemas ---------------------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_every_manifest_is_valid_kubernetes(render: Render, case: str) -> None:
    docs = render(case_values(case))
    kinds = {m["kind"] for _, m in docs}
    assert {"ConfigMap", "Deployment", "Service"} <= kinds
    for template, m in docs:
        if (m["apiVersion"], m["kind"]) in CRD_KINDS:
            assert m["metadata"]["name"] and isinstance(m["spec"], dict), template
            continue
        for version in KUBE_VERSIONS:
            try:
                kubernetes_validate.validate(m, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{template}: {m['kind']}/{m['metadata']['name']} (k8s {version}): {path}: {exc.message}")


@pytest.mark.parametrize("case", CASES)
def test_helm_lint_is_clean(case: str) -> None:
    import helm_python as helm

    report = helm.lint(str(CHART), case_values(case), strict=True, kube_version="v1.30.0")
    problems = [m for m in report["messages"] if m["severity"] >= 2]  # 2 warning, 3 error
    assert not report["errors"] and not problems, report


@pytest.mark.parametrize("case", [p.stem for p in EXAMPLES])
def test_examples_render_monitoring_crds(render: Render, case: str) -> None:
    docs = render(case_values(case))
    (sm,) = by_kind(docs, "ServiceMonitor").values()
    assert sm["spec"]["endpoints"][0]["port"] == "metrics"
    (metrics_svc,) = [s for n, s in by_kind(docs, "Service").items() if n.endswith("-metrics")]
    assert sm["spec"]["selector"]["matchLabels"].items() <= metrics_svc["metadata"]["labels"].items()
    (rule,) = by_kind(docs, "PrometheusRule").values()
    rules = [r for g in rule["spec"]["groups"] for r in g["rules"]]
    assert rules and all(("alert" in r or "record" in r) and r["expr"] for r in rules)
    source = yaml.safe_load((CHART / "files" / "alerts.rules.yaml").read_text())
    assert rule["spec"]["groups"] == source["groups"]


def test_default_renders_no_crds(render: Render) -> None:
    kinds = {m["kind"] for _, m in render()}
    assert not kinds & {k for _, k in CRD_KINDS}


# -- the embedded config is what the CLI loads ---------------------------------------------------
@pytest.mark.parametrize("case", CASES)
def test_embedded_config_loads_with_the_cli_loader(chart: Any, render: Render, case: str, tmp_path: Path) -> None:
    values = merged_values(chart, case)
    text = embedded_config(render(case_values(case)))
    path = tmp_path / "xdc.yaml"
    path.write_text(text)
    cfg = load_config(path, dc=values["dc"])
    assert cfg.local_dc == values["dc"]
    assert cfg == parse_config(values["config"], base_dir=tmp_path, dc=values["dc"])
    # SQLite state lives on the volume, not beside the read-only ConfigMap mount.
    mount = Path(values["persistence"]["mountPath"])
    for name in cfg.datacenters:
        site = Topology(cfg).site(name)
        if not site.takes_replicas:
            assert values["persistence"]["enabled"], name
            assert mount in Path(site.state_location).parents, name


@pytest.mark.parametrize("case", CASES)
def test_workloads_run_the_cli_with_probes_resources_and_secrets(chart: Any, render: Render, case: str) -> None:
    values = merged_values(chart, case)
    docs = render(case_values(case))
    port = values["config"]["metrics"]["port"]
    by_component = containers(docs)
    expected = {"mirror", "dashboard"} | ({"resize"} if values["resize"]["enabled"] else set())
    assert set(by_component) == expected

    config_flag = ["--config", CONFIG_PATH]
    assert by_component["mirror"]["args"] == [*config_flag, "mirror", "run", "--follow"]
    if "resize" in by_component:
        assert by_component["resize"]["args"] == [*config_flag, "resize", "run", "--follow"]
    dash = by_component["dashboard"]["args"]
    assert dash[:3] == [*config_flag, "dashboard"] and dash[dash.index("--host") + 1] == "0.0.0.0"
    assert dash[dash.index("--port") + 1] == str(values["dashboard"]["port"])

    cred_envs = {
        env
        for d in values["config"]["datacenters"].values()
        for env in (d["s3"]["credentials"].get("access_key_env"), d["s3"]["credentials"].get("secret_key_env"))
        if env
    }
    for component, c in by_component.items():
        env = {e["name"]: e for e in c["env"]}
        assert env["XDC_DC"]["value"] == values["dc"]
        assert env["XDC_CONFIG"]["value"] == CONFIG_PATH
        for name in cred_envs:  # from a Secret, never a literal
            assert "value" not in env[name] and env[name]["valueFrom"]["secretKeyRef"]["name"], (component, name)
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports["metrics"] == port
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}
        assert c["resources"]["requests"] and c["resources"]["limits"], component
        mounts = {m["mountPath"] for m in c["volumeMounts"]}
        assert {"/etc/xdc", values["persistence"]["mountPath"]} <= mounts  # an emptyDir without persistence

    mirror = next(d for n, d in by_kind(docs, "Deployment").items() if n.endswith("-mirror"))
    assert mirror["spec"]["replicas"] == values["mirror"]["replicas"]
    annotations = mirror["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == str(port)
    assert annotations["checksum/config"]


@pytest.mark.parametrize("component", ["mirror", "resize", "dashboard"])
def test_container_args_parse_with_the_real_cli(render: Render, component: str) -> None:
    """The rendered command line is one `xdc` accepts (global --config before the subcommand)."""
    from xdc.app.cli import build_parser

    parser = build_parser()
    args = containers(render(case_values("values-idc-a")))[component]["args"]
    assert args[:2] == ["--config", CONFIG_PATH]
    ns = parser.parse_args(args)
    assert ns.config == CONFIG_PATH
    if component != "dashboard":
        assert ns.follow is True


def test_dashboard_service_targets_the_dashboard(render: Render) -> None:
    docs = render()
    svc = next(s for n, s in by_kind(docs, "Service").items() if n.endswith("-dashboard"))
    dep = next(d for n, d in by_kind(docs, "Deployment").items() if n.endswith("-dashboard"))
    assert svc["spec"]["selector"].items() <= dep["spec"]["template"]["metadata"]["labels"].items()
    assert svc["spec"]["ports"][0]["targetPort"] == "http"


def test_no_secret_values_in_rendered_manifests(render: Render) -> None:
    for case in CASES:
        kinds = {m["kind"] for _, m in render(case_values(case))}
        assert "Secret" not in kinds  # the chart only references existing Secrets


# -- the two-datacenter examples ---------------------------------------------------------------
def test_examples_share_one_config_and_differ_in_dc() -> None:
    a, b = (case_values(p.stem) for p in EXAMPLES)
    assert a["config"] == b["config"]
    assert {a["dc"], b["dc"]} == set(a["config"]["datacenters"]) == {"idc-a", "idc-b"}
    # Frames land in one DC: only that release runs the resize worker.
    resize_dc = a["config"]["resize"]["dc"]
    assert [v["resize"]["enabled"] for v in (a, b)] == [v["dc"] == resize_dc for v in (a, b)]


def test_mirror_replicas_fit_the_partitions() -> None:
    for p in EXAMPLES:
        v = case_values(p.stem)
        sources = {r["source"]["dc"] for r in v["config"]["routes"]}
        partitions = max(v["config"]["datacenters"][dc]["kafka"]["partitions"] for dc in sources)
        assert v["mirror"]["replicas"] <= partitions, p.name


# -- replicas: PostgreSQL state only, a PodDisruptionBudget, no rolling update on SQLite -------------
PG = "postgresql://xdc@pg.example.internal:5432/xdc"


def _state(**urls: str) -> dict[str, Any]:
    return {"config": {"datacenters": {dc: {"state_url": url} for dc, url in urls.items()}}}


def test_schema_refuses_replicas_when_every_state_is_sqlite() -> None:
    schema = helm_schema.values_schema()
    values = read_values(CHART / "values.yaml")
    jsonschema.validate(values, schema, cls=jsonschema.Draft202012Validator)  # the default: 1 replica
    for workload in ("mirror", "resize"):
        bad = {**values, workload: {**values[workload], "replicas": 2}}
        with pytest.raises(jsonschema.ValidationError, match="2 is greater than the maximum of 1"):
            jsonschema.validate(bad, schema, cls=jsonschema.Draft202012Validator)
    on_pg = {**values, "mirror": {**values["mirror"], "replicas": 4}}
    for dc in on_pg["config"]["datacenters"].values():
        dc["state_url"] = PG
    jsonschema.validate(on_pg, schema, cls=jsonschema.Draft202012Validator)


@pytest.mark.parametrize(("values", "message"), [
    ({"mirror": {"replicas": 2}}, "at '/mirror/replicas': maximum: got 2, want 1"),  # the schema: all SQLite
    ({"mirror": {"replicas": 2}, **_state(**{"idc-b": PG})},
     "mirror.replicas is 2, but the state of datacenter idc-a is SQLite (sqlite:////var/lib/xdc/state-idc-a.db), "
     "which takes one mirror process: run 1 replica, or set config.datacenters.idc-a.state_url to postgresql://"),
    ({"resize": {"replicas": 3}, **_state(**{"idc-b": PG})},
     "resize.replicas is 3, but the state of datacenter idc-a is SQLite"),
])
def test_render_refuses_replicas_on_sqlite_state(chart: Any, values: dict[str, Any], message: str) -> None:
    import helm_python as helm

    with pytest.raises(helm.HelmError, match=re.escape(message)):
        chart.render(values=values, name="xdc")


def _pdbs(docs: list[tuple[str, Manifest]]) -> dict[str, Manifest]:
    return {m["metadata"]["labels"]["app.kubernetes.io/component"]: m for _, m in docs
            if m["kind"] == "PodDisruptionBudget"}


def test_replicas_on_postgresql_state_get_a_disruption_budget_and_roll(render: Render) -> None:
    docs = render({"mirror": {"replicas": 4}, "resize": {"replicas": 2}, "persistence": {"enabled": False},
                   **_state(**{"idc-a": PG, "idc-b": PG})})
    deployments = {d["metadata"]["labels"]["app.kubernetes.io/component"]: d for d in by_kind(docs, "Deployment").values()}
    assert deployments["mirror"]["spec"]["replicas"] == 4 and deployments["resize"]["spec"]["replicas"] == 2
    pdbs = _pdbs(docs)
    assert set(pdbs) == {"mirror", "resize"}
    for name, pdb in pdbs.items():
        assert pdb["spec"]["maxUnavailable"] == 1
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
        assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == name
        assert "strategy" not in deployments[name]["spec"]  # rolling update: replicas may overlap
    for version in KUBE_VERSIONS:
        for pdb in pdbs.values():
            kubernetes_validate.validate(pdb, version, strict=True)


def test_sqlite_state_runs_one_process_and_never_two_during_an_update(render: Render) -> None:
    docs = render()
    assert not _pdbs(docs)  # one replica: nothing to budget
    for d in by_kind(docs, "Deployment").values():
        component = d["metadata"]["labels"]["app.kubernetes.io/component"]
        if component in ("mirror", "resize"):  # a second pod of a rolling update would be refused
            assert d["spec"]["replicas"] == 1 and d["spec"]["strategy"] == {"type": "Recreate"}, component
        else:
            assert "strategy" not in d["spec"], component


@pytest.mark.parametrize("case", [p.stem for p in EXAMPLES])
def test_examples_run_replicas_on_postgresql_with_budgets(chart: Any, render: Render, case: str) -> None:
    values = merged_values(chart, case)
    docs = render(case_values(case))
    pdbs = _pdbs(docs)
    for name in ("mirror", "resize"):
        runs = values[name]["enabled"] and (name == "mirror" or values["config"].get("resize"))
        assert (name in pdbs) == bool(runs and values[name]["replicas"] > 1), name
    assert values["mirror"]["replicas"] > 1
    assert all(d["state_url"].startswith("postgresql://") for d in values["config"]["datacenters"].values())


# -- render-time checks the schema cannot express ----------------------------------------------
@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"dc": "idc-z"}, "is not one of config.datacenters"),
        ({"config": {"metrics": {"port": 0}}}, "config.metrics.port must be > 0"),
        ({"config": {"metrics": {"host": "127.0.0.1"}}}, "config.metrics.host"),
        ({"secrets": {"s3": {"idc-b": None}}}, "secrets.s3.idc-b"),
    ],
)
def test_render_refuses_inconsistent_values(chart: Any, values: dict[str, Any], message: str) -> None:
    import helm_python as helm

    with pytest.raises(helm.HelmError, match=message):
        chart.render(values=values, name="xdc")


# -- monitoring and DAG ConfigMaps -----------------------------------------------------------------
def test_grafana_dashboard_configmap(render: Render) -> None:
    (cm,) = [m for n, m in by_kind(render(), "ConfigMap").items() if n.endswith("-grafana-dashboard")]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    (text,) = cm["data"].values()
    assert json.loads(text) == json.loads((CHART / "files" / "grafana-dashboard.json").read_text())


def test_dags_configmap_holds_every_dag_file(render: Render) -> None:
    (cm,) = [m for n, m in by_kind(render(), "ConfigMap").items() if n.endswith("-dags")]
    expected = {p.name: p.read_text() for p in sorted((REPO / "dags").glob("*.py"))}
    got = cm.get("data") or {}
    assert set(got) == set(expected)
    for name, text in expected.items():
        assert got[name].rstrip("\n") == text.rstrip("\n"), name
    assert sum(len(t.encode()) for t in got.values()) < CONFIGMAP_MAX_BYTES


def test_dags_configmap_takes_python_files_of_the_linked_dags_dir(tmp_path: Path) -> None:
    """The chart's dags/ is a link to the repo's dags/; with stand-in files, only *.py are taken."""
    import helm_python as helm

    copy = tmp_path / "xdc-mirror"
    shutil.copytree(CHART, copy, ignore=shutil.ignore_patterns("dags"))
    (copy / "dags").mkdir()
    (copy / "dags" / "xdc_mirror_dag.py").write_text('"""A DAG."""\nfrom airflow.sdk import dag\n')
    (copy / "dags" / "README.md").write_text("not a DAG\n")
    with helm.Chart.load(str(copy)) as chart:
        rendered = chart.render(name="xdc", namespace="xdc")
    (text,) = [t for p, t in rendered.items() if p.endswith("dags-configmap.yaml")]
    assert yaml.safe_load(text)["data"] == {"xdc_mirror_dag.py": '"""A DAG."""\nfrom airflow.sdk import dag'}


def test_ca_bundles_are_mounted_where_the_config_points(chart: Any, render: Render) -> None:
    """A private CA from a ConfigMap, mounted as a file into every pod, named by the config's
    s3.ca_bundle: the HTTPS endpoint of that datacenter is trusted by every S3 client."""
    values = case_values("values-idc-b")
    values["caBundles"] = [{"configMap": "corp-ca", "key": "ca.pem", "mountPath": "/etc/xdc-ca/corp.pem"}]
    values["config"]["datacenters"]["idc-a"]["s3"]["ca_bundle"] = "/etc/xdc-ca/corp.pem"
    docs = render(values)
    for dep in by_kind(docs, "Deployment").values():
        spec = dep["spec"]["template"]["spec"]
        vols = {v["name"]: v for v in spec["volumes"]}
        assert vols["ca-0"]["configMap"] == {"name": "corp-ca", "items": [{"key": "ca.pem", "path": "ca.pem"}]}
        (c,) = spec["containers"]
        mount = next(m for m in c["volumeMounts"] if m["name"] == "ca-0")
        assert mount == {"name": "ca-0", "mountPath": "/etc/xdc-ca/corp.pem", "subPath": "ca.pem", "readOnly": True}
    assert "ca_bundle: /etc/xdc-ca/corp.pem" in embedded_config(docs)
