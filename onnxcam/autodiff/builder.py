"""Emit gradient nodes into a graph: what a gradient rule writes instead of protobuf.

A rule says `b.op("Mul", gy, x)`; the builder names the node and its output, turns Python numbers and numpy
arrays into constants of the gradient's dtype, and hides the opset differences of the ops it emits (axes as
attribute or input, Clip/Pad/Slice/Split forms), so one rule serves every opset from 9 to the newest.
"""

from __future__ import annotations

import itertools

import numpy as np
import onnx_graphsurgeon as gs

from ..errors import UnsupportedOpError
from ..graph.model import BATCH, ModelGraph

# Ops whose result does not depend on the float type of their inputs: no need to widen fp16 inputs for them.
_DTYPE_AGNOSTIC = {"Shape", "Size", "Cast", "QuantizeLinear", "DequantizeLinear"}


def _np_dtype(dtype):
    try:
        return np.dtype(dtype)
    except TypeError:
        import onnx
        try:
            return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(dtype))
        except (KeyError, TypeError, ValueError):  # types numpy cannot hold (float8, ...): never widened
            return None


def _onnx_dtype(dtype) -> int:
    from onnx import helper
    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


PASSES = ("fold_silu", "pool_indices", "take_class_rows", "fold_crops", "split_conv_channels", "crop_seed_windows",
          "skip_zero_slabs", "blocked_complements", "blocked_hard_swish", "region_rows", "roi_rows",
          "seed_channels")


