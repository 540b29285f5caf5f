"""Which strings of a dataset index are file paths: JMESPath selectors, known shapes, data roots.

A selector is a JMESPath expression (https://jmespath.org, the `jmespath` library) evaluated on
a whole index document (pkl, JSON) or on each record (JSON Lines). What it returns is flattened:
strings are paths, lists are walked in order, nulls are skipped, and a JSON object maps TAGS to
paths (`{pts: lidar_points.lidar_path}`): a tag picks a per-modality root, like mmdetection3d's
`data_prefix`. Anything else (numbers, placeholders) is reported as unreadable.

A selector of the form `KEY[].EXPR`, `KEY[*].EXPR` or `[].EXPR` is evaluated one record
at a time on the array it names: a JSON document is then streamed (cache_client.jsonstream)
and never held whole.

Known shapes (detected when no selector is given, and reported with the selector they use so a
user can adjust it):

    mmdet3d-v1   {infos: [{lidar_path, cams: {CAM: {data_path}}, sweeps: [{data_path}]}], metadata}
    mmdet3d-v2   {metainfo, data_list: [{lidar_points: {lidar_path}, images: {CAM: {img_path}},
                  lidar_sweeps: [{lidar_points: {lidar_path}}]}]}   (paths relative: needs a root)
    coco         {images: [{file_name}], annotations, categories}
    nuscenes     [{token, filename, ...}]   (nuScenes-devkit sample_data.json)
    paths        [str | {path|key|filename|file_name: str, size: int}]

Roots: `root="s3://bucket/prefix"` joins every relative path (a leading "./" is dropped; an
absolute "/..." path or one with ".." is refused); `root={"": base, TAG: prefix}` adds per-tag
prefixes, relative to the base. A tagged path takes its tag's root, else for "a:b" tags the root
of "b" then "a" (mmdet3d: a camera's own prefix, else `img`), else the base; with a tag root the
path's file name is joined (as mmdet3d joins `data_prefix`). A path that already reads
"s3://bucket/key" is used as is.
"""
from __future__ import annotations

import logging
import posixpath
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import jmespath
from jmespath import exceptions as jmespath_errors
from jmespath.visitor import Options, TreeInterpreter

from xdc.errors import FileListError

log = logging.getLogger("xdc.filelist")

MAX_DEPTH = 64  # nesting of a selector's result; deeper is refused (bounded work, no recursion)
PATH_FIELDS = ("path", "key", "filename", "file_name", "file", "uri")

_INTERP = TreeInterpreter(Options())


@dataclass(frozen=True)
class Selector:
    """A compiled selector. `array`/`record` are set when it can be applied per record:
    `array` is the top-level key of the record array ("" = the document is the array)."""

    expression: str
    shape: str  # a known shape's name, or "custom"
    array: str | None
    record: dict[str, Any] | None  # JMESPath AST applied to each record
    flatten: bool  # `KEY[]`: a record that is itself a list contributes its items
    whole: Any  # the compiled expression, for the whole document

    def on_document(self, doc: Any) -> Any:
        return self.whole.search(doc)

    def on_record(self, rec: Any) -> Any:
        assert self.record is not None
        return _INTERP.visit(self.record, rec)

    def records(self, doc: Any) -> Iterator[Any]:
        """The records of an in-memory document (for streamable selectors)."""
        arr = doc if self.array == "" else (doc.get(self.array) if isinstance(doc, dict) else None)
        if not isinstance(arr, list):
            return
        for item in arr:
            if self.flatten and isinstance(item, list):
                yield from item
            else:
                yield item


def compile_selector(expression: str, shape: str = "custom") -> Selector:
    try:
        compiled = jmespath.compile(expression)
    except jmespath_errors.JMESPathError as exc:
        raise FileListError(f"bad selector {expression!r}: {exc}") from None
    array, record, flatten = _split(compiled.parsed)
    return Selector(expression, shape, array, record, flatten, compiled)


def _split(ast: dict[str, Any]) -> tuple[str | None, dict[str, Any] | None, bool]:
    """(array key, per-record AST, flatten) when the expression projects over one top-level
    array; (None, None, False) otherwise."""
    if ast.get("type") != "projection":
        return None, None, False
    left, right = ast["children"]
    flatten = left.get("type") == "flatten"
    if flatten:
        left = left["children"][0]
    if left.get("type") == "field":
        return left["value"], right, flatten
    if left.get("type") in ("identity", "current"):
        return "", right, flatten
    return None, None, False


# -- flattening a selection into (tag, path) --------------------------------------------------------

