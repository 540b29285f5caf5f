"""A release's file list as Fluid DataLoads, for datacenters whose cache Fluid runs.

    resolve (the pipeline's) -> ready gate in the object store -> DataLoads -> written

Same list reading and key mapping as a warm (`pipeline.resolve`): a file is in exactly one
DataLoad, at its path in the volume (`cache_client.fluid`). xdc does not reach a cache Fluid runs,
so the ready gate asks the datacenter's object store instead (`store_sizes`). The manifests go to
stdout, a file, a directory or s3://bucket/prefix in the datacenter's store (`write_export`);
`kubectl apply -f` (or a GitOps sync) hands them to Fluid's controller, which loads them.
"""
from __future__ import annotations

import posixpath
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cache_client import fluid
from cache_client.base import CacheFile
from cache_client.prewarm.pipeline import Request, ResolvedList, resolve
from xdc.config import FluidSettings
from xdc.errors import ConfigError, ObjectNotFound
from xdc.topology import Site

LIST_MIN_FILES = 8  # files of one directory from which one listing beats a HEAD each


@dataclass
class FluidExport:
    dc: str
    dataset: str | None
    version: str
    settings: FluidSettings
    manifests: list[dict[str, Any]]
    files: int
    bytes: int | None  # None: sizes unknown (no ready gate)
    rejected: list[tuple[str, str]] = field(default_factory=list)
    uri: str | None = None  # where write_export put the manifests

    @property
    def filename(self) -> str:
        return fluid.k8s_name("xdc", self.dataset or "list", self.version, self.dc.lower(), limit=80) + ".yaml"

    def yaml(self) -> str:
        return fluid.to_yaml(self.manifests)

    def to_dict(self) -> dict[str, Any]:
        return {"dc": self.dc, "dataset": self.dataset, "version": self.version, "mode": "fluid",
                "fluid_dataset": f"{self.settings.namespace}/{self.settings.dataset}",
                "dataloads": [m["metadata"]["name"] for m in self.manifests], "files": self.files,
                "bytes": self.bytes, "rejected": self.rejected[:100], "rejected_count": len(self.rejected),
                "uri": self.uri}

    def summary(self) -> str:
        size = f", {self.bytes / 2**20:.1f} MiB" if self.bytes is not None else ""
        where = f" -> {self.uri}" if self.uri else ""
        return (f"fluid export {self.dataset or 'list'} in {self.dc}: {len(self.manifests)} DataLoad(s) of "
                f"{self.settings.namespace}/{self.settings.dataset} for {self.files} files{size}, "
                f"{len(self.rejected)} entries rejected{where}")


def settings_of(site: Site, overrides: Mapping[str, Any] | None = None) -> FluidSettings:
    """The site's `cache.fluid`, with `overrides` (CLI options) on top."""
    base = site.config.cache.fluid if site.config.cache else None
    data = base.model_dump() if base else {}
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    if given.get("policy", "Cron") != "Cron":
        data["schedule"] = None  # a schedule belongs to policy Cron only
    data.update(given)
    if not data.get("dataset"):
        raise ConfigError(f"{site.name}: no Fluid Dataset named: set cache.fluid.dataset or pass --fluid-dataset")
    return FluidSettings(**data)


def store_sizes(site: Site) -> Callable[[Sequence[CacheFile]], dict[str, int | None]]:
    """A `stat` for the ready gate that asks the site's object store, not its cache: path -> size,
    None when absent. Directories with many of the files are listed once, the rest HEAD per file."""
    store = site.store

    def stat(files: Sequence[CacheFile]) -> dict[str, int | None]:
        by_dir: dict[tuple[str, str], list[CacheFile]] = {}
        for f in files:
            bucket, _, key = f.bucket_key.partition("/")
            by_dir.setdefault((bucket, posixpath.dirname(key)), []).append(f)
        out: dict[str, int | None] = {}
        for (bucket, d), fs in by_dir.items():
            if len(fs) >= LIST_MIN_FILES:
                prefix = f"{d}/" if d else ""
                sizes = {o.key: o.size for o in store.list(bucket, prefix) if "/" not in o.key[len(prefix):]}
                out.update({f.path: sizes.get(f.bucket_key.partition("/")[2]) for f in fs})
                continue
            for f in fs:
                try:
                    out[f.path] = store.head(bucket, f.bucket_key.partition("/")[2]).size
                except ObjectNotFound:
                    out[f.path] = None
        return out

    return stat


def export_fluid(site: Site, request: Request, settings: FluidSettings, *, res: ResolvedList | None = None,
                 sizes: Mapping[str, int | None] | None = None) -> FluidExport:
    """The DataLoads of a request's list in the site (resolved here unless `res` is given)."""
    res = res if res is not None else resolve(site, request)
    name = fluid.k8s_name("xdc", request.dataset or "list", request.version, site.name.lower())
    labels = {"dc": site.name, **({"dataset": request.dataset, "version": request.version} if request.dataset else {})}
    annotations = {"manifest": request.manifest, "dc": site.name,
                   **({"release": request.label} if request.dataset else {})}
    docs = fluid.dataloads([f.path for f in res.files], settings, name=name, labels=labels, annotations=annotations)
    nbytes = None
    if sizes is not None:
        known = [sizes.get(f.path) for f in res.files]
        nbytes = sum(n for n in known if n is not None) if all(n is not None for n in known) else None
    return FluidExport(site.name, request.dataset, request.version, settings, docs, len(res.files), nbytes,
                       list(res.rejected))


def write_export(site: Site, export: FluidExport, out: str) -> str:
    """Write the manifests to `out`: a .yaml file, a directory, or s3://bucket/prefix (the site's
    store; a key ending in .yaml is used as is). Returns where they went."""
    text = export.yaml().encode()
    if out.startswith("s3://"):
        bucket, _, key = out.removeprefix("s3://").partition("/")
        if not key.endswith((".yaml", ".yml")):
            key = posixpath.join(key, export.filename)
        site.store.put(bucket, key, text)
        export.uri = f"s3://{bucket}/{key}"
        return export.uri
    path = Path(out)
    if path.suffix not in (".yaml", ".yml"):
        path.mkdir(parents=True, exist_ok=True)
        path = path / export.filename
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(text)
    tmp.replace(path)  # a reader (a GitOps sync) never sees half a file
    export.uri = str(path)
    return export.uri


__all__ = ["FluidExport", "export_fluid", "settings_of", "store_sizes", "write_export"]
