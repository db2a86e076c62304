"""Load an ONNX model from a path, bytes or a ModelProto, with external data and local functions inlined."""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import onnx
import onnx.inliner
from google.protobuf.message import DecodeError

from ..errors import InputError, ModelError
from . import external
from .external import PLACEHOLDER_LOCATION, is_placeholder  # noqa: F401 (graph/model.py imports is_placeholder here)

if TYPE_CHECKING:  # graph/model.py imports this module
    from .model import ModelGraph

log = logging.getLogger(__name__)
ModelLike = "str | os.PathLike | bytes | onnx.ModelProto"


def load_model(model, base_dir: str | os.PathLike | None = None) -> onnx.ModelProto:
    """Return a ModelProto with all weights in memory and model-local functions inlined.

    base_dir: the folder that holds the external data of a model given as bytes or a ModelProto (without it, such
    a model with external data is refused). A model file's external data is always read from the file's folder.
    """
    data, given, folder, what = _source(model, base_dir)
    return _parsed(data, given, folder, what)


def _source(model, base_dir) -> tuple[bytes | None, onnx.ModelProto | None, Path | None, str]:
    """(serialized bytes or None, the caller's ModelProto or None, the folder of its external data, its name in
    messages)."""
    if isinstance(model, onnx.ModelProto):
        return None, model, _base_dir(base_dir), "the model given as a ModelProto"
    if isinstance(model, (bytes, bytearray)):
        # a bytearray is copied: the caller may change it later, and numpy views of the weights point into it
        return bytes(model), None, _base_dir(base_dir), "the model given as bytes"
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if base_dir is not None:
            raise InputError(f"base_dir is for models given as bytes or a ModelProto; {path} reads its external "
                             "data from its own folder")
        if not path.exists():
            raise ModelError(f"model file not found: {path}")
        if path.is_dir():
            raise ModelError(f"model path is a folder, not an .onnx file: {path}")
        try:
            return path.read_bytes(), None, path.parent, str(path)
        except OSError as exc:
            raise ModelError(f"cannot read the model file {path}: {exc.strerror or exc}") from exc
    raise ModelError(f"model must be a path, bytes or onnx.ModelProto, not {type(model).__name__}")


def _base_dir(base_dir) -> Path | None:
    if base_dir is None:
        return None
    if not isinstance(base_dir, (str, os.PathLike)) or not Path(base_dir).is_dir():
        raise InputError(f"base_dir must be the folder that holds the model's external data, not {base_dir!r}")
    return Path(base_dir)


def _parsed(data: bytes | None, given: onnx.ModelProto | None, folder: Path | None, what: str,
            files: list | None = None) -> onnx.ModelProto:
    if given is None:
        proto = _parse(data, what)
    elif external.has_external_data(given):
        proto = onnx.ModelProto()
        proto.CopyFrom(given)  # reading the external data fills the tensors: the caller's proto stays as it is
    else:
        proto = given
    return _checked(proto, folder, what, files=files)


def _checked(proto: onnx.ModelProto, folder: Path | None, what: str, held: frozenset = frozenset(),
             files: list | None = None):
    """The model with its external data read and its functions inlined, once it passed every check.
    held: the top-level initializers whose values were split off (wire.py), not in the proto.
    files: if given, the external data files read are appended to it."""
    _check_graph(proto)
    external.check_metadata(proto, what)
    read = external.load_tensors(proto, folder, what, held)
    if files is not None:
        files.extend(read)
    if proto.functions:
        external.check_functions(proto, what)
        # Dynamo exports may wrap modules in local functions; the gradient walk needs plain nodes.
        try:
            proto = onnx.inliner.inline_local_functions(proto)
        except (onnx.checker.ValidationError, RuntimeError, ValueError, KeyError, TypeError) as exc:
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ModelError(f"{what}: its local functions cannot be inlined: {first}") from exc
    return proto


