"""The model's input: which graph input it is, the shape it declares, and the shape an explanation builds for.

One home for these facts: the model input is the first graph input that is not an initializer (old exporters list
every weight among the graph inputs), and everything else (extra inputs) is fed as the model declares it.
"""

from __future__ import annotations

import numpy as np
import onnx

from ..errors import InputError, ModelError

__all__ = ["MAX_SAMPLE_ELEMENTS", "declared_shape", "fmt_shape", "input_name", "model_input", "model_inputs",
           "resolve_input_shape"]

BATCH = "N"  # the symbolic batch dimension


def model_inputs(proto: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The graph inputs that are fed at run time: every graph input that is not also an initializer."""
    held = {t.name for t in proto.graph.initializer}
    return [i for i in proto.graph.input if i.name not in held]


def model_input(proto: onnx.ModelProto, error: type = ModelError) -> onnx.ValueInfoProto:
    """The model input (the first fed graph input); `error` (ModelError by default) when it has none."""
    inputs = model_inputs(proto)
    if not inputs:
        raise error("the model has no inputs")
    return inputs[0]


def input_name(proto: onnx.ModelProto, error: type = ModelError) -> str:
    """The model input's name (see model_input)."""
    return model_input(proto, error).name


def declared_shape(value_info: onnx.ValueInfoProto) -> tuple | None:
    tt = value_info.type.tensor_type
    if not tt.HasField("shape"):
        return None
    return tuple(d.dim_value if d.HasField("dim_value") else None for d in tt.shape.dim)


def resolve_input_shape(declared, given, name) -> tuple | None:
    """Non-batch dims: those the model declares, else those given (None where still free: shapes are then
    inferred symbolically and nothing is measured); the batch stays symbolic. None when the input declares no
    shape and none is given: its rank and size are those of the first input that arrives."""
    if given is not None:
        given = _checked_given(given, name)
    if declared is None:
        return None if given is None else (BATCH,) + given[1:]
    _check_size(declared, f"input {name!r} declares shape {fmt_shape(declared)}", ModelError)
    shape = [BATCH if (declared[0] is None and i == 0) else d for i, d in enumerate(declared)]
    if given is not None:
        if len(given) != len(declared):
            raise InputError(f"input {name!r} has rank {len(declared)} (shape {fmt_shape(declared)}), got {fmt_shape(given)}")
        for i, (d, g) in enumerate(zip(declared, given)):
            if i > 0 and d is not None and d != g:
                raise InputError(f"input {name!r} expects shape {fmt_shape(declared)}, got {fmt_shape(given)}")
            if i > 0 and d is None:
                shape[i] = g
    return tuple(shape)


# Elements per sample beyond which no input is built for: 16 GiB of float32, and far from int64 overflow in the
# element counts the gradient rules compute (a 2^40 x 2^40 input overflowed them to 0).
MAX_SAMPLE_ELEMENTS = 1 << 32


def _checked_given(given, name) -> tuple:
    """A given input shape as positive ints (the batch dim may be anything: it stays symbolic)."""
    try:
        dims = tuple(int(d) if i > 0 else d for i, d in enumerate(given))
        ok = all(d == g and d > 0 for d, g in zip(dims[1:], tuple(given)[1:]))
    except (TypeError, ValueError):
        ok = False
    if not ok or not dims:
        raise InputError(f"the input shape for {name!r} must be positive ints (batch first), got {given!r}")
    _check_size(dims, f"input shape {fmt_shape(dims)} for {name!r}", InputError)
    return dims


def _check_size(dims, what: str, error: type) -> None:
    known = [d for d in dims[1:] if isinstance(d, int)]
    if any(d < 0 for d in known):
        raise error(f"{what} has a negative dim")
    elements = float(np.prod([float(d) for d in known]))  # floats: an int64 product can overflow to 0
    if elements > MAX_SAMPLE_ELEMENTS:
        raise error(f"{what}: {elements:.3g} values per sample, more than onnxcam builds for ({MAX_SAMPLE_ELEMENTS})")


def fmt_shape(shape) -> str:
    """A shape as (1, 3, ?, ?): None dims as ?."""
    return "(" + ", ".join("?" if d is None else str(d) for d in shape) + ")"