class Builder:
    """What a gradient rule writes with: `b.op("Mul", gy, mask)` appends one node to the gradient graph and returns
    its output tensor, named after the forward node being differentiated.

    model: the forward graph (ModelGraph) the gradient nodes are added to; dtype: the float type of the gradients;
    guided: guided backpropagation (Relu-like rules also zero negative incoming gradients). Python numbers and numpy
    arrays given to op() become constants of the gradient's dtype; shape(), static_dims() and value() read the
    forward graph's static facts; the helpers (reduce, slice, pad, unsqueeze, ...) emit the form the model's opset
    takes. A rule never touches protobuf or invents names.
    """

    def __init__(self, model: ModelGraph, dtype=np.float32, *, guided: bool = False, apart: bool = False):
        self.model = model
        self.graph = model.graph
        self.opset = model.opset
        self.dtype = np.dtype(dtype)
        self.guided = guided  # guided backpropagation: Relu-like rules also zero negative incoming gradients
        self.apart = apart  # each target's gradient along paths crossing no other target (engine.backward)
        self.node: gs.Node | None = None  # the forward node whose rule is running (for names and errors)
        self.rule: str = "rewrite.build"  # what is emitting nodes now: a rule's name, or the engine's step
        # gradient node name -> (forward node name, its op, rule): who to blame for a node onnxruntime rejects
        self.origins: dict[str, tuple[str, str, str]] = {}
        self._ids = itertools.count()
        self._consts: dict = {}
        self._emitted: set[str] = set()  # names of tensors this builder made (everything else is forward graph)
        self._widened: dict[str, gs.Variable] = {}
        self._one_hots: dict[str, gs.Tensor] = {}  # name of a one-hot seed -> its (N,) class indices
        # name of a per-region seed -> how rewrite._region_seeds laid out its rows (passes_regions.region_rows)
        self.region_seeds: dict[str, tuple] = {}
        # node finding a crop window box -> its skip_zero_slabs group's names (passes.crop_seed_windows)
        self.window_homes: dict[str, frozenset] = {}
        self.targets: set[str] = set()  # names of the tensors whose gradients are wanted (set by the walk)
        self.grad_shapes: dict[str, tuple] = {}  # gradient name -> the broadcast shape a rule declared for it
        # id(gradient tensor) -> (it, the forward tensor it is a gradient of, hence shaped like): set by the walk
        self.gradient_of: dict[int, tuple[gs.Tensor, gs.Tensor]] = {}
        self.passes: set[str] = set(PASSES)  # the optimizations of autodiff/passes.py that run; tests drop some

    # ---- emitting ------------------------------------------------------------------------------------------
    def op(self, op_type: str, *inputs, outputs: int = 1, widen: bool = True, **attrs):
        """Add one node; inputs may be tensors, numpy arrays or numbers (-> constants of the gradient dtype).

        widen=False keeps narrower float inputs as they are (for selections: widen only what was selected).
        """
        inputs = list(inputs)
        while inputs and inputs[-1] is None:  # omitted trailing optional inputs are left out, not named ""
            inputs.pop()
        ins = [self._as_tensor(i) for i in inputs]
        if widen and op_type not in _DTYPE_AGNOSTIC:
            ins = [self._widen(t) for t in ins]
        base = f"onnxcam_grad/{self.node.name if self.node is not None else 'seed'}/{op_type}_{next(self._ids)}"
        outs = [gs.Variable(f"{base}:{k}") for k in range(outputs)]
        self._emitted.update(o.name for o in outs)
        attrs = {k: v for k, v in attrs.items() if v is not None}
        self._append(gs.Node(op_type, name=base, attrs=attrs, inputs=ins, outputs=outs))
        return outs[0] if outputs == 1 else outs

    def _append(self, node: gs.Node) -> None:
        """Add an emitted node to the graph, remembering which forward node and rule it serves."""
        n = self.node
        self.origins[node.name] = (n.name, n.op, self.rule) if n is not None else ("(score seed)", "seed", self.rule)
        self.graph.nodes.append(node)

    def one_hot(self, classes, depth: int):
        """The (N, depth) one-hot rows of (N,) class indices, in the gradient dtype; remembered as one-hot so that
        a pass can select with the indices instead of multiplying by the rows (passes.take_class_rows)."""
        rows = self.mask(self.op("Equal", self.unsqueeze(classes, [1]), self.ints(np.arange(depth))))
        self._one_hots[rows.name] = classes
        return rows

    def one_hot_classes(self, t):
        """The (N,) class indices when `t` is a one-hot seed made by one_hot, else None."""
        return self._one_hots.get(t.name) if isinstance(t, gs.Tensor) else None

    def take(self, t, indices, axis: int):
        """Gather from a forward tensor in its own dtype, then widen only what was taken."""
        taken = self.op("Gather", t, indices, axis=axis, widen=False)
        dtype = _np_dtype(t.dtype) if isinstance(t, gs.Tensor) and t.dtype is not None else self.dtype
        return taken if dtype is None or dtype == self.dtype else self.cast(taken, self.dtype)

    def private_to(self, t: gs.Tensor, node: gs.Node) -> bool:
        """True when forward tensor t feeds only `node` and is neither a target nor a graph output: a pass may fold
        its gradient path into another's."""
        return t.name not in self.targets and not any(o is t for o in self.graph.outputs) and \
            len(t.outputs) == 1 and t.outputs[0] is node

    def made(self, t) -> bool:
        """True for tensors this builder emitted (gradient graph), False for the forward graph's."""
        return isinstance(t, gs.Tensor) and t.name in self._emitted

    def _widen(self, t):
        """Forward tensors of a narrower float type (fp16/bf16 models) enter the gradient graph as float32, once.

        The backward runs in float32: fp16 gradients of small scores underflow and lose the map.
        """
        if not isinstance(t, gs.Tensor) or t.name in self._emitted or t.dtype is None:
            return t
        dtype = _np_dtype(t.dtype)
        if dtype is None or dtype.kind != "f" or dtype == self.dtype or dtype.itemsize >= self.dtype.itemsize:
            return t
        if t.name not in self._widened:
            out = gs.Variable(f"onnxcam_grad/widen/{t.name}", dtype=self.dtype)
            self._append(gs.Node("Cast", name=f"onnxcam_grad/widen/{t.name}", inputs=[t], outputs=[out],
                                 attrs={"to": _onnx_dtype(self.dtype)}))
            self._emitted.add(out.name)
            self._widened[t.name] = out
        return self._widened[t.name]

    def unwidened(self, t):
        """The forward tensor that a widened one (_widen) stands for; `t` itself when it is no widened tensor."""
        widened = {v.name: k for k, v in self._widened.items()}
        return t.inputs[0].inputs[0] if isinstance(t, gs.Tensor) and t.name in widened else t

    def const(self, value, dtype=None) -> gs.Constant:
        arr = np.asarray(value, dtype=dtype or (self.dtype if np.asarray(value).dtype.kind == "f" or
                                               isinstance(value, float) else None))
        key = (arr.dtype.str, arr.shape, arr.tobytes())
        if key not in self._consts:
            self._consts[key] = gs.Constant(f"onnxcam_const_{len(self._consts)}", arr.copy(order="C"))  # keeps 0-d
        return self._consts[key]

    def ints(self, values) -> gs.Constant:
        return self.const(np.asarray(values, dtype=np.int64))

    def _as_tensor(self, x):
        if x is None:
            return gs.Variable.empty()
        if isinstance(x, gs.Tensor):
            return x
        if isinstance(x, (bool, np.bool_)):
            return self.const(np.asarray(x, dtype=np.bool_))
        if isinstance(x, (int, float)):
            return self.const(np.asarray(x, dtype=self.dtype))
        return self.const(np.asarray(x))

    # ---- static facts --------------------------------------------------------------------------------------
    def shape(self, t: gs.Tensor) -> tuple:
        shape = self.model.shape(t)
        if shape is None:
            raise self.error(f"needs the rank of tensor {t.name!r}, which is unknown")
        return shape

    def static_dims(self, t: gs.Tensor, axes=None) -> tuple:
        """Dims of `t` that the rule needs as numbers (the batch dim may stay symbolic if not asked for)."""
        shape = self.shape(t)
        axes = range(len(shape)) if axes is None else [a % len(shape) for a in axes]
        dims = tuple(shape[a] for a in axes)
        if not all(isinstance(d, int) for d in dims):
            raise self.error(f"needs static sizes of tensor {t.name!r} (shape {shape}) on axes {list(axes)}")
        return dims

    def value(self, t: gs.Tensor, what: str) -> np.ndarray:
        """The constant value of a side input (axes, pads, shapes...); an error if it depends on the data."""
        if t is None or not t.name:
            raise self.error(f"needs its {what} input")
        v = self.model.value(t)
        if v is None:
            raise self.error(f"needs its {what} input {t.name!r} to be constant, but it is computed at run time")
        return v

    def error(self, msg: str) -> UnsupportedOpError:
        n = self.node
        where = f"{n.op} node {n.name!r} (opset {self.opset})" if n is not None else "gradient builder"
        return UnsupportedOpError(f"{where} {msg}")

    # ---- common subgraphs ----------------------------------------------------------------------------------
    def shape_of(self, t):
        return self.op("Shape", t)

    def zeros_like(self, t):
        """Zeros with the run-time shape of `t`, in the gradient dtype."""
        return self.op("ConstantOfShape", self.shape_of(t), value=gs.Constant("zero", np.zeros(1, self.dtype)))

    def cast(self, x, dtype):
        return self.op("Cast", x, to=_onnx_dtype(dtype))

    def mask(self, cond):
        """A boolean tensor as 0/1 in the gradient dtype."""
        return self.cast(cond, self.dtype)

    def reshape_like(self, g, t):
        return self.op("Reshape", g, self.shape_of(t))

    def reduce(self, op_type: str, x, axes, keepdims: bool = True):
        """ReduceSum/Mean/Max with `axes` as attribute (old opsets) or input (ReduceSum 13+, the rest 18+)."""
        axes = [int(a) for a in axes]
        as_input = self.opset >= (13 if op_type == "ReduceSum" else 18)
        if as_input:
            return self.op(op_type, x, self.ints(axes), keepdims=int(keepdims))
        return self.op(op_type, x, axes=axes, keepdims=int(keepdims))

    def unsqueeze(self, x, axes):
        if self.opset >= 13:
            return self.op("Unsqueeze", x, self.ints(axes))
        return self.op("Unsqueeze", x, axes=[int(a) for a in axes])

    def squeeze(self, x, axes):
        if self.opset >= 13:
            return self.op("Squeeze", x, self.ints(axes))
        return self.op("Squeeze", x, axes=[int(a) for a in axes])

    def slice(self, x, starts, ends, axes, steps=None):
        if self.opset >= 10:
            return self.op("Slice", x, self.ints(starts), self.ints(ends), self.ints(axes),
                           None if steps is None else self.ints(steps))
        if steps is not None and any(s != 1 for s in steps):
            raise self.error("needs Slice with steps, which opset 9 lacks")
        return self.op("Slice", x, starts=list(starts), ends=list(ends), axes=list(axes))

    def pad(self, x, pads, value: float = 0.0):
        """Constant padding; `pads` as ONNX orders it (all begins, then all ends)."""
        if self.opset >= 11:
            return self.op("Pad", x, self.ints(pads), self.const(np.asarray(value, self.dtype)))
        return self.op("Pad", x, pads=[int(p) for p in pads], value=float(value))

    def clip(self, x, lo, hi):
        if self.opset >= 11:
            return self.op("Clip", x, self.const(np.asarray(lo, self.dtype)), self.const(np.asarray(hi, self.dtype)))
        return self.op("Clip", x, min=float(lo), max=float(hi))

    def transpose_axis_last(self, x, axis: int, rank: int):
        """(perm, inverse perm) moving `axis` to the end; None when it already is."""
        if axis == rank - 1:
            return None, None
        perm = [a for a in range(rank) if a != axis] + [axis]
        return perm, list(np.argsort(perm))

    def axis_matmul(self, g, axis: int, rank: int, matrix: np.ndarray):
        """Apply a linear map along one axis: out[..., j, ...] = sum_i g[..., i, ...] * matrix[i, j].

        Selections (Slice), paddings of every mode (Pad) and interpolations (Resize) act on each axis through
        such a matrix; their gradient is the same product with the transposed matrix.
        """
        perm, inv = self.transpose_axis_last(g, axis, rank)
        if perm is not None:
            g = self.op("Transpose", g, perm=perm)
        g = self.op("MatMul", g, self.const(matrix.astype(self.dtype)))
        if perm is not None:
            g = self.op("Transpose", g, perm=[int(p) for p in inv])
        return g

    def broadcast_shaped(self, g, shape):
        """Declare that gradient `g` is shaped `shape`, a broadcast of its input's shape: the walk sums it back."""
        self.grad_shapes[g.name] = tuple(shape)
        return g

    def unbroadcast(self, g, from_shape: tuple, to_shape: tuple):
        """Sum a gradient shaped like a broadcast result back to one operand's shape."""
        if tuple(from_shape) == tuple(to_shape):
            return g
        lead = len(from_shape) - len(to_shape)
        axes = list(range(lead))
        for i, d in enumerate(to_shape):
            f = from_shape[lead + i]
            if d == 1 and f != 1:
                axes.append(lead + i)
            elif d != f and not (d is None or f is None or d == BATCH or f == BATCH):
                raise self.error(f"cannot unbroadcast a gradient of shape {from_shape} to {to_shape}")
        if axes:
            g = self.reduce("ReduceSum", g, axes, keepdims=True)
        if lead:
            g = self.squeeze(g, list(range(lead)))
        return g