def _parse(data: bytes, what: str) -> onnx.ModelProto:
    proto = onnx.ModelProto()
    try:
        proto.ParseFromString(data)
    except (DecodeError, RuntimeError, ValueError) as exc:
        raise ModelError(f"{what} is not a valid ONNX model (protobuf parse failed: {exc})") from exc
    if not proto.HasField("graph"):
        raise ModelError(f"{what} is not a valid ONNX model (no graph)")
    return proto


def model_digest(proto: onnx.ModelProto) -> str:
    """A content hash of a model (sha256, first 32 hex digits): the cache key and the 'model hash' users see.

    Hashes the graph without its large weights, then each weight's bytes: no 100 MB re-serialization.
    """
    skeleton, weights = split_weights(proto)
    return _digest(skeleton, ((t.name, t.raw_data if t.HasField("raw_data") else t.SerializeToString())
                              for t in weights))


def _digest(skeleton: onnx.ModelProto, named_bytes) -> str:
    return _hash(skeleton.SerializeToString(deterministic=True), named_bytes)


def _hash(skeleton_bytes: bytes, named_bytes) -> str:
    h = hashlib.sha256(skeleton_bytes)
    for name, data in named_bytes:
        h.update(name.encode())
        h.update(data)
    return h.hexdigest()[:32]


def load_detached(model, base_dir: str | os.PathLike | None = None, files: list | None = None,
                  offsets: dict | None = None, *, digest_later: bool = False
                  ) -> tuple[onnx.ModelProto, dict, str | _Hashing]:
    """(skeleton, {name: numpy array} of the large weights, model digest) of a path, bytes or ModelProto.

    Serialized models (a path without external initializers, bytes) are split at the wire level (wire.py): the
    weights are read-only views into the file's or caller's bytes, never parsed or copied. Everything else is parsed
    (load_model) and split with detach_weights; both ways give the same skeleton, weights and digest.
    base_dir: as for load_model. files: if given, the external data files read are appended to it (a cache of
    the digest must notice when one of them changes). offsets: if given, {name: (offset, length)} of the large
    weights whose raw bytes lie as they are in the serialized model is filled in (wire.py).
    digest_later: the digest comes as a _Hashing (its result() is the digest), computed in a thread of its own for
    a serialized model with large weights (hashlib lets go of the GIL: the caller goes on meanwhile).
    """
    data, given, folder, what = _source(model, base_dir)
    split = None if data is None else _split_serialized(data, offsets)
    if split is None:
        proto = _parsed(data, given, folder, what, files)
        owned = proto is not given  # read here, copied to read external data, or copied by inlining functions
        digest = model_digest(proto)
        skeleton, weights = detach_weights(proto, owned)
        return skeleton, weights, digest
    skeleton, weights, hashed = split
    skeleton = _checked(skeleton, folder, what, held=frozenset(weights), files=files)
    if digest_later and len(data) >= _HASH_IN_THREAD_BYTES:
        return skeleton, weights, _Hashing(skeleton, hashed)
    return skeleton, weights, _digest(skeleton, hashed)


# Models of at least this many bytes are hashed in a thread of their own (below, a thread costs more than it hides).
_HASH_IN_THREAD_BYTES = 8 << 20


class _Hashing:
    """A model's digest (_digest) being computed in a thread: a 100 MB model takes 65 ms of SHA-256, which the
    command line spends meanwhile on finding the model's task and on its analysis. result() waits for it."""

    def __init__(self, skeleton: onnx.ModelProto, named_bytes):
        skeleton_bytes = skeleton.SerializeToString(deterministic=True)  # here: the caller may change the skeleton
        self._digest: str | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(skeleton_bytes, list(named_bytes)),
                                        name="onnxcam-digest", daemon=True)
        self._thread.start()

    def _run(self, skeleton_bytes: bytes, named_bytes: list) -> None:
        try:
            self._digest = _hash(skeleton_bytes, named_bytes)
        except BaseException as exc:  # noqa: BLE001 - raised again in the thread that asks for the digest
            self._error = exc

    def result(self) -> str:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._digest


