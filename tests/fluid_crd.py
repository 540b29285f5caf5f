"""Fluid's own CRD schemas as validators for the manifests xdc writes (tests only).

The CRDs are read where the workspace keeps them (`shared/specs/fluid/` beside the repository, or
$XDC_FLUID_SPECS), never copied into the project. A manifest is checked as a Kubernetes API server
with strict field validation (`kubectl apply --validate=strict`) would: apiVersion and kind served
by the CRD, `spec` against the version's openAPIV3Schema with unknown fields refused (the server
would prune them silently: a misspelt `loadMetaData` must fail here), metadata name, namespace,
labels and annotations by Kubernetes' rules, and the object's size.
"""
from __future__ import annotations

import json
import os
import re
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO = Path(__file__).resolve().parents[1]
GROUP = "data.fluid.io"
OBJECT_MAX_BYTES = 1_572_864  # etcd's default request limit: 1.5 MiB
ANNOTATIONS_MAX_BYTES = 256 * 1024
_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_VALUE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")
_QUALIFIED = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")


def specs_dir() -> Path:
    """$XDC_FLUID_SPECS, else the first `shared/specs/fluid` found above the repository."""
    if os.environ.get("XDC_FLUID_SPECS"):
        return Path(os.environ["XDC_FLUID_SPECS"])
    for up in REPO.parents:
        if (up / "shared" / "specs" / "fluid").is_dir():
            return up / "shared" / "specs" / "fluid"
    raise FileNotFoundError("Fluid CRDs not found: set XDC_FLUID_SPECS to a directory of data.fluid.io_*.yaml")


@cache
def crd(kind: str) -> dict[str, Any]:
    """The CustomResourceDefinition of a Fluid kind (DataLoad -> data.fluid.io_dataloads.yaml)."""
    for path in sorted(specs_dir().glob(f"{GROUP}_*.yaml")):
        doc = yaml.safe_load(path.read_text())
        if doc["spec"]["names"]["kind"] == kind:
            return doc  # type: ignore[no-any-return]
    raise KeyError(f"no CRD for kind {kind} in {specs_dir()}")


def strict(schema: Any) -> Any:
    """The schema with unknown fields refused wherever the CRD lists an object's fields."""
    if isinstance(schema, list):
        return [strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    out = {k: strict(v) for k, v in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


def _meta_errors(meta: dict[str, Any], namespaced: bool) -> list[str]:
    errs = []
    name = meta.get("name", "")
    if not (0 < len(name) <= 253 and _SUBDOMAIN.fullmatch(name)):
        errs.append(f"metadata.name {name!r}: not a DNS-1123 subdomain")
    ns = meta.get("namespace")
    if namespaced and ns is not None and not (len(ns) <= 63 and _LABEL.fullmatch(ns)):
        errs.append(f"metadata.namespace {ns!r}: not a DNS-1123 label")
    for key, value in (meta.get("labels") or {}).items():
        prefix, _, local = key.rpartition("/")
        if (prefix and not _SUBDOMAIN.fullmatch(prefix)) or not (len(local) <= 63 and _QUALIFIED.fullmatch(local)):
            errs.append(f"label key {key!r}: not a qualified name")
        if not (isinstance(value, str) and len(value) <= 63 and _LABEL_VALUE.fullmatch(value)):
            errs.append(f"label {key}={value!r}: not a label value")
    annotations = meta.get("annotations") or {}
    if not all(isinstance(v, str) for v in annotations.values()):
        errs.append("annotations: values must be strings")
    if sum(len(k) + len(str(v)) for k, v in annotations.items()) > ANNOTATIONS_MAX_BYTES:
        errs.append("annotations: over 256 KiB")
    return errs


def errors(doc: dict[str, Any]) -> list[str]:
    """Every reason the API server (strict) would refuse `doc`; [] when it would take it."""
    kind = doc.get("kind", "")
    try:
        d = crd(kind)
    except KeyError as exc:
        return [str(exc)]
    group, _, version = str(doc.get("apiVersion", "")).partition("/")
    served = {v["name"]: v for v in d["spec"]["versions"] if v.get("served")}
    if group != d["spec"]["group"] or version not in served:
        return [f"apiVersion {doc.get('apiVersion')!r}: {kind} is served as {d['spec']['group']}/{sorted(served)}"]
    schema = strict(served[version]["schema"]["openAPIV3Schema"])
    schema["properties"]["metadata"] = {"type": "object"}  # checked below by Kubernetes' own rules
    v = jsonschema.Draft7Validator(schema)
    errs = [f"{'.'.join(map(str, e.absolute_path)) or '<root>'}: {e.message}" for e in v.iter_errors(doc)]
    errs += _meta_errors(doc.get("metadata") or {}, d["spec"]["scope"] == "Namespaced")
    size = len(json.dumps(doc).encode())
    if size > OBJECT_MAX_BYTES:
        errs.append(f"object is {size} bytes, over {OBJECT_MAX_BYTES}")
    return errs


def validate(doc: dict[str, Any]) -> None:
    errs = errors(doc)
    assert not errs, f"{doc.get('kind')} {doc.get('metadata', {}).get('name')}: " + "; ".join(errs[:20])
