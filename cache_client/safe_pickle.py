"""Unpickle dataset index files without running code named by the file.

A pickle names callables (module + name) and the stream calls them while loading: a file whose
payload says `os.system("...")` runs it under the stock unpickler. Index files (mmdetection3d
info pkls) come from other teams, so here `find_class` never imports anything and hands out only:

- a tiny allow-list of inert constructors (containers, bytes, dates, `OrderedDict`, paths as
  `str`, `_codecs.encode` for protocol-2 bytes, `copyreg._reconstructor` for placeholders);
- numpy's reconstruct functions replaced by our own, which rebuild arrays as inert data: string
  and object arrays become `InertArray` lists (paths may live there), numeric arrays keep only
  shape and dtype (their values are never a path, and dropping them keeps memory below the
  file's size); numpy scalars become plain Python numbers;
- for every other name, a placeholder class: objects built from it (NEWOBJ + BUILD, the way
  most classes pickle) load as `Placeholder` dicts holding their state, so the paths inside
  still come out. Calling a placeholder (REDUCE, INST, OBJ: "call this with these arguments") is
  refused with a FileListError before anything runs.

Nothing here imports numpy or any module the file names.
"""
from __future__ import annotations

import codecs
import collections
import datetime
import gc
import io
import math
import pickle
import posixpath
import struct
from collections.abc import Callable
from typing import IO, Any, NoReturn

from xdc.errors import FileListError

# Python 2 names the stock unpickler maps (fix_imports); our find_class sees them raw.
_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class Placeholder(dict):  # type: ignore[type-arg]
    """An object of a class we do not load: its pickled state as a dict.

    `xdc_class` is the "module.name" the file gave; `xdc_args` what NEWOBJ passed to `__new__`;
    `xdc_state` a state that was not a dict; `xdc_items` what a list-like class appended.
    """

    xdc_class = "?"

    def __new__(cls, *args: Any, **kwargs: Any) -> Placeholder:  # noqa: PYI034 - also called on subclasses' behalf
        obj = dict.__new__(cls)
        obj.xdc_args = args
        return obj

    def __init__(self, *args: Any, **kwargs: Any) -> None:  # never forwards to dict.__init__
        pass

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, tuple) and len(state) == 2 and all(s is None or isinstance(s, dict) for s in state):
            for part in state:  # (__dict__, __slots__ values)
                if part:
                    self.update(part)
        elif isinstance(state, dict):
            self.update(state)
        else:
            self.xdc_state = state

    def append(self, item: Any) -> None:
        self.__dict__.setdefault("xdc_items", []).append(item)

    def extend(self, items: Any) -> None:
        self.__dict__.setdefault("xdc_items", []).extend(items)

    def __repr__(self) -> str:
        return f"<{self.xdc_class} placeholder {dict.__repr__(self)}>"


class _Refused(type):
    """Metaclass of placeholder classes: calling one is what REDUCE/INST/OBJ do, and is refused."""

    def __call__(cls, *args: Any, **kwargs: Any) -> NoReturn:
        raise FileListError(
            f"refused: the pickle calls {cls.xdc_class}(...) while loading, which is not allowed "  # type: ignore[attr-defined]
            "(only inert containers and numpy arrays are rebuilt); nothing was run"
        )


class InertDtype:
    """A numpy dtype as data: the type string ("f4", "U12", "O8") and, after BUILD, its byte order."""

    def __init__(self, spec: Any = "V", align: Any = False, copy: Any = True) -> None:
        self.spec = str(spec)
        self.byteorder = "="
        self.itemsize = _itemsize(self.spec)
        self.fields: Any = None

    def __setstate__(self, state: Any) -> None:
        # numpy: (version, byteorder, subdescr, names, fields, elsize, alignment, flags[, metadata])
        if isinstance(state, tuple) and len(state) >= 8:
            self.byteorder = str(state[1])
            self.fields = state[4]
            if isinstance(state[5], int) and state[5] > 0:
                self.itemsize = state[5]

    @property
    def kind(self) -> str:
        return self.spec.lstrip("<>|=")[:1]

    def __repr__(self) -> str:
        return f"dtype({self.spec!r})"


def _itemsize(spec: str) -> int:
    digits = "".join(c for c in spec if c.isdigit())
    size = int(digits) if digits else 0
    return size * 4 if spec.lstrip("<>|=")[:1] == "U" else size


class InertArray(list):  # type: ignore[type-arg]
    """A numpy array as data. String and object arrays hold their items (nested by shape);
    numeric arrays hold none (`values_dropped`), only `shape` and `dtype`."""

    def __init__(self, shape: tuple[int, ...] = (0,), dtype: InertDtype | None = None) -> None:
        super().__init__()
        self.shape = shape
        self.dtype = dtype
        self.values_dropped = False

    def __setstate__(self, state: Any) -> None:
        # ndarray.__reduce__ state: (version, shape, dtype, is_fortran, rawdata); old pickles omit version
        if isinstance(state, tuple) and len(state) == 5:
            state = state[1:]
        if not (isinstance(state, tuple) and len(state) == 4):
            raise FileListError("a numpy array in the pickle has an unexpected state")
        shape, dtype, fortran, raw = state
        _fill(self, shape, dtype, bool(fortran), raw)

    def __repr__(self) -> str:
        if self.values_dropped:
            return f"InertArray(shape={self.shape}, dtype={self.dtype!r}, values dropped)"
        return f"InertArray({list.__repr__(self)}, dtype={self.dtype!r})"


