"""onnxruntime's fused kernels, as models saved after its graph optimizations carry them (optimized_model_filepath
at ORT_ENABLE_EXTENDED): com.microsoft FusedConv = activation(Conv(X, W, B) + Z) and FusedGemm =
activation(Gemm(A, B, C)). Each is differentiated as its two halves: the activation's derivative, read from the
fused output y (it has no pre-activation tensor), then the Conv or Gemm rule on a stand-in node.

The derivatives are activations.py's (FROM_OUTPUT, clip_grad), which read y for the plain ops too: one derivation
per activation. From y alone each is exact for the activations onnxruntime fuses (Relu, LeakyRelu with alpha > 0,
Sigmoid, Tanh, HardSigmoid, Clip; Elu, Selu, Softplus, Softsign into Gemm).

Models saved at ORT_ENABLE_ALL also carry com.microsoft.nchwc kernels, whose blocked channel layout depends on the
CPU that optimized the model; those are refused with that explanation.
"""

from __future__ import annotations

from . import find_rule, rule
from .activations import FROM_OUTPUT, clip_grad
from .qlinear import _Stand

MS = "com.microsoft"


def _text(value) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def _activation_gradient(b, n, g, params: dict):
    """gy * act'(x), written with the fused node's output y = act(x): activations.py's derivations."""
    act = _text(n.attrs.get("activation", ""))
    y = n.outputs[0]
    if act in ("", "Identity"):
        return g
    if act == "LeakyRelu" and float(params.get("alpha", 0.01)) <= 0:
        raise b.error(f"has LeakyRelu alpha {params['alpha']}: with alpha <= 0 the sign of x cannot be read from y")
    if act == "Clip":
        if "min" not in params or "max" not in params:
            raise b.error("has a Clip activation without its min and max activation_params")
        return clip_grad(b, g, y, float(params["min"]), float(params["max"]))
    if act in FROM_OUTPUT:
        return FROM_OUTPUT[act](b, g, y, params)
    raise b.error(f"has activation {act!r}; onnxcam differentiates fused Relu, LeakyRelu, Sigmoid, Tanh, "
                  "HardSigmoid, Clip, Elu, Selu, Softplus and Softsign (explain the model saved before "
                  "onnxruntime's optimizations instead)")


def _conv_params(n) -> dict:
    """FusedConv keeps its activation's parameters as a list: Clip [min, max], LeakyRelu [alpha],
    HardSigmoid [alpha, beta]."""
    values = [float(v) for v in n.attrs.get("activation_params", [])]
    names = {"Clip": ("min", "max"), "LeakyRelu": ("alpha",), "HardSigmoid": ("alpha", "beta")}
    return dict(zip(names.get(_text(n.attrs.get("activation", "")), ()), values))


def _gemm_params(n) -> dict:
    """FusedGemm keeps them as attributes named activation_<name> (activation_alpha, activation_beta)."""
    return {k[len("activation_"):]: v for k, v in n.attrs.items() if k.startswith("activation_")}


def _fused(b, n, gy, float_op: str, n_float_inputs: int, params: dict):
    """The float op's own rule on a stand-in node, fed the gradient behind the activation."""
    g = _activation_gradient(b, n, gy[0], params)
    attrs = {k: v for k, v in n.attrs.items() if k != "activation" and not k.startswith("activation_")}
    inputs = list(n.inputs[:n_float_inputs])
    while inputs and not inputs[-1].name:
        inputs.pop()
    inner = find_rule(float_op, b.opset)
    makers = list(inner.fn(b, _Stand(float_op, n.name, inputs, [n.outputs[0]], attrs), [g]))
    return makers, g


@rule("FusedConv", domain=MS)
def _fused_conv(b, n, gy):
    """y = act(Conv(X, W, B) + Z): X through the Conv rule; the sum input Z (same shape as y) takes the
    gradient behind the activation as it is."""
    makers, g = _fused(b, n, gy, "Conv", 3, _conv_params(n))
    makers += [None] * (3 - len(makers))
    return makers[:3] + [lambda: g]


@rule("FusedGemm", domain=MS)
def _fused_gemm(b, n, gy):
    makers, _ = _fused(b, n, gy, "Gemm", 3, _gemm_params(n))
    return makers


NCHWC = "com.microsoft.nchwc"


@rule("Conv", "MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool", "ReorderInput", "ReorderOutput",
      "Upsample", domain=NCHWC)
def _nchwc(b, n, gy):
    raise b.error(
        "is one of onnxruntime's NCHWc kernels (com.microsoft.nchwc), which a model saved with "
        "ORT_ENABLE_ALL carries: their blocked channel layout depends on the CPU that optimized the model. "
        "Save the optimized model with GraphOptimizationLevel.ORT_ENABLE_EXTENDED (whose FusedConv/FusedGemm "
        "onnxcam differentiates), or explain the model as exported")
