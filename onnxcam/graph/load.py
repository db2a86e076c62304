"""Load an ONNX model from a path, bytes or a ModelProto, with external data and local functions inlined."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx
import onnx.inliner
from google.protobuf.message import DecodeError

from ..errors import ModelError

ModelLike = "str | os.PathLike | bytes | onnx.ModelProto"


def load_model(model) -> onnx.ModelProto:
    """Return a ModelProto with all weights in memory and model-local functions inlined."""
    if isinstance(model, onnx.ModelProto):
        proto = model
    elif isinstance(model, (bytes, bytearray)):
        proto = _parse(bytes(model), "the given bytes")
    elif isinstance(model, (str, os.PathLike)):
        proto = _load_path(Path(model))
    else:
        raise ModelError(f"model must be a path, bytes or onnx.ModelProto, not {type(model).__name__}")
    _check_graph(proto)
    if proto.functions:
        # Dynamo exports may wrap modules in local functions; the gradient walk needs plain nodes.
        proto = onnx.inliner.inline_local_functions(proto)
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


def _load_path(path: Path) -> onnx.ModelProto:
    if not path.exists():
        raise ModelError(f"model file not found: {path}")
    if path.is_dir():
        raise ModelError(f"model path is a folder, not an .onnx file: {path}")
    proto = _parse(path.read_bytes(), str(path))
    try:
        onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
    except (OSError, ValueError) as exc:
        raise ModelError(f"cannot load the external data of {path}: {exc}") from exc
    return proto


def model_digest(proto: onnx.ModelProto) -> str:
    """A content hash of a model (sha256, first 32 hex digits): the cache key and the 'model hash' users see.

    Hashes the graph without its large weights, then each weight's bytes: no 100 MB re-serialization.
    """
    skeleton, weights = split_weights(proto)
    return _digest(skeleton, ((t.name, t.raw_data if t.HasField("raw_data") else t.SerializeToString())
                              for t in weights))


def _digest(skeleton: onnx.ModelProto, named_bytes) -> str:
    h = hashlib.sha256(skeleton.SerializeToString(deterministic=True))
    for name, data in named_bytes:
        h.update(name.encode())
        h.update(data)
    return h.hexdigest()[:32]


def load_detached(model) -> tuple[onnx.ModelProto, dict, str]:
    """(skeleton, {name: numpy array} of the large weights, model digest) of a path, bytes or ModelProto.

    Serialized models (a path without external data, bytes) are split at the wire level (wire.py): the weights
    are read-only views into the file's or caller's bytes, never parsed or copied. Everything else is parsed
    (load_model) and split with detach_weights; both ways give the same skeleton, weights and digest.
    """
    data = _serialized(model)
    split = None if data is None else _split_serialized(data)
    if split is None:
        proto = load_model(model)
        owned = not isinstance(model, onnx.ModelProto) or proto is not model  # inlining functions copies
        digest = model_digest(proto)
        skeleton, weights = detach_weights(proto, owned)
        return skeleton, weights, digest
    skeleton, weights, hashed = split
    _check_graph(skeleton)
    if skeleton.functions:
        skeleton = onnx.inliner.inline_local_functions(skeleton)
    return skeleton, weights, _digest(skeleton, hashed)


def _serialized(model) -> bytes | None:
    if isinstance(model, (bytes, bytearray)):
        return bytes(model)  # a bytearray is copied: the caller may change it later
    if isinstance(model, (str, os.PathLike)):
        path = Path(model)
        if path.is_file():
            return path.read_bytes()
    return None  # a ModelProto, or a path load_model reports on


def _split_serialized(data: bytes):
    from .wire import split_serialized
    try:
        return split_serialized(data, _is_big, _placeholder, _RAW_DTYPES)
    except (ValueError, IndexError, DecodeError, RuntimeError):
        return None  # not a well-formed model: load_model parses it and says what is wrong


def _check_graph(proto: onnx.ModelProto) -> None:
    if not proto.graph.node:
        raise ModelError("the model has no nodes")


PLACEHOLDER_LOCATION = "onnxcam-weights-held-in-memory"


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


def is_placeholder(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL and any(
        e.key == "location" and e.value == PLACEHOLDER_LOCATION for e in t.external_data)


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