def _shape(shape: Any) -> tuple[int, ...]:
    if not isinstance(shape, (tuple, list)) or not all(isinstance(n, int) and n >= 0 for n in shape):
        raise FileListError(f"a numpy array in the pickle has a bad shape {shape!r:.60}")
    return tuple(shape)


def _fill(arr: InertArray, shape: Any, dtype: Any, fortran: bool, raw: Any) -> None:
    shape = _shape(shape)
    if not isinstance(dtype, InertDtype):
        raise FileListError("a numpy array in the pickle has no dtype")
    count = math.prod(shape)
    arr.shape, arr.dtype = shape, dtype
    kind = dtype.kind
    if kind == "O":
        items = list(raw) if isinstance(raw, (list, tuple)) else None
        if items is None or len(items) != count:
            raise FileListError(f"an object array in the pickle holds {len(items) if items is not None else '?'} items, shape says {count}")
    else:
        if not isinstance(raw, (bytes, bytearray, memoryview)):
            raise FileListError("a numpy array in the pickle has no raw data")
        size = dtype.itemsize
        if dtype.fields is None and len(raw) != count * size:
            # A shape that claims more than the bytes present: a malformed (or hostile) array.
            raise FileListError(f"a numpy array in the pickle claims shape {shape} of {dtype.spec} "
                                f"({count * size} bytes) but carries {len(raw)} bytes")
        if kind == "U" and size:
            codec = "utf-32-be" if dtype.byteorder == ">" else "utf-32-le"
            text = bytes(raw).decode(codec, errors="replace")
            n = size // 4
            items = [text[i:i + n].rstrip("\x00") for i in range(0, len(text), n)]
        elif kind == "S" and size:
            items = [bytes(raw[i:i + size]).rstrip(b"\x00").decode("utf-8", "surrogateescape")
                     for i in range(0, len(raw), size)]
        else:
            arr.values_dropped = True
            arr.nbytes = len(raw)
            return
    if fortran and len(shape) > 1:
        items = _fortran_to_c(items, shape)
    arr.extend(_nest(items, shape))


def _fortran_to_c(items: list[Any], shape: tuple[int, ...]) -> list[Any]:
    strides_f = [math.prod(shape[:i]) for i in range(len(shape))]
    out = []
    for idx in _indices(shape):
        out.append(items[sum(i * s for i, s in zip(idx, strides_f))])
    return out


def _indices(shape: tuple[int, ...]) -> Any:
    import itertools

    return itertools.product(*(range(n) for n in shape))


def _nest(items: list[Any], shape: tuple[int, ...]) -> list[Any]:
    if len(shape) <= 1:
        return items
    for n in reversed(shape[1:]):
        items = [items[i:i + n] for i in range(0, len(items), n)] if n else []
    return items


def _reconstruct(cls: Any, shape: Any = (0,), typecode: Any = b"b") -> InertArray:
    return InertArray()


def _frombuffer(buf: Any, dtype: Any, shape: Any, order: Any = "C") -> InertArray:
    arr = InertArray()
    _fill(arr, shape, dtype, order == "F", buf)
    return arr


_STRUCT = {("f", 2): "e", ("f", 4): "f", ("f", 8): "d", ("c", 8): "ff", ("c", 16): "dd"}


def _scalar(dtype: Any, data: Any = None) -> Any:
    """numpy scalar -> a Python value (numbers and text), or a Placeholder for anything else."""
    if not isinstance(dtype, InertDtype):
        raise FileListError("a numpy scalar in the pickle has no dtype")
    kind, size = dtype.kind, dtype.itemsize
    if kind == "O":
        return data
    if not isinstance(data, (bytes, bytearray)):
        raise FileListError("a numpy scalar in the pickle has no raw data")
    big = dtype.byteorder == ">"
    if kind in "iub" and len(data) == size:
        v = int.from_bytes(data, "big" if big else "little", signed=kind == "i")
        return bool(v) if kind == "b" else v
    fmt = _STRUCT.get((kind, size))
    if fmt and len(data) == size:
        vals = struct.unpack((">" if big else "<") + fmt, data)
        return complex(*vals) if kind == "c" else vals[0]
    if kind == "U":
        return bytes(data).decode("utf-32-be" if big else "utf-32-le", errors="replace").rstrip("\x00")
    if kind == "S":
        return bytes(data).rstrip(b"\x00").decode("utf-8", "surrogateescape")
    ph = Placeholder()
    ph.xdc_class = f"numpy scalar {dtype.spec}"
    return ph


def _encode(obj: Any, encoding: str = "latin1") -> bytes:
    # Protocol 2 stores bytes as _codecs.encode(text, "latin1"); nothing else is needed.
    if not isinstance(obj, str) or codecs.lookup(encoding).name != "iso8859-1":
        raise FileListError("refused: the pickle calls _codecs.encode with unexpected arguments")
    return obj.encode("latin1")


