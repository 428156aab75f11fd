"""Feature stores (npz/npy folders, HDF5 files, webdataset tar shards) and feature loaders.

Stores
------
Every store maps a string key (a video id, or ``qid123`` for text) to float32 arrays and
implements :class:`FeatureStore`. A key may hold one array or several named *fields*
(Moment-DETR text files hold ``last_hidden_state`` (T, D) and ``pooler_output`` (D,)).
``get(key, field=None)`` returns one field (``None``: the store's default field); a key that
holds a single plain array (``.npy``, an HDF5 dataset) answers every field name with it.
``get_all(key)`` returns every field (used by :func:`convert_store`).

* :class:`NpzDirStore` -- one file per key in a folder, e.g. Moment-DETR's
  ``clip_features/{vid}.npz['features']`` and ``clip_text_features/qid{qid}.npz``.
* :class:`Hdf5Store` -- one HDF5 file per stream, dataset (or group of datasets) per key,
  as MESM ships features. Opened lazily and reopened after ``fork`` (DataLoader workers).
* :class:`WdsStore` -- webdataset tar shards, one member ``{key}.npy`` or ``{key}.npz``
  per key, random access through an index of member offsets built once and cached beside
  each shard in ``<shard>.c2f-index.json`` (rebuilt when the shard's size or mtime change).
  Keys are split from the extension at the *last* dot, so keys with dots (QVHighlights vids
  such as ``abc_60.0_210.0``) work here; other webdataset readers split at the first dot.

Loaders
-------
:class:`VideoFeatureLoader` reproduces QD-DETR's ``StartEndDataset`` video path: each stream
L2-normalised per clip as ``x / (||x||_2 + 1e-5)``, streams cut to the shortest and
concatenated, truncated to ``max_len``, then two TEF columns appended
(``tef_st = arange(L) / L``, ``tef_ed = tef_st + 1 / L``). :class:`TextFeatureLoader` reads one
text field, truncates tokens to ``max_len`` and L2-normalises the same way.
"""
from __future__ import annotations

import abc
import contextlib
import difflib
import glob
import io
import itertools
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
import zipfile
from collections import OrderedDict
from typing import Any, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from lavis_c2f.common.errors import ConfigError, DataFormatError
from lavis_c2f.common.io import atomic_path, write_json
from lavis_c2f.common.progress import progress_bar
from lavis_c2f.data.cfg import check_keys
# the feature conventions, re-exported for the readers of this module
from lavis_c2f.ops.vectors import L2_EPS, NORM_STYLES, l2_normalize, norm_params, tef_columns  # noqa: F401
from lavis_c2f.paths import resolve_path

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]
ArrayOrFields = Union[np.ndarray, Mapping[str, np.ndarray]]
DEFAULT_FIELD = "features"


