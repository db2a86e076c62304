"""The kinks of a torch model's forward (ReLU-like pointwise ops and max pools), recorded in call order, and a
forward that takes at each kink the branch that another float32 forward (onnxruntime's) took.

Why: a float64 reference and a float32 runtime disagree wherever an input of a kink lies within float32's
rounding of it. Deep random nets have hundreds of such places (inception_v3 at 160 px: 60-70 max-pool windows whose
top two values differ by less than float32's measured error, and whose gradient is not zero), and moving one
window's argmax moves a middle stage's gradient by 1e-4..6e-3: no random input is clear of all of them. A gradient
test against such a reference holds by the luck of the runtime's rounding. Following the runtime's decisions
instead makes the reference the exact gradient of the piece the runtime is on, whatever the CPU or build.
"""

from __future__ import annotations

import collections
import inspect

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from onnxcam.runtime import cpu_session

# pointwise piecewise ops: where the derivative jumps, each point with the piece it belongs to itself (True: the
# lower one), as torch's backward has it (relu'(0) = 0; hardtanh, hardswish and hardsigmoid take the outer pieces
# at both ends); then one function per piece, lowest first
_PIECEWISE = {
    F.relu: (lambda a: ((0.0, True),), lambda a: (lambda z: z * 0, lambda z: z)),
    F.hardtanh: (lambda a: ((a["min_val"], True), (a["max_val"], False)),
                 lambda a: (lambda z: z * 0 + a["min_val"], lambda z: z, lambda z: z * 0 + a["max_val"])),
    F.hardswish: (lambda a: ((-3.0, True), (3.0, False)),
                  lambda a: (lambda z: z * 0, lambda z: z * (z + 3) / 6, lambda z: z)),
    F.hardsigmoid: (lambda a: ((-3.0, True), (3.0, False)),
                    lambda a: (lambda z: z * 0, lambda z: z / 6 + 0.5, lambda z: z * 0 + 1)),
}
_POOL = inspect.signature(F.max_pool2d_with_indices)
# aten ops with a kink: a model calling one that the function-level table above does not catch fails loudly
_ATEN_KINKS = {"relu", "relu6", "hardtanh", "hardswish", "hardsigmoid", "max_pool2d", "max_pool2d_with_indices",
               "threshold", "clamp", "clamp_min", "clamp_max", "leaky_relu", "rrelu", "elu", "celu", "selu", "prelu",
               "maximum", "minimum", "max", "min", "amax", "amin", "abs", "sort", "topk", "round", "floor", "sign"}


def _bound(func, args, kwargs) -> inspect.BoundArguments:
    bound = (_POOL if func is F.max_pool2d else inspect.signature(func)).bind(*args, **kwargs)
    bound.apply_defaults()
    if "inplace" in bound.arguments:
        bound.arguments["inplace"] = False  # keep the input: it is recorded, and autograd needs it
    return bound


class KinkMode(TorchFunctionMode):
    """Inside it, a forward records each kink op's input (`inputs`, in call order). Given `follow` (the values
    another forward saw at those inputs, same order), each op instead takes the branch those values take: the
    pointwise piece their value falls in, the max-pool argmax of their windows (first maximum on ties, as
    torch and onnxruntime's MaxPool Indices do). The value computed is this forward's own, only the branch is
    borrowed, so autograd gives the gradient of that piece."""

    def __init__(self, follow: list[np.ndarray] | None = None):
        super().__init__()
        self.inputs: list[torch.Tensor] = []
        self.follow = follow

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func not in _PIECEWISE and func is not F.max_pool2d:
            return func(*args, **kwargs)
        bound = _bound(func, args, kwargs)
        z = bound.arguments["input"]
        if self.follow is None:
            self.inputs.append(z.detach().clone())  # a later in-place op must not change the record
            return func(*bound.args, **bound.kwargs)
        self.inputs.append(z.detach())
        seen = torch.as_tensor(self.follow[len(self.inputs) - 1]).to(z.dtype)
        if seen.shape != z.shape:
            raise AssertionError(f"kink {len(self.inputs) - 1} ({func.__name__}): followed values have shape "
                                 f"{tuple(seen.shape)}, the input is {tuple(z.shape)}")
        if func is F.max_pool2d:
            _, idx = F.max_pool2d_with_indices(seen, **{k: v for k, v in bound.arguments.items() if k != "input"})
            return z.flatten(2).gather(2, idx.flatten(2)).view(idx.shape)
        points, pieces = (make(bound.arguments) for make in _PIECEWISE[func])
        piece = sum((seen > p) if lower else (seen >= p) for p, lower in points)
        out = pieces[0](z)
        for i, f in enumerate(pieces[1:], 1):
            out = torch.where(piece == i, f(z), out)
        return out


class _AtenKinks(TorchDispatchMode):
    """Counts the aten ops with a kink that a forward runs (to check that KinkMode saw every one)."""

    def __init__(self):
        super().__init__()
        self.seen = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.name().split("::")[-1].split(".")[0]
        if name.rstrip("_") in _ATEN_KINKS:
            self.seen[name] += 1
        return func(*args, **(kwargs or {}))


def kink_inputs(model: torch.nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """Each kink op's input in a forward of `model` at `x` (its dtype), in call order. Fails if the model runs
    an op with a kink that KinkMode does not handle (its gradient would then follow no one's decision)."""
    mode, aten = KinkMode(), _AtenKinks()
    with torch.no_grad(), mode, aten:
        model(x)
    if sum(aten.seen.values()) != len(mode.inputs):
        raise AssertionError(f"the model runs aten ops with kinks {dict(aten.seen)} but KinkMode caught "
                             f"{len(mode.inputs)} calls: add the function that runs them to _PIECEWISE")
    return mode.inputs


def onnx_kink_inputs(onnx_model, x: torch.Tensor, want: list[torch.Tensor]) -> tuple[list[np.ndarray], np.ndarray]:
    """The float32 values onnxruntime's forward of the exported model holds at each kink input of the torch
    forward (call order), and its logits. want: the kink inputs of a float64 torch forward (kink_inputs); each is
    matched to the ONNX tensor of its shape nearest to it (a Relu's input, a MaxPool's input ...). Equal tensors
    (Identity copies) give equal branches, so which of them is taken does not matter."""
    proto = onnx.load(onnx_model) if isinstance(onnx_model, str) else onnx.load_from_string(onnx_model)
    have = {o.name for o in proto.graph.output}
    names = [o for n in proto.graph.node for o in n.output if o and o not in have]
    for name in names:
        proto.graph.output.add().name = name
    sess = cpu_session(proto.SerializeToString())  # the options onnxcam's own session uses
    outs = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    by_shape = collections.defaultdict(list)
    for out in outs:
        if isinstance(out, np.ndarray) and out.dtype == np.float32:
            by_shape[out.shape].append(out)
    seen = []
    for i, z in enumerate(want):
        z = z.numpy()
        errs = [np.linalg.norm(c - z) / (np.linalg.norm(z) + 1e-30) for c in by_shape[z.shape]]
        if not errs or min(errs) > 1e-4:
            raise AssertionError(f"kink {i}: no ONNX tensor of shape {z.shape} holds its input "
                                 f"(nearest {min(errs, default=np.inf):.1e})")
        seen.append(by_shape[z.shape][int(np.argmin(errs))])
    return seen, outs[0]
