"""What every model passes before onnxcam uses it: external data read into memory from the model's own folder
(never the working directory), tensor data of the declared size, UTF-8 metadata, non-recursive local functions.

onnx's and onnxruntime's own readers resolve a relative location against the current directory when the model was
given as bytes, and follow '..', absolute paths and symlinks; here each location is resolved by hand: relative,
without '..', no component a symlink, inside the model's folder, offset and length inside the file and equal to the
tensor's byte size. After `read_external_data` no tensor of the model refers to a file, so neither constant folding
nor onnxruntime ever opens one.
"""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path, PureWindowsPath

import onnx
from onnx import AttributeProto, TensorProto, helper

from ..errors import ModelError

log = logging.getLogger(__name__)

# Placeholder location of the weights onnxcam holds in memory (load.split_weights); no file has this name.
PLACEHOLDER_LOCATION = "onnxcam-weights-held-in-memory"
# Element types packed below one byte per element in raw data (bits per element).
_PACKED_BITS = {getattr(TensorProto, name): bits for name, bits in
                (("INT4", 4), ("UINT4", 4), ("FLOAT4E2M1", 4), ("INT2", 2), ("UINT2", 2), ("FLOAT6E2M3", 6),
                 ("FLOAT6E3M2", 6)) if hasattr(TensorProto, name)}
_COMPLEX = {TensorProto.COMPLEX64, TensorProto.COMPLEX128}
_TENSOR_ATTRIBUTES = {AttributeProto.TENSOR, AttributeProto.TENSORS, AttributeProto.SPARSE_TENSOR,
                      AttributeProto.SPARSE_TENSORS, AttributeProto.UNDEFINED}


# ---- walking every tensor --------------------------------------------------------------------------------------
def _scopes(proto: onnx.ModelProto):
    """The model's graph, its local functions, and every subgraph (If/Loop/Scan bodies) inside them."""
    todo = [proto.graph, *proto.functions]
    while todo:
        scope = todo.pop()
        yield scope
        for node in scope.node:
            todo.extend(_subgraphs(node))


def _subgraphs(node: onnx.NodeProto):
    for a in node.attribute:
        if a.HasField("g"):
            yield a.g
        yield from a.graphs


def _node_label(node: onnx.NodeProto) -> str:
    if node.name:
        return f"node {node.name!r}"
    return f"the {node.op_type} node making {node.output[0]!r}" if node.output else f"a {node.op_type} node"


def tensors(proto: onnx.ModelProto, held: frozenset = frozenset()):
    """(tensor, place) for every TensorProto of the model: initializers, sparse initializers' values and indices,
    and tensor attributes (Constant values) of every node, in subgraphs and local functions too; describe(place)
    says in words where it is (only for messages: a label per attribute would cost more than the walk).
    held: names of top-level initializers whose data onnxcam holds in memory (skipped)."""
    for scope in _scopes(proto):
        if isinstance(scope, onnx.GraphProto):
            for t in scope.initializer:
                if not (scope is proto.graph and t.name in held):
                    yield t, ("initializer", t.name, None, "")
            for s in scope.sparse_initializer:
                yield s.values, ("sparse initializer", s.values.name, None, " (values)")
                yield s.indices, ("sparse initializer", s.values.name, None, " (indices)")
        for node in scope.node:
            for a in node.attribute:
                if a.type not in _TENSOR_ATTRIBUTES:
                    continue
                for t in ([a.t] if a.HasField("t") else []) + list(a.tensors):
                    yield t, ("attribute", a.name, node, "")
                for s in ([a.sparse_tensor] if a.HasField("sparse_tensor") else []) + list(a.sparse_tensors):
                    yield s.values, ("attribute", a.name, node, " (sparse values)")
                    yield s.indices, ("attribute", a.name, node, " (sparse indices)")


def describe(place: tuple) -> str:
    """'initializer 'w'', 'attribute 'value' of the Constant node making 'w'', ... for a place tensors() gave."""
    kind, name, node, part = place
    owner = f" of {_node_label(node)}" if node is not None else ""
    return f"{kind} {name!r}{owner}{part}"


def is_external(t: TensorProto) -> bool:
    return t.data_location == TensorProto.EXTERNAL


def is_placeholder(t: TensorProto) -> bool:
    return is_external(t) and _entries(t).get("location") == PLACEHOLDER_LOCATION


def has_external_data(proto: onnx.ModelProto, held: frozenset = frozenset()) -> bool:
    return any(is_external(t) for t, _ in tensors(proto, held))


