"""The one node evaluator: run a single ONNX op on numpy values with onnxruntime on the CPU.

Everything that computes an op at build time goes through run_node: ModelGraph.value folding the constant side
inputs of a node (shapes, axes, pads), and the gradient rules that measure an op's exact runtime semantics
(pool output sizes with ceil_mode, Pad and Resize as matrices). It is the runtime that the explained model runs
on, so what is measured here is what that model computes (onnx's reference evaluator disagrees with it on some
forms, and would cost 12 MiB to import).
"""

from __future__ import annotations

import logging
import re

import numpy as np
import onnx
import onnx_graphsurgeon as gs

__all__ = ["node_attrs", "run_node", "runtime_failure"]

log = logging.getLogger(__name__)


def node_attrs(node: gs.Node) -> dict:
    """The attributes of a graph node as run_node takes them (tensor attributes as numpy arrays)."""
    return {k: (np.asarray(v.values) if isinstance(v, gs.Constant) else v) for k, v in node.attrs.items()}


def run_node(op: str, inputs: list, attrs: dict, opset: int, *, domain: str = "", outputs: int = 1) -> list:
    """Run one op on CPU and return its outputs as numpy arrays.

    inputs: numpy values, None for an omitted optional input. attrs: as onnx.helper.make_node takes them, numpy
    arrays for tensor attributes. outputs: how many outputs the node has. opset: of the ai.onnx domain; an op of
    another domain (com.microsoft) is imported at version 1.
    """
    from ..runtime import cpu_session  # local: graph analysis otherwise needs no runtime

    helper = onnx.helper
    names = [f"in{i}" if x is not None else "" for i, x in enumerate(inputs)]
    outs = [f"out{i}" for i in range(outputs)]
    attrs = {k: (onnx.numpy_helper.from_array(v) if isinstance(v, np.ndarray) else v) for k, v in attrs.items()}
    feeds = {nm: np.asarray(v) for nm, v in zip(names, inputs) if nm}
    graph = helper.make_graph(
        [helper.make_node(op, names, outs, domain=domain or None, **attrs)], "evaluate",
        [helper.make_tensor_value_info(nm, helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for nm, v in feeds.items()],
        [helper.make_empty_tensor_value_info(o) for o in outs])  # untyped: the runtime infers them
    opsets = [helper.make_opsetid("", opset)] + ([helper.make_opsetid(domain, 1)] if domain else [])
    model = helper.make_model(graph, opset_imports=opsets)
    model.ir_version = 8
    return cpu_session(model.SerializeToString(), lean=True).run(outs, feeds)


def runtime_failure(exc: Exception, renamed: dict | None = None) -> str:
    """onnxruntime's error as one line: the op, the node (`renamed` maps probe names back) and the reason, without
    onnxruntime's source path and failed condition."""
    text = " ".join(str(exc).split())
    found = re.search(r"running (\S+) node\. Name:'([^']*)' Status Message: (.*)", text)
    if found is None:
        return text
    op, name, why = found.groups()
    return f"{op} node {(renamed or {}).get(name, name)!r}: {why.split(' was false. ', 1)[-1]}"
