"""Load an ONNX model from a path, bytes or a ModelProto, with external data and local functions inlined."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import onnx
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
    if not proto.graph.node:
        raise ModelError("the model has no nodes")
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
    """A stable content hash of a model: the cache key and the 'model hash' reported to users."""
    return hashlib.blake2b(proto.SerializeToString(deterministic=True), digest_size=16).hexdigest()
