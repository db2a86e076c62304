"""Split a serialized model into its skeleton and its large weights without parsing the weights.

Parsing a model with protobuf copies every weight into the message, and reading `raw_data` copies it again;
for a 100 MB model that is 200 MB before onnxruntime makes its own copy. Here the serialized bytes are walked
at the wire level instead: each large initializer's `raw_data` becomes a numpy view into the caller's buffer
(no copy), and only the small rest of the model is parsed. The result is what load.split_weights gives on the
parsed model, field for field, so digests and rewrites do not depend on which way a model was read.
"""

from __future__ import annotations

import numpy as np
import onnx

from .external import byte_size

_MODEL_GRAPH, _GRAPH_INITIALIZER, _TENSOR_RAW_DATA = 7, 5, 9
_LENGTH_DELIMITED = 2


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        low = value & 0x7F
        value >>= 7
        if value:
            out.append(low | 0x80)
        else:
            out.append(low)
            return bytes(out)


def _fields(buf: memoryview, start: int, end: int):
    """(field number, wire type, value start, value end, field start) of each field of one message."""
    pos = start
    while pos < end:
        field_start = pos
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value_start = pos
            _, pos = _varint(buf, pos)
        elif wire == 1:
            value_start, pos = pos, pos + 8
        elif wire == _LENGTH_DELIMITED:
            size, value_start = _varint(buf, pos)
            pos = value_start + size
        elif wire == 5:
            value_start, pos = pos, pos + 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")
        if pos > end:
            raise ValueError("truncated protobuf message")
        yield number, wire, value_start, pos, field_start


def _field(number: int, payload: bytes) -> bytes:
    return _encode_varint(number << 3 | _LENGTH_DELIMITED) + _encode_varint(len(payload)) + payload


def split_serialized(data: bytes, is_big, placeholder, raw_dtypes: dict, offsets: dict | None = None):
    """(skeleton ModelProto, {name: numpy view of data} for the large weights, [(name, bytes)] of the weights as
    load.model_digest hashes them), or None when the model needs the parsed path (external initializers, or no
    graph). `is_big(tensor)`, `placeholder(tensor)` and `raw_dtypes` are load.py's rules, applied here to each
    initializer parsed without its raw bytes. The skeleton is not checked yet: load.py checks it (and reads the
    external data of tensors other than initializers) as it checks a parsed model.
    offsets: if given, {name: (offset, length)} of each large weight's raw bytes in `data` is filled in (for the
    weights that are views of `data`): where a model file holds them, for onnxruntime to read them itself.
    """
    buf = memoryview(data)
    graph = [f for f in _fields(buf, 0, len(buf)) if f[0] == _MODEL_GRAPH and f[1] == _LENGTH_DELIMITED]
    if len(graph) != 1:
        return None
    _, _, graph_start, graph_end, graph_field_start = graph[0]
    pieces, weights, hashed = [], {}, []
    for number, wire, start, end, field_start in _fields(buf, graph_start, graph_end):
        if number != _GRAPH_INITIALIZER or wire != _LENGTH_DELIMITED:
            pieces.append(buf[field_start:end])
            continue
        raw, rest = None, []
        for n, w, s, e, fs in _fields(buf, start, end):
            if n == _TENSOR_RAW_DATA and w == _LENGTH_DELIMITED:
                raw = (s, e)
            else:
                rest.append(buf[fs:e])
        tensor = onnx.TensorProto.FromString(b"".join(rest))  # small: everything but the raw bytes
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            return None  # weights in other files: load.py reads them
        if not is_big(tensor):
            pieces.append(buf[field_start:end])
            continue
        weights[tensor.name], digested = _array(data, buf, tensor, raw, start, end, raw_dtypes)
        if offsets is not None and raw is not None and tensor.data_type in raw_dtypes:
            offsets[tensor.name] = (raw[0], raw[1] - raw[0])
        hashed.append((tensor.name, digested))
        pieces.append(_field(_GRAPH_INITIALIZER, placeholder(tensor).SerializeToString()))
    skeleton = b"".join([buf[:graph_field_start], _field(_MODEL_GRAPH, b"".join(pieces)), buf[graph_end:]])
    return onnx.ModelProto.FromString(skeleton), weights, hashed


def _array(data: bytes, buf: memoryview, tensor: onnx.TensorProto, raw, start: int, end: int, raw_dtypes: dict):
    """(value, the bytes the digest reads): a view of the raw bytes when numpy reads them as they are; else the
    parsed tensor's value. Raw bytes of another size than the shape's raise ValueError: the parsed path (load.py)
    then reports the tensor."""
    want = byte_size(tensor)
    if raw is not None and want is not None and raw[1] - raw[0] != want:
        raise ValueError(f"initializer {tensor.name!r}: raw data of the wrong length")
    if raw is not None and tensor.data_type in raw_dtypes:
        dtype = np.dtype(raw_dtypes[tensor.data_type])
        count = (raw[1] - raw[0]) // dtype.itemsize
        view = np.frombuffer(data, dtype=dtype, count=count, offset=raw[0]).reshape(tuple(tensor.dims))
        return view, buf[raw[0]:raw[1]]
    parsed = onnx.TensorProto.FromString(buf[start:end])
    digested = parsed.raw_data if parsed.HasField("raw_data") else parsed.SerializeToString()
    return onnx.numpy_helper.to_array(parsed), digested
