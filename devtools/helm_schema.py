"""The Helm chart's values.schema.json, generated from the config model.

The chart's ``config:`` block IS an XdcConfig, so its schema is XdcConfig's own JSON schema (unknown
keys refused, as the loader refuses them); the chart's other keys (dc, image, secrets, the three
workloads, monitoring, ...) are described here. Helm validates values against this file on every
install, upgrade and template, so a typo in a values file fails before anything reaches a cluster.

    python -m devtools.helm_schema > helm/xdc-mirror/values.schema.json
"""
from __future__ import annotations

import json
import sys
from typing import Any

from xdc.config import XdcConfig

# Set by the loader from the config file's location, never written by hand.
_LOADER_KEYS = ("base_dir",)

_STR: dict[str, Any] = {"type": "string"}
_BOOL: dict[str, Any] = {"type": "boolean"}
_OBJ: dict[str, Any] = {"type": "object"}  # free-form Kubernetes fragments (resources, affinity...)
_LIST: dict[str, Any] = {"type": "array"}
_PORT: dict[str, Any] = {"type": "integer", "minimum": 1, "maximum": 65535}
_ENV_NAME: dict[str, Any] = {"type": "string", "pattern": r"^[A-Za-z_][A-Za-z0-9_]*$"}
# A Secret's name is a DNS subdomain.
_SECRET_NAME: dict[str, Any] = {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$", "maxLength": 253}


def _closed(properties: dict[str, Any], required: list[str] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "additionalProperties": False, "properties": properties}
    if required:
        out["required"] = required
    return out


_PDB: dict[str, Any] = {
    **_closed({
        "enabled": _BOOL,
        "maxUnavailable": {"oneOf": [{"type": "integer", "minimum": 1}, {"type": "string", "pattern": r"^\d+%$"}]},
    }),
    "description": "A PodDisruptionBudget for the workload when it runs more than one replica.",
}


def _workload(description: str, **extra: dict[str, Any]) -> dict[str, Any]:
    return {
        **_closed({
            "enabled": _BOOL,
            "replicas": {"type": "integer", "minimum": 0},
            "extraArgs": {"type": "array", "items": _STR},
            "resources": _OBJ,
            "podAnnotations": _OBJ,
            "nodeSelector": _OBJ,
            "tolerations": _LIST,
            "affinity": _OBJ,
            **extra,
        }),
        "description": description,
    }


def _secret_ref() -> dict[str, Any]:
    return _closed({"env": _ENV_NAME, "secretName": _SECRET_NAME, "key": _STR}, ["env", "secretName", "key"])


def chart_keys() -> dict[str, Any]:
    """Schemas of the chart's own top-level keys (everything but ``config``)."""
    return {
        "global": _OBJ,  # Helm may pass it to every chart
        "nameOverride": _STR,
        "fullnameOverride": _STR,
        "dc": {
            "type": "string",
            "minLength": 1,
            "description": "The datacenter this release runs in (a key of config.datacenters); sets XDC_DC.",
        },
        "image": _closed({
            "repository": {"type": "string", "minLength": 1},
            "tag": _STR,
            "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]},
        }, ["repository"]),
        "imagePullSecrets": {"type": "array", "items": _closed({"name": _STR}, ["name"])},
        "secrets": {
            **_closed({
                "s3": {
                    "type": "object",
                    "description": "Per datacenter: the existing Secret holding the S3 keys whose env var "
                                   "names config.datacenters.<dc>.s3.credentials gives.",
                    "additionalProperties": _closed(
                        {"secretName": _SECRET_NAME, "accessKeyKey": _STR, "secretKeyKey": _STR},
                        ["secretName", "accessKeyKey", "secretKeyKey"],
                    ),
                },
                "kafka": {
                    "type": "array",
                    "description": "Env vars filled from existing Secrets for the Kafka client.",
                    "items": _secret_ref(),
                },
                "extraEnv": {"type": "array", "items": _secret_ref()},
                "metricsToken": {
                    **_closed({"secretName": _SECRET_NAME, "key": _STR}, ["secretName", "key"]),
                    "description": "The Secret and key holding the token of config.metrics.token_env "
                                   "(the metrics scrape and the dashboard).",
                },
            }),
            "description": "Names of existing Secrets and their keys; never secret values.",
        },
        "mirror": _workload(
            "`xdc mirror run --follow`: one consumer group; replicas above the source topic's "
            "partition count sit idle. More than one needs a postgresql:// state_url.",
            podDisruptionBudget=_PDB,
        ),
        "resize": _workload("`xdc resize run --follow` (only if config.resize is set). More than one needs a "
                            "postgresql:// state_url.", podDisruptionBudget=_PDB),
        "dashboard": _workload(
            "`xdc dashboard` and its Service.",
            port=_PORT,
            service=_closed({
                "type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                "port": _PORT,
                "annotations": _OBJ,
            }),
        ),
        "probes": _closed({
            "liveness": _OBJ,
            "readiness": _OBJ,
        }),
        "persistence": _closed({
            "enabled": _BOOL,
            "existingClaim": _STR,
            "storageClass": _STR,
            "accessModes": {"type": "array", "items": _STR},
            "size": _STR,
            "mountPath": _STR,
        }),
        "monitoring": _closed({
            "scrapeAnnotations": _BOOL,
            "serviceMonitor": _closed({
                "enabled": _BOOL, "interval": _STR, "scrapeTimeout": _STR, "labels": _OBJ,
            }),
            "prometheusRule": _closed({"enabled": _BOOL, "labels": _OBJ}),
            "grafanaDashboard": _closed({"enabled": _BOOL, "labels": _OBJ, "annotations": _OBJ}),
        }),
        "dags": _closed({"configMap": _closed({"enabled": _BOOL})}),
        "caBundles": {
            "type": "array",
            "description": "CA bundles (PEM) from ConfigMaps, mounted read-only as files into every xdc pod; "
                           "point config.datacenters.<dc>.s3.ca_bundle (or kafka.security.ca_file) at mountPath.",
            "items": _closed({"configMap": _STR, "key": _STR, "mountPath": _STR},
                             required=["configMap", "key", "mountPath"]),
        },
        "podSecurityContext": _OBJ,
        "securityContext": _OBJ,
        "commonLabels": _OBJ,
    }


def sqlite_takes_one_replica() -> dict[str, Any]:
    """When every datacenter's state is SQLite (a state_url left out is SQLite too), the mirror and
    the resize worker run one replica each: SQLite state takes one process of each. (Which
    datacenter's state a release writes depends on `dc`, which a schema cannot look up: the
    chart's templates check that exactly, with a message that says what to change.)"""
    one: dict[str, Any] = {"properties": {"replicas": {"maximum": 1}}}
    return {
        "if": {
            "required": ["config"],
            "properties": {"config": {
                "required": ["datacenters"],
                "properties": {"datacenters": {"additionalProperties": {
                    "properties": {"state_url": {"pattern": "^sqlite:"}}}}},
            }},
        },
        "then": {"properties": {"mirror": one, "resize": one}},
    }


def values_schema() -> dict[str, Any]:
    """The whole values.schema.json: XdcConfig under properties.config, its $defs at the root."""
    config = XdcConfig.model_json_schema()
    defs = config.pop("$defs", {})
    for key in _LOADER_KEYS:
        config["properties"].pop(key, None)
    config["description"] = "The xdc config file (xdc.yaml) this release runs with: an XdcConfig."
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "xdc-mirror Helm values",
        "type": "object",
        "additionalProperties": False,
        "required": ["dc", "config", "image"],
        "properties": {"config": config, **chart_keys()},
        "allOf": [sqlite_takes_one_replica()],
        "$defs": defs,
    }


def render() -> str:
    """The file's exact text (stable key order, trailing newline) so a test can compare it."""
    return json.dumps(values_schema(), indent=2, sort_keys=True) + "\n"


def main() -> None:
    sys.stdout.write(render())


if __name__ == "__main__":
    main()