class FeatureNotFoundError(KeyError):
    """A key is not in a feature store; the message names the store, the key and a close match."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


# =========================================================================== array helpers


def combine_video_streams(streams: Sequence[np.ndarray], *, normalize: bool = True,
                          max_len: Optional[int] = None, use_tef: bool = True,
                          eps: float = L2_EPS, clamp: bool = False) -> np.ndarray:
    """Per-stream (L_i, D_i) clip features -> (L, sum D_i [+ 2]) float32.

    Each stream is L2-normalised per clip (if ``normalize``; ``eps``/``clamp`` as
    :func:`l2_normalize`), all are cut to the shortest stream and concatenated, truncated to
    ``max_len``, then the TEF columns are appended (if ``use_tef``), computed from the final
    length L.
    """
    if len(streams) == 0:
        raise ValueError("combine_video_streams needs at least one stream")
    arrays = []
    for i, s in enumerate(streams):
        s = np.asarray(s, dtype=np.float32)
        if s.ndim != 2:
            raise ValueError(f"video stream {i} must be (L, D), got shape {s.shape}")
        arrays.append(l2_normalize(s, eps, clamp) if normalize else s)
    n = min(a.shape[0] for a in arrays)
    if max_len is not None:
        n = min(n, int(max_len))
    out = np.concatenate([a[:n] for a in arrays], axis=1).astype(np.float32, copy=False)
    if use_tef:
        out = np.concatenate([out, tef_columns(n)], axis=1)
    return np.ascontiguousarray(out, dtype=np.float32)


def prepare_text(x: np.ndarray, *, normalize: bool = True, max_len: Optional[int] = None,
                 eps: float = L2_EPS, clamp: bool = False) -> np.ndarray:
    """Token features (T, D) -> truncated to ``max_len`` and L2-normalised; a pooled (D,)
    vector is only normalised. Returns float32."""
    x = np.asarray(x, dtype=np.float32)
    if x.ndim == 2 and max_len is not None:
        x = x[: int(max_len)]
    elif x.ndim not in (1, 2):
        raise ValueError(f"text features must be (T, D) or (D,), got shape {x.shape}")
    x = l2_normalize(x, eps, clamp) if normalize else x.copy()
    return np.ascontiguousarray(x, dtype=np.float32)


def save_npz_deterministic(path: PathLike, arrays: Mapping[str, np.ndarray]) -> None:
    """Write an uncompressed ``.npz`` whose bytes depend only on the arrays (fixed zip
    timestamps), readable by ``np.load``. Not atomic by itself."""
    with zipfile.ZipFile(str(path), "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_STORED
            info.external_attr = 0o644 << 16
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(info, buf.getvalue())


def _load_array_bytes(data: bytes, ext: str, where: str) -> Dict[str, np.ndarray]:
    """Decode ``.npy``/``.npz`` bytes into ``{field: array}`` (``.npy`` -> ``{None: arr}``)."""
    try:
        if ext == "npy":
            return {None: np.load(io.BytesIO(data), allow_pickle=False)}  # type: ignore[dict-item]
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            return {k: z[k] for k in z.files}
    except Exception as e:  # corrupt member
        raise DataFormatError(f"cannot decode .{ext} data: {e}", path=where) from None


# =========================================================================== store interface


class FeatureStore(abc.ABC):
    """Read-only mapping ``key -> float32 array`` with named fields (see module docstring).

    Subclasses implement :meth:`_read_fields`, :meth:`keys`; they may override
    :meth:`num_rows` with something cheaper than reading the array.
    """

    #: store type name as used by :func:`open_store` specs
    type_name: str = ""

    def __init__(self, path: str, field: Optional[str] = DEFAULT_FIELD):
        self.path = str(path)
        self.field = field
        self._keys_cache: Optional[List[str]] = None
        self._key_set: Optional[set] = None

    # -- to implement
    @abc.abstractmethod
    def _list_keys(self) -> List[str]:
        """All keys (any order)."""

    @abc.abstractmethod
    def _read_fields(self, key: str, field: Optional[str]) -> Dict[Optional[str], np.ndarray]:
        """Arrays of ``key``: ``{None: arr}`` for a plain array, else ``{name: arr}`` with at
        least ``field`` when it is given and present (or all fields when ``field`` is None)."""

    # -- public API
    def keys(self) -> List[str]:
        """Sorted list of keys (cached after the first call)."""
        if self._keys_cache is None:
            self._keys_cache = sorted(self._list_keys())
            self._key_set = set(self._keys_cache)
        return list(self._keys_cache)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        if self._key_set is None:
            self.keys()
        return key in self._key_set  # type: ignore[operator]

    def __len__(self) -> int:
        return len(self.keys())

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())

    def get(self, key: str, field: Optional[str] = None) -> np.ndarray:
        """float32 array of ``key`` (field ``field`` or the store default).

        Raises :class:`FeatureNotFoundError` (a KeyError) for an unknown key and
        :class:`DataFormatError` when the key lacks the field.
        """
        key = str(key)
        want = field if field is not None else self.field
        fields = self._read_fields(key, want)
        arr = self._pick(key, fields, want)
        return np.asarray(arr, dtype=np.float32)

    def get_all(self, key: str) -> Dict[str, np.ndarray]:
        """Every field of ``key`` as float32 arrays; a plain array is named after the store's
        default field (``"features"`` when none)."""
        key = str(key)
        fields = self._read_fields(key, None)
        name = self.field or DEFAULT_FIELD
        return {(k if k is not None else name): np.asarray(v, dtype=np.float32) for k, v in fields.items()}

    def num_rows(self, key: str) -> int:
        """First-axis length of ``get(key)`` (e.g. the number of clips)."""
        return int(self.get(key).shape[0])

    def close(self) -> None:
        """Release open files (the store reopens them lazily if used again)."""

    def __enter__(self) -> "FeatureStore":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.path!r}, field={self.field!r})"

    def spec(self) -> Dict[str, Any]:
        """A dict :func:`open_store` accepts to reopen this store."""
        return {"type": self.type_name, "path": self.path, "field": self.field}

    # -- helpers
    def _missing(self, key: str) -> FeatureNotFoundError:
        close = difflib.get_close_matches(key, self.keys(), n=1) if len(self.keys()) < 200000 else []
        hint = f"; closest key: {close[0]!r}" if close else ""
        return FeatureNotFoundError(
            f"key {key!r} not found in {self.type_name} feature store {self.path} "
            f"({len(self.keys())} keys){hint}")

    def _pick(self, key: str, fields: Dict[Optional[str], np.ndarray], want: Optional[str]) -> np.ndarray:
        if None in fields:  # a plain array answers every field name
            return fields[None]
        if want is None:
            if len(fields) == 1:
                return next(iter(fields.values()))
            raise DataFormatError(f"key {key!r} has fields {sorted(fields)}; say which one (field=)",
                                  path=self.path, field="field")
        if want not in fields:
            raise DataFormatError(f"key {key!r} has no field {want!r} (it has {sorted(fields)})",
                                  path=self.path, field=want)
        return fields[want]


# =========================================================================== npz / npy folder


class NpzDirStore(FeatureStore):
    """One ``.npz`` (or ``.npy``) file per key under ``root``.

    Args:
        root: folder.
        field: default field of ``.npz`` files (``"features"`` for Moment-DETR video files,
            ``"last_hidden_state"`` or ``"pooler_output"`` for text).
        key_format: file name of a key relative to ``root``, containing ``{key}`` once,
            ending in ``.npz`` or ``.npy`` (e.g. ``"{key}.npz"``, ``"qid{key}.npz"``).
        cache_size: keep up to this many recently read keys in memory (0: none).
    Access is lazy: one ``np.load`` per ``get`` (unless cached).
    """

    type_name = "npz"

    def __init__(self, root: PathLike, field: Optional[str] = DEFAULT_FIELD,
                 key_format: str = "{key}.npz", cache_size: int = 0):
        super().__init__(str(root), field)
        if key_format.count("{key}") != 1:
            raise ConfigError(f"key_format must contain '{{key}}' exactly once, got {key_format!r}")
        self.ext = key_format.rsplit(".", 1)[-1].lower()
        if self.ext not in ("npz", "npy"):
            raise ConfigError(f"key_format must end in .npz or .npy, got {key_format!r}")
        if not os.path.isdir(self.path):
            raise DataFormatError("feature folder not found", path=self.path)
        self.key_format = key_format
        self.cache_size = int(cache_size)
        self._cache: "OrderedDict[str, Dict[Optional[str], np.ndarray]]" = OrderedDict()
        prefix, suffix = key_format.split("{key}")
        self._key_re = re.compile("^" + re.escape(prefix) + "(.+)" + re.escape(suffix) + "$")
        self._glob = prefix + "*" + suffix

    def file_of(self, key: str) -> str:
        return os.path.join(self.path, self.key_format.format(key=key))

    def _list_keys(self) -> List[str]:
        out = []
        for p in glob.glob(os.path.join(glob.escape(self.path), self._glob)):
            rel = os.path.relpath(p, self.path).replace(os.sep, "/")
            m = self._key_re.match(rel)
            if m:
                out.append(m.group(1))
        return out

    def _read_fields(self, key: str, field: Optional[str]) -> Dict[Optional[str], np.ndarray]:
        if key in self._cache:
            self._cache.move_to_end(key)
            return self._cache[key]
        p = self.file_of(key)
        if not os.path.isfile(p):
            raise self._missing(key)
        try:
            if self.ext == "npy":
                fields: Dict[Optional[str], np.ndarray] = {None: np.load(p, allow_pickle=False)}
            else:
                with np.load(p, allow_pickle=False) as z:
                    names = z.files if (field is None or self.cache_size > 0 or field not in z.files) \
                        else [field]
                    fields = {n: z[n] for n in names}
        except (OSError, ValueError, zipfile.BadZipFile) as e:
            raise DataFormatError(f"cannot read features: {e}", path=p) from None
        if self.cache_size > 0:
            for a in fields.values():
                a.setflags(write=False)
            self._cache[key] = fields
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return fields

    def num_rows(self, key: str) -> int:
        p = self.file_of(key)
        if self.ext == "npy" and os.path.isfile(p):
            return int(np.load(p, mmap_mode="r").shape[0])
        return super().num_rows(key)

    def close(self) -> None:
        self._cache.clear()

    def spec(self) -> Dict[str, Any]:
        return {**super().spec(), "key_format": self.key_format, "cache_size": self.cache_size}


# =========================================================================== HDF5


class Hdf5Store(FeatureStore):
    """One HDF5 file, one dataset per key (MESM layout), or a group of named datasets per key.

    The file is opened on first access and reopened in a new process (after ``fork``), so
    a store created before DataLoader workers start is safe to use inside them; pickling
    drops the handle.
    """

    type_name = "hdf5"

    def __init__(self, path: PathLike, field: Optional[str] = DEFAULT_FIELD):
        super().__init__(str(path), field)
        if not os.path.isfile(self.path):
            raise DataFormatError("HDF5 feature file not found", path=self.path)
        self._h5 = None
        self._pid: Optional[int] = None

    def _file(self):
        if self._h5 is None or self._pid != os.getpid():
            import h5py

            try:
                self._h5 = h5py.File(self.path, "r")
            except OSError as e:
                raise DataFormatError(f"cannot open HDF5 file: {e}", path=self.path) from None
            self._pid = os.getpid()
        return self._h5

    def _list_keys(self) -> List[str]:
        return list(self._file().keys())

    def _read_fields(self, key: str, field: Optional[str]) -> Dict[Optional[str], np.ndarray]:
        import h5py

        f = self._file()
        if key not in f:
            raise self._missing(key)
        node = f[key]
        if isinstance(node, h5py.Dataset):
            return {None: node[()]}
        names = list(node.keys()) if (field is None or field not in node) else [field]
        return {n: node[n][()] for n in names}

    def num_rows(self, key: str) -> int:
        import h5py

        f = self._file()
        if key not in f:
            raise self._missing(key)
        node = f[key]
        if isinstance(node, h5py.Dataset):
            return int(node.shape[0])
        return super().num_rows(key)

    def close(self) -> None:
        if self._h5 is not None and self._pid == os.getpid():
            with contextlib.suppress(Exception):
                self._h5.close()
        self._h5, self._pid = None, None

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_h5"], state["_pid"] = None, None
        return state


# =========================================================================== webdataset shards

_INDEX_SUFFIX = ".c2f-index.json"
_INDEX_VERSION = 1


def expand_shards(spec: Union[PathLike, Sequence[PathLike]]) -> List[str]:
    """Shard paths from a list, a folder (its ``*.tar``), a glob, or a brace pattern
    (``shard-{000000..000009}.tar``)."""
    if isinstance(spec, (list, tuple)):
        return [str(s) for s in spec]
    s = str(spec)
    if os.path.isdir(s):
        return sorted(glob.glob(os.path.join(glob.escape(s), "*.tar")))
    if "{" in s and ".." in s:
        import braceexpand

        return list(braceexpand.braceexpand(s))
    if any(c in s for c in "*?["):
        return sorted(glob.glob(s))
    return [s]


def _split_member(name: str) -> Optional[Tuple[str, str]]:
    for ext in ("npy", "npz"):
        if name.endswith("." + ext) and len(name) > len(ext) + 1:
            return name[: -len(ext) - 1], ext
    return None


class WdsStore(FeatureStore):
    """Webdataset tar shards with one ``{key}.npy`` or ``{key}.npz`` member per key.

    Args:
        shards: a list of tar paths, a folder of ``*.tar``, a glob or a brace pattern.
        field: default field of ``.npz`` members.
        cache_index: write/read the member index beside each shard (``<shard>.c2f-index.json``);
            silently kept in memory only when the folder is not writable.
    """

    type_name = "wds"

    def __init__(self, shards: Union[PathLike, Sequence[PathLike]], field: Optional[str] = DEFAULT_FIELD,
                 cache_index: bool = True):
        paths = expand_shards(shards)
        super().__init__(str(shards) if not isinstance(shards, (list, tuple)) else ",".join(paths), field)
        if not paths:
            raise DataFormatError("no webdataset shards found", path=self.path)
        for p in paths:
            if not os.path.isfile(p):
                raise DataFormatError("webdataset shard not found", path=p)
        self.shards = paths
        self.cache_index = cache_index
        self._index: Optional[Dict[str, Tuple[int, str, int, int]]] = None
        self._handles: Dict[int, Any] = {}
        self._pid: Optional[int] = None

    # -- index
    def _shard_index(self, shard: str) -> Dict[str, List[int]]:
        st = os.stat(shard)
        stamp = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "version": _INDEX_VERSION}
        idx_path = shard + _INDEX_SUFFIX
        if self.cache_index and os.path.isfile(idx_path):
            try:
                with open(idx_path, "r", encoding="utf-8") as f:
                    cached = json.load(f)
                if all(cached.get(k) == v for k, v in stamp.items()):
                    return cached["members"]
            except (OSError, ValueError, KeyError):
                pass  # rebuild
        members: Dict[str, List[int]] = {}
        try:
            with tarfile.open(shard, "r:") as tf:
                for m in tf:
                    if m.isfile():
                        members[m.name] = [m.offset_data, m.size]
        except tarfile.TarError as e:
            raise DataFormatError(f"not a readable (uncompressed) tar shard: {e}", path=shard) from None
        if self.cache_index:
            try:
                write_json({**stamp, "members": members}, idx_path, indent=None)
            except OSError as e:
                logger.debug("cannot cache the shard index %s: %s", idx_path, e)
        return members

    def _build_index(self) -> Dict[str, Tuple[int, str, int, int]]:
        if self._index is None:
            index: Dict[str, Tuple[int, str, int, int]] = {}
            for si, shard in enumerate(self.shards):
                for name, (off, size) in self._shard_index(shard).items():
                    split = _split_member(name)
                    if split is None:
                        continue
                    key, ext = split
                    if key in index:
                        prev = self.shards[index[key][0]]
                        raise DataFormatError(f"key {key!r} appears twice (also in {prev})",
                                              path=shard, field=name)
                    index[key] = (si, ext, off, size)
            self._index = index
        return self._index

    def _list_keys(self) -> List[str]:
        return list(self._build_index().keys())

    def _handle(self, si: int):
        if self._pid != os.getpid():
            self._handles, self._pid = {}, os.getpid()
        if si not in self._handles:
            self._handles[si] = open(self.shards[si], "rb")
        return self._handles[si]

    def _read_fields(self, key: str, field: Optional[str]) -> Dict[Optional[str], np.ndarray]:
        index = self._build_index()
        if key not in index:
            raise self._missing(key)
        si, ext, off, size = index[key]
        fh = self._handle(si)
        fh.seek(off)
        data = fh.read(size)
        return _load_array_bytes(data, ext, f"{self.shards[si]}:{key}.{ext}")

    def close(self) -> None:
        if self._pid == os.getpid():
            for fh in self._handles.values():
                with contextlib.suppress(Exception):
                    fh.close()
        self._handles, self._pid = {}, None

    def __getstate__(self) -> Dict[str, Any]:
        state = self.__dict__.copy()
        state["_handles"], state["_pid"] = {}, None
        return state

    def spec(self) -> Dict[str, Any]:
        return {"type": "wds", "path": list(self.shards), "field": self.field}


def _tar_add_bytes(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 0
    info.mode = 0o644
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    tf.addfile(info, io.BytesIO(data))


def _encode_member(key: str, value: ArrayOrFields) -> Tuple[str, bytes]:
    buf = io.BytesIO()
    if isinstance(value, np.ndarray):
        np.lib.format.write_array(buf, np.ascontiguousarray(value), allow_pickle=False)
        return f"{key}.npy", buf.getvalue()
    fields = dict(value)
    if len(fields) == 0:
        raise ValueError(f"key {key!r} has no arrays to write")
    with zipfile.ZipFile(buf, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in fields.items():
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            b = io.BytesIO()
            np.lib.format.write_array(b, np.ascontiguousarray(arr), allow_pickle=False)
            zf.writestr(info, b.getvalue())
    return f"{key}.npz", buf.getvalue()


def write_wds_shards(items: Iterable[Tuple[str, ArrayOrFields]], out_pattern: PathLike,
                     maxcount: int = 1000) -> List[str]:
    """Write ``(key, array | {field: array})`` items into tar shards of at most ``maxcount``
    samples each. A plain array becomes ``{key}.npy``, a dict ``{key}.npz``.

    Args:
        out_pattern: ``%``-pattern with one integer slot, e.g. ``"out/shard-%06d.tar"``.
    Each shard is written to a temporary name and renamed into place. Bytes are
    deterministic (zeroed mtimes/owners). Returns the shard paths.
    """
    pattern = str(out_pattern)
    try:
        pattern % 0
    except TypeError:
        raise ValueError(f"out_pattern needs one integer slot like 'shard-%06d.tar', got {pattern!r}") from None
    if maxcount < 1:
        raise ValueError("maxcount must be >= 1")
    it = iter(items)
    paths: List[str] = []
    while True:
        chunk = itertools.islice(it, maxcount)
        first = next(chunk, None)
        if first is None:
            break
        path = pattern % len(paths)
        with atomic_path(path) as tmp:
            with tarfile.open(tmp, "w") as tf:
                for key, value in itertools.chain([first], chunk):
                    name, data = _encode_member(str(key), value)
                    _tar_add_bytes(tf, name, data)
        paths.append(path)
    return paths


# =========================================================================== factory / convert

_SPEC_KEYS = {
    "npz": {"type", "path", "field", "key_format", "cache_size"},
    "hdf5": {"type", "path", "field"},
    "wds": {"type", "path", "field", "cache_index", "maxcount"},
}


def _infer_type(path: str) -> Tuple[str, Dict[str, Any]]:
    low = path.lower()
    if low.endswith((".h5", ".hdf5", ".hdf")):
        return "hdf5", {}
    if low.endswith(".tar") or ("{" in path and ".." in path):
        return "wds", {}
    if os.path.isdir(path):
        names = os.listdir(path)
        if any(n.endswith(".tar") for n in names):
            return "wds", {}
        if any(n.endswith(".npy") for n in names) and not any(n.endswith(".npz") for n in names):
            return "npz", {"key_format": "{key}.npy"}
        return "npz", {}
    raise DataFormatError("cannot tell the feature store type (not a folder, .h5/.hdf5 file or "
                          ".tar shard); give a dict spec with 'type'", path=path)


def normalize_spec(spec: Union[PathLike, Mapping[str, Any]], base: Optional[PathLike] = None,
                   where: str = "feature store spec") -> Dict[str, Any]:
    """A path or dict -> a validated dict spec with an absolute ``path`` and a ``type``.

    Unknown keys raise :class:`ConfigError` naming them (and ``where``).
    """
    if isinstance(spec, (str, os.PathLike)):
        spec = {"path": str(spec)}
    if not isinstance(spec, Mapping):
        raise ConfigError(f"{where}: expected a path or a mapping, got {type(spec).__name__}")
    spec = dict(spec)
    if "path" not in spec or spec["path"] in (None, ""):
        raise ConfigError(f"{where}: missing key 'path'")
    p = spec["path"]
    if isinstance(p, (list, tuple)):
        spec["path"] = [resolve_path(x, base) for x in p]
        spec.setdefault("type", "wds")
    else:
        spec["path"] = resolve_path(p, base) if not ("{" in str(p) and ".." in str(p)) else \
            os.path.join(resolve_path(os.path.dirname(str(p)) or ".", base), os.path.basename(str(p)))
    if "type" not in spec or spec["type"] in (None, "auto"):
        t, extra = _infer_type(spec["path"])
        spec["type"] = t
        for k, v in extra.items():
            spec.setdefault(k, v)
    t = spec["type"]
    if t not in _SPEC_KEYS:
        raise ConfigError(f"{where}: unknown store type {t!r}; expected one of {sorted(_SPEC_KEYS)}")
    check_keys(spec, _SPEC_KEYS[t], f"{where} ({t} store)")
    return spec


def open_store(spec: Union[PathLike, Mapping[str, Any], FeatureStore],
               base: Optional[PathLike] = None) -> FeatureStore:
    """Open a store from a path or a dict ``{"type": "npz"|"hdf5"|"wds", "path": ..., "field":
    ..., "key_format": ..., "cache_size": ...}`` (a store is returned unchanged).

    A bare path is typed by its shape: ``.h5/.hdf5`` file -> hdf5, ``.tar`` / brace pattern /
    folder of ``.tar`` -> wds, other folder -> npz (``{key}.npy`` if it holds only ``.npy``).
    Relative paths resolve against ``base`` (default: the current directory).
    """
    if isinstance(spec, FeatureStore):
        return spec
    s = normalize_spec(spec, base)
    field = s.get("field", DEFAULT_FIELD)
    if s["type"] == "npz":
        return NpzDirStore(s["path"], field=field, key_format=s.get("key_format", "{key}.npz"),
                           cache_size=int(s.get("cache_size", 0)))
    if s["type"] == "hdf5":
        return Hdf5Store(s["path"], field=field)
    return WdsStore(s["path"], field=field, cache_index=bool(s.get("cache_index", True)))


def _progress(it: Iterable, total: int, desc: str, enabled: bool) -> Iterable:
    if not enabled:
        return it
    return progress_bar(it, total=total, desc=desc, unit="key", leave=True)


@contextlib.contextmanager
def _atomic_dir(path: str, overwrite: bool) -> Iterator[str]:
    """Yield a temporary folder beside ``path``; rename it onto ``path`` on success."""
    parent = os.path.dirname(path) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=parent)
    try:
        yield tmp
        if os.path.exists(path):
            if not overwrite:
                raise FileExistsError(f"{path} appeared while converting; not overwriting")
            old = tmp + ".old"
            os.rename(path, old)
            os.rename(tmp, path)
            if os.path.isdir(old):
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.remove(old)
        else:
            os.rename(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def convert_store(src_spec: Union[PathLike, Mapping[str, Any], FeatureStore],
                  dst_spec: Union[PathLike, Mapping[str, Any]], *, keys: Optional[Sequence[str]] = None,
                  overwrite: bool = False, progress: bool = True) -> FeatureStore:
    """Copy every key (or ``keys``) of a store into a new store of any type; returns it opened.

    Every field of each key is carried over (a single plain array stays plain in HDF5 and
    becomes ``.npy`` in shards; several fields become an HDF5 group / ``.npz``). The output
    (npz folder, HDF5 file, or folder of shards) is written under a temporary name and
    renamed into place, so an interrupted conversion leaves nothing behind. A ``dst`` whose
    ``path`` exists raises ``FileExistsError`` unless ``overwrite``.

    dst spec: ``{"type": "npz", "path": DIR, "key_format": "{key}.npz"}``,
    ``{"type": "hdf5", "path": FILE.h5}``, ``{"type": "wds", "path": DIR, "maxcount": 1000}``
    (shards ``DIR/shard-000000.tar`` ...). A bare path is typed like :func:`open_store`, except
    a non-existing path without a known extension is an npz folder.
    """
    src = open_store(src_spec)
    if isinstance(dst_spec, (str, os.PathLike)):
        p = str(dst_spec)
        t = "hdf5" if p.lower().endswith((".h5", ".hdf5", ".hdf")) else "npz"
        dst_spec = {"type": t, "path": p}
    dst = dict(dst_spec)
    if "type" not in dst:
        raise ConfigError("dst spec: missing key 'type' (npz, hdf5 or wds)")
    if isinstance(dst.get("path"), (list, tuple)):
        raise ConfigError("dst spec: 'path' must be one folder or file")
    dst = normalize_spec(dst, where="dst spec")
    out = dst["path"]
    if os.path.exists(out) and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
    key_list = list(keys) if keys is not None else src.keys()
    items = ((k, src.get_all(k)) for k in _progress(key_list, len(key_list), f"convert -> {dst['type']}",
                                                    progress))

    def plain_or_dict(fields: Dict[str, np.ndarray]) -> ArrayOrFields:
        return next(iter(fields.values())) if len(fields) == 1 else fields

    if dst["type"] == "npz":
        key_format = dst.get("key_format", "{key}.npz")
        with _atomic_dir(out, overwrite) as tmp:
            for k, fields in items:
                target = os.path.join(tmp, key_format.format(key=k))
                os.makedirs(os.path.dirname(target), exist_ok=True)
                if key_format.endswith(".npy"):
                    if len(fields) != 1:
                        raise ConfigError(f"key {k!r} has fields {sorted(fields)}; a .npy key_format "
                                          "holds one array")
                    np.save(target, next(iter(fields.values())), allow_pickle=False)
                else:
                    save_npz_deterministic(target, fields)
        return NpzDirStore(out, field=dst.get("field", src.field), key_format=key_format)
    if dst["type"] == "hdf5":
        import h5py

        if os.path.isdir(out):
            raise ConfigError(f"dst spec: hdf5 path {out} is a folder")
        with atomic_path(out) as tmp:
            with h5py.File(tmp, "w") as h5:
                for k, fields in items:
                    if len(fields) == 1:
                        h5.create_dataset(k, data=next(iter(fields.values())))
                    else:
                        g = h5.create_group(k)
                        for name, arr in fields.items():
                            g.create_dataset(name, data=arr)
        return Hdf5Store(out, field=dst.get("field", src.field))
    maxcount = int(dst.get("maxcount", 1000))
    with _atomic_dir(out, overwrite) as tmp:
        write_wds_shards(((k, plain_or_dict(f)) for k, f in items), os.path.join(tmp, "shard-%06d.tar"),
                         maxcount=maxcount)
    return WdsStore(out, field=dst.get("field", src.field))


# =========================================================================== loaders


class VideoFeatureLoader:
    """``vid -> (L, sum D_i [+ 2])`` float32 clip features from one or more streams.

    Args:
        streams: feature stores, one per stream (concatenated in this order).
        normalize: L2-normalise each stream per clip (``x / (||x|| + 1e-5)``).
        max_len: keep at most this many clips (None: all).
        use_tef: append the two TEF columns (computed from the final length).
    A stream missing the vid raises :class:`FeatureNotFoundError`.
    """

    def __init__(self, streams: Sequence[FeatureStore], normalize: bool = True,
                 max_len: Optional[int] = None, use_tef: bool = True):
        if len(streams) == 0:
            raise ValueError("VideoFeatureLoader needs at least one stream")
        self.streams = list(streams)
        self.normalize = bool(normalize)
        self.max_len = None if max_len is None else int(max_len)
        self.use_tef = bool(use_tef)

    def raw(self, vid: str) -> List[np.ndarray]:
        """The per-stream arrays as stored, each (L_i, D_i), cut to ``max_len``."""
        out = []
        for s in self.streams:
            a = s.get(vid)
            if a.ndim != 2 or a.shape[0] == 0:
                raise DataFormatError(f"video features of {vid!r} must be (L>0, D), got shape {a.shape}",
                                      path=s.path, field=vid)
            out.append(a[: self.max_len] if self.max_len is not None else a)
        return out

    def load(self, vid: str) -> np.ndarray:
        return combine_video_streams(self.raw(vid), normalize=self.normalize, max_len=self.max_len,
                                     use_tef=self.use_tef)

    __call__ = load

    def __contains__(self, vid: object) -> bool:
        return all(vid in s for s in self.streams)

    def close(self) -> None:
        for s in self.streams:
            s.close()


class TextFeatureLoader:
    """``qid -> (T, D)`` token features (or ``(D,)`` pooled) from a text store.

    Args:
        store: text feature store.
        field: ``"last_hidden_state"`` (tokens) or ``"pooler_output"`` (sentence), etc.
        max_len: keep at most this many tokens (2-D fields only).
        normalize: L2-normalise (each token).
        key_format: store key of a qid, e.g. ``"qid{qid}"`` (Moment-DETR file names).
    """

    def __init__(self, store: FeatureStore, field: Optional[str] = "last_hidden_state",
                 max_len: Optional[int] = None, normalize: bool = True, key_format: str = "qid{qid}"):
        if "{qid}" not in key_format:
            raise ConfigError(f"key_format must contain '{{qid}}', got {key_format!r}")
        self.store = store
        self.field = field
        self.max_len = None if max_len is None else int(max_len)
        self.normalize = bool(normalize)
        self.key_format = key_format

    def key(self, qid: Any) -> str:
        return self.key_format.format(qid=qid)

    def load(self, qid: Any, field: Optional[str] = None) -> np.ndarray:
        f = field if field is not None else self.field
        a = self.store.get(self.key(qid), f)
        if a.ndim == 2 and a.shape[0] == 1 and f is not None and "pool" in f:
            a = a[0]  # (1, D) pooled vectors
        if a.ndim == 2 and a.shape[0] == 0:
            raise DataFormatError(f"text features of qid {qid!r} have no tokens", path=self.store.path,
                                  field=f)
        return prepare_text(a, normalize=self.normalize, max_len=self.max_len)

    __call__ = load

    def __contains__(self, qid: object) -> bool:
        return self.key(qid) in self.store

    def close(self) -> None:
        self.store.close()