# ---- reading external data -------------------------------------------------------------------------------------
def load_tensors(proto: onnx.ModelProto, base_dir: Path | None, what: str,
                 held: frozenset = frozenset()) -> list[Path]:
    """Read every external tensor of `proto` (changed in place) from files inside `base_dir`, and check that each
    tensor holds as much data as its shape and type say (numpy reshape errors, or silent truncation, otherwise).

    base_dir None (bytes or a ModelProto given without a folder): any external tensor is an error, since there is
    no folder to read it from safely. `what` names the model in messages. Returns the files read.
    """
    base = None if base_dir is None else Path(os.path.realpath(base_dir))
    resolved: dict[str, Path] = {}
    for t, place in tensors(proto, held):
        if not is_external(t):
            _check_size(t, place, what)
            continue
        where = f"{what}: {describe(place)}"
        entries = _entries(t)
        location = entries.get("location", "")
        if location == PLACEHOLDER_LOCATION:
            raise ModelError(f"{where} is a placeholder for a weight onnxcam keeps in memory (a model such as "
                             "Explainer.proto): pass the Explainer itself, or Explainer.explainable_model")
        if base is None:
            raise ModelError(f"{where} is stored as external data in {location!r}; give base_dir, the folder that "
                             "holds that file")
        if location not in resolved:
            resolved[location] = _resolve(base, location, where)
        _read_into(t, resolved[location], entries, where)
    return list(resolved.values())


def _entries(t: TensorProto) -> dict[str, str]:
    return {e.key: e.value for e in t.external_data}