class NotAPath(Exception):
    """A selected value that is not a path string (counted as unreadable by the caller)."""


def flatten(value: Any, budget: list[int]) -> Iterator[tuple[str, str | None, str | None]]:
    """(path, tag, problem) for each leaf of a selection, in order; problem is set (and path
    empty) for a leaf that is not a string. `budget[0]` counts down the nodes visited: a result
    with more nodes than its document has bytes can only come from shared references (a pickle
    bomb) and raises FileListError."""
    stack: list[tuple[Any, str | None, int]] = [(value, None, 0)]
    while stack:
        v, tag, depth = stack.pop()
        budget[0] -= 1
        if budget[0] < 0:
            raise FileListError("the selector's result is larger than the document itself (shared references "
                                "repeated: a pickle bomb?): refused")
        if isinstance(v, str):
            yield v, tag, None
        elif v is None:
            continue
        elif isinstance(v, (list, tuple)):
            if depth >= MAX_DEPTH:
                raise FileListError(f"the selector's result nests deeper than {MAX_DEPTH} levels: refused")
            stack.extend((x, tag, depth + 1) for x in reversed(v))
        elif isinstance(v, dict):
            if depth >= MAX_DEPTH:
                raise FileListError(f"the selector's result nests deeper than {MAX_DEPTH} levels: refused")
            stack.extend((x, k if isinstance(k, str) else tag, depth + 1) for k, x in reversed(list(v.items())))
        else:
            yield "", tag, f"selector gave a {type(v).__name__}, not a path string"


# -- roots --------------------------------------------------------------------------------------

class Roots:
    """Joins relative paths to a base root and per-tag roots (see the module docstring)."""

    def __init__(self, root: str | Mapping[str, str] | None) -> None:
        if root is None:
            spec: dict[str, str] = {}
        elif isinstance(root, str):
            spec = {"": root}
        else:
            spec = dict(root)
        base = spec.pop("", None)
        self.base = _norm_root(base, "root") if base else None
        self.tags: dict[str, str] = {}
        for tag, prefix in spec.items():
            if prefix.startswith(("s3://", "S3://")):
                self.tags[tag] = _norm_root(prefix, f"root {tag}")
            elif self.base is not None:
                self.tags[tag] = _norm_root(posixpath.join(self.base, _relative(prefix, f"root {tag}")), f"root {tag}")
            else:
                self.tags[tag] = _norm_root(prefix, f"root {tag}")

    def __bool__(self) -> bool:
        return self.base is not None or bool(self.tags)

    def describe(self) -> dict[str, str]:
        out = {"": self.base} if self.base else {}
        return out | self.tags

    def join(self, path: str, tag: str | None) -> str:
        """The "bucket/key" for a selected path; ValueError with a reason if it cannot be joined."""
        if path.startswith(("s3://", "S3://")) or not self:
            return path
        prefix = None
        if tag is not None:
            for t in ((tag,) if ":" not in tag else (tag.split(":", 1)[1], tag.split(":", 1)[0])):
                prefix = self.tags.get(t)
                if prefix is not None:
                    return prefix + "/" + posixpath.basename(_relative(path, "path"))
        if self.base is None:
            return path
        return self.base + "/" + _relative(path, "path")


_TAG_ARG = re.compile(r"^([A-Za-z_][A-Za-z0-9_:.-]*)=(.*)$")


def roots_from_args(values: Sequence[str] | None) -> str | dict[str, str] | None:
    """CLI `--root` values: "PREFIX" (the base) and "TAG=PREFIX" (per-tag, relative to the base)."""
    if not values:
        return None
    out: dict[str, str] = {}
    for v in values:
        m = _TAG_ARG.match(v)
        tag, prefix = (m.group(1), m.group(2)) if m else ("", v)
        if tag in out:
            raise FileListError(f"--root given twice for {tag or 'the base'}: {out[tag]!r} and {prefix!r}")
        out[tag] = prefix
    return out[""] if list(out) == [""] else out


def _relative(path: str, what: str) -> str:
    p = path
    while p.startswith("./"):
        p = p[2:]
    if p.startswith("/"):
        raise ValueError(f"absolute {what} {path!r} cannot be joined to a root")
    return p


def _norm_root(root: str, what: str) -> str:
    r = root[5:] if root.startswith(("s3://", "S3://")) else root
    r = r.strip().rstrip("/")
    if not r or r.startswith("/") or "\\" in r or any(seg in ("..", ".", "") for seg in r.split("/")):
        raise FileListError(f"bad {what} {root!r}: expected s3://bucket[/prefix] or bucket[/prefix]")
    return r


