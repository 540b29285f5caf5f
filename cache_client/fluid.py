"""Fluid DataLoad manifests for a file list: for teams whose cache (Alluxio, JuiceFS, Jindo) Fluid runs.

Fluid (fluid-cloudnative/fluid) loads a Dataset's cache through a `DataLoad` resource
(data.fluid.io/v1alpha1): `spec.dataset` names the Dataset, `spec.target[]` the paths to load
inside it. A list of files becomes one or more DataLoads, in list order, each path in exactly one:

- a DataLoad holds at most `chunk_files` paths and PART_MAX_CHARS characters of them, so every
  object stays far below the 1.5 MiB Kubernetes allows (etcd's request limit);
- `loadMetadata` (a metadata sync of the whole Dataset, costly on a large one) is asked on the
  first part only; with policy Once each later part runs after the one before it (`runAfter`),
  so the parts load one at a time, in order;
- names are DNS-1123 and short (Fluid names the loader's Helm release and Job after the DataLoad;
  Helm allows 53 characters): a readable stem, cut and suffixed with a hash of the whole name when
  long; dataset, version and datacenter are labels (sanitised) and annotations (verbatim).

Pure: paths in, plain dicts out (`to_yaml` for a multi-document file). The pipeline side
(resolve a release's list, ready gate, write the file) is cache_client/prewarm/fluid.py.
"""
from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import yaml

from xdc.config import FluidSettings

API_VERSION = "data.fluid.io/v1alpha1"
KIND = "DataLoad"
NAME_MAX = 40  # "<name>-loader" and Fluid's suffixes must stay within Helm's 53
LABEL_MAX = 63
PART_MAX_CHARS = 512 * 1024  # path characters per DataLoad
LABEL = "xdc.io/"
_NOT_NAME = re.compile(r"[^a-z0-9-]+")
_NOT_LABEL = re.compile(r"[^A-Za-z0-9_.-]+")


def k8s_name(*parts: str, limit: int = NAME_MAX) -> str:
    """A DNS-1123 label from the parts: lower-case alphanumerics and '-', alphanumeric at both
    ends, at most `limit` characters (a hash of the whole keeps cut names distinct)."""
    whole = "-".join(p for p in parts if p)
    stem = _NOT_NAME.sub("-", whole.lower()).strip("-") or "x"
    if len(stem) <= limit and stem == whole:
        return stem
    digest = hashlib.sha256(whole.encode()).hexdigest()[:6]
    return f"{stem[: limit - 7].rstrip('-')}-{digest}"


def label_value(text: str) -> str:
    """A valid label value (63 characters of [A-Za-z0-9_.-], alphanumeric at both ends)."""
    v = _NOT_LABEL.sub("-", text).strip("-_.")
    return v[:LABEL_MAX].rstrip("-_.")


def target_path(settings: FluidSettings, path: str) -> str:
    """Where a file (its path in the volume, relative) is inside the Fluid Dataset."""
    return posixpath.join(settings.path_root, path.lstrip("/"))


def parts(paths: Iterable[str], chunk_files: int, max_chars: int = PART_MAX_CHARS) -> Iterator[list[str]]:
    """The paths in order, cut into lists of at most `chunk_files` paths and `max_chars` characters."""
    part: list[str] = []
    chars = 0
    for p in paths:
        if part and (len(part) >= chunk_files or chars + len(p) > max_chars):
            yield part
            part, chars = [], 0
        part.append(p)
        chars += len(p)
    if part:
        yield part


def dataloads(paths: Sequence[str], settings: FluidSettings, *, name: str,
              labels: Mapping[str, str] | None = None, annotations: Mapping[str, str] | None = None,
              max_chars: int = PART_MAX_CHARS) -> list[dict[str, Any]]:
    """DataLoads loading `paths` (paths in the volume) into the settings' Dataset, named `name`
    (already a k8s_name) or `name-<i>` when there are several."""
    chunks = list(parts((target_path(settings, p) for p in paths), settings.chunk_files, max_chars))
    docs: list[dict[str, Any]] = []
    for i, chunk in enumerate(chunks):
        part_name = name if len(chunks) == 1 else k8s_name(name, str(i + 1), limit=NAME_MAX + 6)
        spec: dict[str, Any] = {
            "dataset": {"name": settings.dataset, "namespace": settings.namespace},
            "loadMetadata": settings.load_metadata and i == 0,
            "target": [{"path": p, **({"replicas": settings.replicas} if settings.replicas else {})} for p in chunk],
            "policy": settings.policy,
        }
        if settings.schedule:
            spec["schedule"] = settings.schedule
        if settings.ttl_seconds_after_finished is not None:
            spec["ttlSecondsAfterFinished"] = settings.ttl_seconds_after_finished
        if settings.policy == "Once" and i > 0:
            spec["runAfter"] = {"kind": KIND, "name": docs[-1]["metadata"]["name"], "namespace": settings.namespace}
        docs.append({
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {
                "name": part_name,
                "namespace": settings.namespace,
                "labels": {**{LABEL + k: label_value(v) for k, v in (labels or {}).items()},
                           LABEL + "part": f"{i + 1}-of-{len(chunks)}"},
                "annotations": {**{LABEL + k: v for k, v in (annotations or {}).items()},
                                LABEL + "files": str(len(chunk))},
            },
            "spec": spec,
        })
    return docs


def to_yaml(docs: Iterable[Mapping[str, Any]]) -> str:
    """A multi-document YAML stream (`kubectl apply -f` takes it as is)."""
    return yaml.safe_dump_all(list(docs), sort_keys=False, explicit_start=True, width=10**6)


__all__ = ["API_VERSION", "KIND", "dataloads", "k8s_name", "label_value", "parts", "target_path", "to_yaml"]