def _resolve(base: Path, location: str, where: str) -> Path:
    """The file `location` names inside `base`: relative, no '..', no symlink on the way, a regular file."""
    if not location:
        raise ModelError(f"{where} is stored as external data without a location")
    if os.path.isabs(location) or location.startswith(("/", "\\")) or PureWindowsPath(location).drive:
        raise ModelError(f"{where} is stored as external data at the absolute path {location!r}; locations must "
                         f"be relative to the model's folder {base}")
    parts = [p for p in location.replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts:
        raise ModelError(f"{where} is stored as external data at {location!r}, which names no file")
    if ".." in parts:
        raise ModelError(f"{where} is stored as external data at {location!r}, which leaves the model's folder "
                         f"{base}")
    path = base
    for part in parts:
        path = path / part
        try:
            mode = os.lstat(path).st_mode
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the location
            raise ModelError(f"{where}: external data file {location!r} not found in the model's folder {base} "
                             f"({getattr(exc, 'strerror', None) or exc})") from exc
        if stat.S_ISLNK(mode):
            raise ModelError(f"{where}: external data location {location!r} passes through the symlink {path}; "
                             f"external data must lie in the model's folder {base} itself")
    if not stat.S_ISREG(mode):
        raise ModelError(f"{where}: external data location {location!r} is not a regular file")
    if os.path.commonpath([os.path.realpath(path), base]) != str(base):  # lstat above makes this a second guard
        raise ModelError(f"{where}: external data location {location!r} leaves the model's folder {base}")
    return path


def _read_into(t: TensorProto, path: Path, entries: dict, where: str) -> None:
    if t.data_type == TensorProto.STRING:
        raise ModelError(f"{where} is a string tensor stored as external data, which ONNX does not allow")
    offset, length = _non_negative(entries, "offset", where), _non_negative(entries, "length", where)
    offset = offset or 0
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    except OSError as exc:
        raise ModelError(f"{where}: cannot open external data file {path}: {exc.strerror}") from exc
    with os.fdopen(fd, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if length is None:
            length = max(size - offset, 0)
        if offset + length > size:
            raise ModelError(f"{where}: external data at offset {offset}, length {length} runs past the end of "
                             f"{path.name} ({size} bytes)")
        want = byte_size(t)
        if want is not None and length != want:
            raise ModelError(f"{where}: external data in {path.name} has {length} bytes, but shape "
                             f"{tuple(t.dims)} of {_type_name(t)} takes {want}")
        f.seek(offset)
        data = f.read(length)
    if len(data) != length:  # the file shrank while it was read
        raise ModelError(f"{where}: could read only {len(data)} of {length} bytes from {path.name}")
    t.raw_data = data
    t.data_location = TensorProto.DEFAULT
    del t.external_data[:]
    log.debug("read %d bytes for %s from %s", length, where, path)


def _non_negative(entries: dict, key: str, where: str) -> int | None:
    if key not in entries:
        return None
    try:
        value = int(entries[key])
    except ValueError:
        value = -1
    if value < 0:
        raise ModelError(f"{where}: external data {key} {entries[key]!r} is not a non-negative integer")
    return value


# ---- sizes ---------------------------------------------------------------------------------------------------------
def _type_name(t: TensorProto) -> str:
    try:
        return TensorProto.DataType.Name(t.data_type)
    except ValueError:
        return f"type {t.data_type}"


def _numel(t: TensorProto, where: str = "") -> int:
    n = 1
    for d in t.dims:
        if d < 0:
            raise ModelError(f"{where or t.name}: tensor has a negative dimension {tuple(t.dims)}")
        n *= d
    return n


def byte_size(t: TensorProto) -> int | None:
    """The bytes of the tensor's raw data (None for types without a fixed-size raw form: strings, unknown)."""
    if t.data_type in (TensorProto.UNDEFINED, TensorProto.STRING):
        return None
    try:
        bits = _PACKED_BITS.get(t.data_type) or helper.tensor_dtype_to_np_dtype(t.data_type).itemsize * 8
    except (KeyError, ValueError, TypeError):
        return None
    return (_numel(t) * bits + 7) // 8


def _typed_count(t: TensorProto, n: int) -> tuple[str, int] | None:
    """(the typed field that holds the values, how many entries n elements take), None if unknown."""
    try:
        field = helper.tensor_dtype_to_field(t.data_type)
    except (KeyError, ValueError, TypeError):
        return None
    bits = _PACKED_BITS.get(t.data_type)
    if bits in (2, 4):  # packed into bytes, one byte per int32_data entry
        return field, (n * bits + 7) // 8
    return field, 2 * n if t.data_type in _COMPLEX else n


# ---- the checks --------------------------------------------------------------------------------------------------
def _check_size(t: TensorProto, place: tuple, what: str) -> None:
    if t.HasField("segment"):
        return
    n = _numel(t, f"{what}: {describe(place)}")
    if t.HasField("raw_data"):
        want = byte_size(t)
        if want is not None and len(t.raw_data) != want:
            raise ModelError(f"{what}: {describe(place)} has {len(t.raw_data)} bytes of raw data, but shape "
                             f"{tuple(t.dims)} of {_type_name(t)} takes {want}")
        return
    typed = _typed_count(t, n)
    if typed is not None and len(getattr(t, typed[0])) != typed[1]:
        raise ModelError(f"{what}: {describe(place)} holds {len(getattr(t, typed[0]))} values in {typed[0]}, but "
                         f"shape {tuple(t.dims)} of {_type_name(t)} takes {typed[1]}")


def check_metadata(proto: onnx.ModelProto, what: str) -> None:
    """Metadata keys and values are UTF-8 text (protobuf hands invalid UTF-8 over as bytes, unchecked)."""
    owners = [proto]
    for scope in _scopes(proto):
        owners.append(scope)
        owners.extend(scope.node)
    for owner in owners:
        for prop in getattr(owner, "metadata_props", ()):
            if isinstance(prop.key, bytes) or isinstance(prop.value, bytes):
                key = prop.key.decode("utf-8", "replace") if isinstance(prop.key, bytes) else prop.key
                raise ModelError(f"{what}: metadata {key!r} of {_owner_label(owner)} is not UTF-8 text")


def _owner_label(owner) -> str:
    if isinstance(owner, onnx.ModelProto):
        return "the model"
    if isinstance(owner, onnx.GraphProto):
        return f"graph {owner.name!r}"
    if isinstance(owner, onnx.FunctionProto):
        return f"local function {owner.domain}::{owner.name}"
    return _node_label(owner)


def check_functions(proto: onnx.ModelProto, what: str) -> None:
    """Local functions call each other without a cycle (inlining a cycle never ends)."""
    def key(domain: str, name: str, overload: str = "") -> tuple:
        return domain, name, overload

    functions = {key(f.domain, f.name, getattr(f, "overload", "")): f for f in proto.functions}
    calls = {k: sorted({key(n.domain, n.op_type, getattr(n, "overload", "")) for n in _function_nodes(f)}
                       & functions.keys()) for k, f in functions.items()}
    done: set = set()
    for start in functions:
        path = _cycle(start, calls, [], done)
        if path:
            chain = " -> ".join(f"{d}::{n}" for d, n, _ in path)
            raise ModelError(f"{what}: local function {path[0][0]}::{path[0][1]} calls itself ({chain}); "
                             "recursive functions cannot be inlined")


def _function_nodes(function: onnx.FunctionProto):
    todo = [function]
    while todo:
        scope = todo.pop()
        for node in scope.node:
            yield node
            todo.extend(_subgraphs(node))


def _cycle(k, calls: dict, stack: list, done: set) -> list | None:
    """The call chain from the first repeated function back to itself, depth first; None without a cycle."""
    if k in stack:
        return stack[stack.index(k):] + [k]
    if k in done:
        return None
    stack.append(k)
    for callee in calls[k]:
        found = _cycle(callee, calls, stack, done)
        if found:
            return found
    stack.pop()
    done.add(k)
    return None