class LoadedModel:
    """A model read once: its skeleton (the graph, with placeholders for the large weights), the large weights as
    numpy, and its content digest. Every Explainer, CAM object and the CLI go through one of these.

    The weights are dropped by release_weights() once onnxruntime holds its own copy (an Explainer does so after
    each build). Reading `weights` after that reads the model again from its source (the file, or the caller's
    bytes or ModelProto): a ModelError if the file changed meanwhile. A model file seen before with the same path,
    size and mtime (and external data files) is not read at all until its skeleton or weights are needed, since its
    digest is known (onnxcam.cache, table "digests").
    """

    def __init__(self, source, base_dir: str | os.PathLike | None = None):
        """source: a path (its external data is read from its folder), bytes or an onnx.ModelProto (left
        untouched); base_dir: the folder of the external data of a model given as bytes or a ModelProto."""
        from ..cache import CACHE

        self.source, self.base_dir = source, base_dir
        self._skeleton: onnx.ModelProto | None = None
        self._weights: dict | None = None
        self._offsets: dict = {}  # name -> (offset, length) of weights held as they are in the model file
        self._stat: tuple | None = None  # the file's stat key when it was read
        self._lock = threading.Lock()
        self._handed: tuple | None = None  # (input shape, input name, ModelGraph): hand_over / take_graph
        self._digest: str | _Hashing = ""
        self._digest_entry: tuple | None = None  # the "digests" cache entry to make once the digest is known
        if isinstance(source, (str, os.PathLike)):
            known = CACHE.get("digests", _stat_key(source))
            if known is not None and all(_stat_key(f) == stat for f, stat in known[1]):
                self._digest = known[0]
                return
            files: list = []
            self._digest = self._read(files)
            key = _stat_key(source)
            if key is not None:
                self._digest_entry = key, tuple((f, _stat_key(f)) for f in files)
            if isinstance(self._digest, str):
                self.digest  # noqa: B018 - known now (a small model): cached now
        else:
            self._digest = self._read()

    @property
    def digest(self) -> str:
        """The model's content hash (model_digest). For a large model file read just now it is computed in a thread
        (_Hashing) and this waits for it."""
        digest = self._digest
        if isinstance(digest, _Hashing):
            self._digest = digest = digest.result()
        entry, self._digest_entry = self._digest_entry, None
        if entry is not None:
            from ..cache import CACHE

            CACHE.put("digests", entry[0], (digest, entry[1]))
        return digest

    def hand_over(self, graph: ModelGraph, input_shape: tuple, input_name: str | None = None) -> None:
        """Keep `graph`, a ModelGraph of this model pinned to input_shape, for the next Explainer that would make the
        same one (the command line's task detection, then the classifier's build: one analysis instead of two).
        One graph at a time; the Explainer that takes it builds on it (take_graph)."""
        with self._lock:
            self._handed = (tuple(input_shape), input_name, graph)

    def take_graph(self, input_shape: tuple | None, input_name: str | None = None) -> ModelGraph | None:
        """The graph handed over for this input shape and input (then no longer kept), or None."""
        with self._lock:
            handed, self._handed = self._handed, None
        if handed is None or input_shape is None or handed[:2] != (tuple(input_shape), input_name):
            return None
        return handed[2]

    @classmethod
    def of(cls, source, base_dir: str | os.PathLike | None = None) -> LoadedModel:
        """The LoadedModel of `source`: for a model file, the one already made for it while the file is unchanged
        (onnxcam.cache, table "models"), so that the CLI, the CAM classes and every Explainer on one file share one
        read; a LoadedModel is returned as it is; bytes and ModelProtos are read anew."""
        if isinstance(source, LoadedModel):
            return source
        if not isinstance(source, (str, os.PathLike)) or base_dir is not None:
            return cls(source, base_dir)
        from ..cache import CACHE

        key = _stat_key(source)
        if key is None:
            return cls(source)  # reports the missing file
        found = CACHE.get("models", key)
        if found is not None and found._unchanged():
            return found
        loaded = cls(source)
        CACHE.put("models", key, loaded)
        return loaded

    def _unchanged(self) -> bool:
        """Whether the external data files read with this model are as they were (the file's own stat is the key)."""
        from ..cache import CACHE

        digest = self.digest  # first: a digest still being computed goes into the cache once known
        known = CACHE.get("digests", _stat_key(self.source))
        return known is not None and known[0] == digest and all(_stat_key(f) == stat for f, stat in known[1])

    @property
    def skeleton(self) -> onnx.ModelProto:
        """The model without its large weights (read on first use)."""
        if self._skeleton is None:
            self._reread()
        return self._skeleton

    @property
    def weights(self) -> dict:
        """{name: numpy array} of the large initializers (read-only views where the wire loader could), read again
        from the source when they were released (see the class docstring)."""
        weights = self._weights
        if weights is None:
            weights = self._reread()
        return weights

    @property
    def holds_weights(self) -> bool:
        """Whether the weights are in memory now (False after release_weights, until read again)."""
        return self._weights is not None

    @property
    def metadata(self) -> dict[str, str]:
        """The model's metadata_props as a dict (preprocessing, labels, ...)."""
        return {p.key: p.value for p in self.skeleton.metadata_props}

    def release_weights(self) -> None:
        """Drop the weights (onnxruntime copied them into its session); a later `weights` reads them again."""
        self._weights = None

    def file_backed(self, weights: dict) -> dict[str, tuple[int, int]]:
        """{name: (offset, length)} of those of `weights` that are held as they are, and unchanged, in the model
        file this was read from: onnxruntime can read them from the file itself (graph/wire.py offsets), so that
        they need not be in memory twice while a session is made. {} for models not read from a file that way."""
        held = self._weights
        if not self._offsets or held is None or _stat_key(self.source) != self._stat:
            return {}
        return {name: self._offsets[name] for name, a in weights.items()
                if name in self._offsets and held.get(name) is a}

    def _read(self, files: list | None = None) -> str | _Hashing:
        skeleton, weights, digest = self._load(files, digest_later=True)
        self._skeleton, self._weights = skeleton, weights
        return digest

    def _load(self, files: list | None = None, digest_later: bool = False) -> tuple:
        offsets: dict = {}
        is_file = isinstance(self.source, (str, os.PathLike))
        stat = _stat_key(self.source) if is_file else None
        skeleton, weights, digest = load_detached(self.source, self.base_dir, files, offsets if is_file else None,
                                                  digest_later=digest_later)
        self._offsets, self._stat = (offsets, stat) if is_file and stat == _stat_key(self.source) else ({}, None)
        return skeleton, weights, digest

    def _reread(self) -> dict:
        with self._lock:
            if self._weights is not None and self._skeleton is not None:
                return self._weights
            if self._skeleton is not None:  # else: the first read of a file whose digest was known
                log.info("reading %s again: its weights were released after the build", _name(self.source))
            skeleton, weights, digest = self._load()
            if digest != self.digest:
                raise ModelError(f"{_name(self.source)} changed since it was loaded (model hash {self.digest}, now "
                                 f"{digest}): make a new Explainer")
            if self._skeleton is None:
                self._skeleton = skeleton
            self._weights = weights
            return weights