# -- known shapes -------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    name: str
    selector: str
    needs_root: bool = False


def detect_document(doc_kind: str, keys: list[str], first: Mapping[str, Any]) -> Shape | None:
    """A known shape from the top of a document: its kind ("object"/"array"), top-level keys
    and the first element of each array seen (key "" for a top-level array)."""
    if doc_kind == "array":
        return _detect_records("", first.get(""))
    if doc_kind != "object":
        return None
    if "infos" in keys and isinstance(first.get("infos"), dict):
        return _v1("infos[]", first["infos"])
    if "data_list" in keys and isinstance(first.get("data_list"), dict):
        return _v2("data_list[]", first["data_list"])
    if "images" in keys and isinstance(first.get("images"), dict) and "file_name" in first["images"]:
        return Shape("coco", "images[].file_name")
    for k in ("infos", "data_list", "files", "paths", "keys", "samples"):
        if k in first:
            s = _detect_records(k, first[k])
            if s is not None:
                return s
    return None


def detect_record(rec: Any) -> Shape | None:
    """A known shape for one record of a JSON Lines file (the selector applies per line)."""
    if isinstance(rec, str):
        return Shape("paths", "@")
    if not isinstance(rec, dict):
        return None
    if "lidar_path" in rec and ("cams" in rec or "sweeps" in rec):
        return _v1(None, rec)
    if "lidar_points" in rec or ("images" in rec and isinstance(rec["images"], dict) and _cams_v2(rec)):
        return _v2(None, rec)
    if "filename" in rec and "token" in rec:
        return Shape("nuscenes", "filename")
    if "point_cloud" in rec and "image" in rec:  # mmdet3d v1 KITTI infos (a top-level list)
        return Shape("mmdet3d-v1-kitti", "[point_cloud.velodyne_path, image.image_path]")
    if any(isinstance(rec.get(f), str) for f in PATH_FIELDS):
        return Shape("paths", "@")
    return None


def _detect_records(array: str, first: Any) -> Shape | None:
    head = f"{array}[]" if array else "[]"
    if isinstance(first, str):
        return Shape("paths", head)
    if not isinstance(first, dict):
        return None
    rec = detect_record(first)
    if rec is None:
        return None
    if rec.name == "paths":  # each element handled by the plain-list rules, not by JMESPath
        return Shape("paths", head)
    return Shape(rec.name, f"{head}.{rec.selector}", rec.needs_root)


def _quote(name: str) -> str:
    return name if name.isidentifier() and name.isascii() else '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _v1(head: str | None, rec: dict[str, Any]) -> Shape:
    parts = ["lidar_path"]
    if "cams" in rec:
        parts.append("cams.*.data_path")
    if "sweeps" in rec:
        parts.append("sweeps[].data_path")
    body = "[" + ", ".join(parts) + "]"
    return Shape("mmdet3d-v1", f"{head}.{body}" if head else body)


def _cams_v2(rec: dict[str, Any]) -> list[str]:
    images = rec.get("images")
    if not isinstance(images, dict):
        return []
    return [k for k, v in images.items() if isinstance(k, str) and isinstance(v, dict) and "img_path" in v]


def _v2(head: str | None, rec: dict[str, Any]) -> Shape:
    # Tags follow mmdet3d's data_prefix keys: pts, sweeps, and each camera (falling back to img).
    parts = []
    if "lidar_points" in rec:
        parts.append("{pts: lidar_points.lidar_path}")
    cams = _cams_v2(rec)
    if cams:
        parts.append("{" + ", ".join(f'"img:{c}": images.{_quote(c)}.img_path' for c in cams) + "}")
    if "lidar_sweeps" in rec:
        parts.append("{sweeps: lidar_sweeps[].lidar_points.lidar_path}")
    body = "[" + ", ".join(parts) + "]"
    return Shape("mmdet3d-v2", f"{head}.{body}" if head else body, needs_root=True)


def describe_top(keys: list[str], first: Mapping[str, Any]) -> str:
    """A short description of a document's top for error messages."""
    if "" in first:
        f = first[""]
        inner = f" of objects with keys {sorted(f)[:12]}" if isinstance(f, dict) else f" of {type(f).__name__}"
        return "a top-level array" + inner
    out = f"top-level keys {keys[:12]}"
    for k, v in first.items():
        if isinstance(v, dict):
            out += f"; {k}[0] has keys {sorted(map(str, v))[:12]}"
    return out


__all__ = ["PATH_FIELDS", "Roots", "Selector", "Shape", "compile_selector", "describe_top", "detect_document",
           "detect_record", "flatten", "roots_from_args"]