def _bytes(*args: Any) -> bytes:
    if args and isinstance(args[0], int):  # bytes(10**12) would allocate that much
        raise FileListError("refused: the pickle asks for bytes(<size>)")
    return bytes(*args)


def _bytearray(*args: Any) -> bytearray:
    if args and isinstance(args[0], int):
        raise FileListError("refused: the pickle asks for bytearray(<size>)")
    return bytearray(*args)


def _path(*parts: Any) -> str:
    # pathlib paths pickle as Class(*parts): kept as the path string.
    if not all(isinstance(p, str) for p in parts):
        raise FileListError("refused: a pathlib path in the pickle with non-string parts")
    return posixpath.join(*parts) if parts else "."


def _defaultdict(factory: Any = None, *args: Any) -> dict[Any, Any]:
    return {}  # the default factory is never kept (it would be called on a missing key)


def _reconstructor(cls: Any, base: Any, state: Any = None) -> Any:
    # copyreg._reconstructor(cls, object, None): protocol 0/1 objects of user classes.
    if isinstance(cls, _Refused) and base is object:
        return Placeholder.__new__(cls)
    raise FileListError("refused: the pickle calls copyreg._reconstructor on a class that is not a placeholder")


_ARRAY_FUNCS: dict[str, Callable[..., Any]] = {"_reconstruct": _reconstruct, "scalar": _scalar, "_frombuffer": _frombuffer}
_NUMPY_MODULES = ("numpy.core.multiarray", "numpy._core.multiarray", "numpy.core.numeric", "numpy._core.numeric")

_ALLOWED: dict[tuple[str, str], Any] = {
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "list"): list,
    ("builtins", "dict"): dict,
    ("builtins", "tuple"): tuple,
    ("builtins", "str"): str,
    ("builtins", "int"): int,
    ("builtins", "float"): float,
    ("builtins", "bool"): bool,
    ("builtins", "complex"): complex,
    ("builtins", "bytes"): _bytes,
    ("builtins", "bytearray"): _bytearray,
    ("builtins", "object"): object,
    ("_codecs", "encode"): _encode,
    ("copyreg", "_reconstructor"): _reconstructor,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("collections", "defaultdict"): _defaultdict,
    ("datetime", "datetime"): datetime.datetime,
    ("datetime", "date"): datetime.date,
    ("datetime", "time"): datetime.time,
    ("datetime", "timedelta"): datetime.timedelta,
    ("numpy", "dtype"): InertDtype,
    ("numpy", "ndarray"): InertArray,
}
for _m in ("pathlib", "pathlib._local"):
    for _n in ("Path", "PosixPath", "PurePath", "PurePosixPath", "WindowsPath", "PureWindowsPath"):
        _ALLOWED[(_m, _n)] = _path
for _m in _NUMPY_MODULES:
    for _n, _f in _ARRAY_FUNCS.items():
        _ALLOWED[(_m, _n)] = _f


class SafeUnpickler(pickle.Unpickler):
    """pickle.Unpickler whose globals are inert stand-ins; see the module docstring."""

    def __init__(self, file: IO[bytes]) -> None:
        super().__init__(file)
        self._placeholders: dict[tuple[str, str], type] = {}

    def find_class(self, module: str, name: str) -> Any:
        module = _PY2_MODULES.get(module, module)
        allowed = _ALLOWED.get((module, name))
        if allowed is not None:
            return allowed
        key = (module, name)
        cls = self._placeholders.get(key)
        if cls is None:
            cls = _Refused(str(name).replace(".", "_"), (Placeholder,), {"xdc_class": f"{module}.{name}"})
            self._placeholders[key] = cls
        return cls

    def persistent_load(self, pid: Any) -> NoReturn:
        raise FileListError("refused: the pickle refers to external (persistent) objects")


def load(fh: IO[bytes]) -> Any:
    """Load one pickle from a binary stream with SafeUnpickler.

    FileListError for a refused call or a pickle that cannot be read (truncated, corrupt, too
    deep for the placeholders); the message says which.
    """
    # A load creates millions of containers and nothing cyclic: the cycle collector would walk
    # the growing heap again and again (3x the load's own time), so it waits until the end.
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        return SafeUnpickler(fh).load()
    except FileListError:
        raise
    except RecursionError:
        raise FileListError("the pickle nests too deeply to load") from None
    except MemoryError:
        raise FileListError("the pickle needs more memory than is available") from None
    except EOFError:
        raise FileListError("the pickle is truncated (ends before its STOP opcode)") from None
    except Exception as exc:  # noqa: BLE001 - unpickling raises many types on bad input
        raise FileListError(f"the pickle cannot be read: {type(exc).__name__}: {exc}") from None
    finally:
        if was_enabled:
            gc.enable()


def loads(data: bytes) -> Any:
    return load(io.BytesIO(data))


__all__ = ["InertArray", "InertDtype", "Placeholder", "SafeUnpickler", "load", "loads"]