def _stat_key(path) -> tuple | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return os.path.realpath(path), st.st_size, st.st_mtime_ns


def _name(source) -> str:
    return str(source) if isinstance(source, (str, os.PathLike)) else f"the model given as {type(source).__name__}"


def _split_serialized(data: bytes, offsets: dict | None = None):
    from .wire import split_serialized
    try:
        return split_serialized(data, _is_big, _placeholder, _RAW_DTYPES, offsets)
    except (ValueError, IndexError, DecodeError, RuntimeError):
        if offsets is not None:
            offsets.clear()
        return None  # not a well-formed model: load_model parses it and says what is wrong


def _check_graph(proto: onnx.ModelProto) -> None:
    if not proto.graph.node:
        raise ModelError("the model has no nodes")


def split_weights(proto: onnx.ModelProto, min_elements: int = 1024):
    """(the model with its large initializers replaced by data-less placeholders, those initializers).

    Graph analysis, shape inference and rewriting need the weights' names, types and shapes, never their
    bytes; leaving the bytes out keeps every copy and serialization of a 100 MB model small. Placeholders are
    external-data initializers at a location that does not exist; onnxruntime gets the real values through
    SessionOptions.add_external_initializers (runtime.session). Small initializers (shapes, axes) stay inline,
    since shape inference and constant folding read their values.
    """
    skeleton = _copy_without(proto, "graph")
    skeleton.graph.CopyFrom(_copy_without(proto.graph, "initializer"))
    big = []
    for t in proto.graph.initializer:
        if _is_big(t, min_elements):
            big.append(t)
            skeleton.graph.initializer.append(_placeholder(t))
        else:
            skeleton.graph.initializer.append(t)
    return skeleton, big


