"""Gradient rules, one small function per ONNX op, grouped by family in the modules of this package.

The contract, written once:
- A rule is called as `rule(b, n, gy)` for a forward node `n` (an onnx-graphsurgeon Node) while the reverse walk
  visits it. `b` is the Builder (autodiff/builder.py) that emits gradient nodes; `gy` is the list of incoming
  gradients, one per node output, each a tensor shaped like that output or None when no gradient reaches it.
- It returns one entry per node input: None where the input has no gradient (weights, shapes, indices), or a
  zero-argument function that emits and returns the gradient. The walk calls it only for inputs on the path,
  so rules never compute a gradient nobody needs.
- A gradient is shaped like its input or like a broadcast of it, and the walk (engine.py) alone sums it back:
  rules registered with broadcast=True return gradients shaped like output 0; any other rule declares a
  broadcast-shaped gradient with b.broadcast_shaped(g, shape) (Gemm's C, MatMul's batched operands,
  LayerNormalization's scale and bias). No rule reduces broadcasting itself.
- Gradients are always in the builder's dtype (float32), also in fp16/bf16 models: b.op widens forward tensors
  of narrower float types as they enter the gradient graph, so rules never cast gradients to forward types.
- A rule that meets a form it cannot differentiate raises `b.error(...)`; the walk never invents zeros.
- A rule never changes nodes it did not just emit: its incoming gradient may be another branch's too (Add, Sum,
  Identity and Expand hand one tensor to several rules). Folds that need every reader known are passes
  (autodiff/passes.py), run once the gradient graph is complete; so are folds of several forward nodes into one
  formula (x * Sigmoid(x)) and a MaxPool's gradient read from its Indices output, which the walk applies in place
  of the rules.
- Rules write formulas only, and never alter the forward graph; every optimization is a named pass with its
  precondition checked (passes.py: fold_silu, pool_indices, take_class_rows, fold_crops). The one pass that
  touches a forward node, pool_indices, asks a MaxPool for its Indices output: same values, one more output.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Rule:
    op: str
    fn: Callable
    broadcast: bool
    min_opset: int
    max_opset: int


RULES: dict[str, list[Rule]] = {}


def rule(*ops: str, broadcast: bool = False, opsets: tuple[int, int] = (1, 10_000), domain: str = ""):
    """Register `fn` as the gradient rule of each op in `ops`, for the ai.onnx opsets in `opsets` (inclusive).

    Ops of another domain (com.microsoft's QLinear*/Fused* kernels) are registered as "domain:Op" and match
    whatever that domain's version.
    """
    def register(fn):
        for op in ops:
            RULES.setdefault(rule_key(op, domain), []).append(Rule(op, fn, broadcast, *opsets))
        return fn
    return register


def rule_key(op: str, domain: str = "") -> str:
    return op if domain in ("", "ai.onnx") else f"{domain}:{op}"


def find_rule(op: str, opset: int, domain: str = "") -> Rule | None:
    default = domain in ("", "ai.onnx")
    for r in RULES.get(rule_key(op, domain), []):
        if not default or r.min_opset <= opset <= r.max_opset:
            return r
    return None


def load_all() -> None:
    """Import every rule module (registration happens at import)."""
    from . import (  # noqa: F401
        activations,
        conv_pool,
        elementwise,
        fused,
        integer,
        linalg,
        normalize,
        qlinear,
        quantize,
        recurrent,
        reduce,
        roi,
        select,
        shape,
    )