def _is_big(t: onnx.TensorProto, min_elements: int = 1024) -> bool:
    return _numel(t) >= min_elements and not t.data_location


def _placeholder(t: onnx.TensorProto) -> onnx.TensorProto:
    p = onnx.TensorProto(name=t.name, data_type=t.data_type, dims=t.dims)
    p.data_location = onnx.TensorProto.EXTERNAL
    entry = p.external_data.add()
    entry.key, entry.value = "location", PLACEHOLDER_LOCATION
    return p


def with_weights(skeleton: onnx.ModelProto, weights: dict) -> onnx.ModelProto:
    """A self-contained copy of a skeleton model, its placeholders replaced by the real values (numpy arrays)."""
    full = _copy_without(skeleton, "graph")
    full.graph.CopyFrom(_copy_without(skeleton.graph, "initializer"))
    full.graph.initializer.extend(onnx.numpy_helper.from_array(weights[t.name], t.name) if t.name in weights else t
                                  for t in skeleton.graph.initializer)
    return full


def detach_weights(proto: onnx.ModelProto, owned: bool) -> tuple[onnx.ModelProto, dict]:
    """(a skeleton of the model, {name: numpy array} of its large weights): each weight is held once, as numpy.

    The skeleton is a new message: once the caller drops an owned proto (read here from a path or bytes), its
    memory goes (protobuf frees a message's arena only with the message). A caller's proto is left as it is.
    """
    skeleton, big = split_weights(proto)
    return skeleton, {t.name: _array(t).copy() if not owned else _array(t) for t in big}


def _array(t: onnx.TensorProto):
    """A tensor's value as a numpy array that owns no second copy (raw bytes are read once)."""
    import numpy as np

    if t.HasField("raw_data") and t.data_type in _RAW_DTYPES:
        return np.frombuffer(t.raw_data, dtype=_RAW_DTYPES[t.data_type]).reshape(tuple(t.dims))
    return onnx.numpy_helper.to_array(t)


_RAW_DTYPES = {onnx.TensorProto.FLOAT: "<f4", onnx.TensorProto.FLOAT16: "<f2", onnx.TensorProto.DOUBLE: "<f8",
               onnx.TensorProto.INT8: "i1", onnx.TensorProto.UINT8: "u1", onnx.TensorProto.INT32: "<i4",
               onnx.TensorProto.INT64: "<i8"}


def _copy_without(message, skipped: str):
    """A copy of a protobuf message without one (large) field, made without copying that field first."""
    copy = type(message)()
    for field, value in message.ListFields():
        if field.name == skipped:
            continue
        if field.is_repeated:
            getattr(copy, field.name).extend(value)
        elif field.message_type is not None:
            getattr(copy, field.name).CopyFrom(value)
        else:
            setattr(copy, field.name, value)
    return copy


def _numel(t: onnx.TensorProto) -> int:
    n = 1
    for d in t.dims:
        n *= d
    return n
