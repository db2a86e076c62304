"""The reverse walk: seed the score, visit the nodes between the targets and the score in reverse order, call
each node's rule, accumulate fan-out and unbroadcast in one place, and hand back the targets' gradients.
"""

from __future__ import annotations

import logging

import onnx_graphsurgeon as gs

from ..errors import UnsupportedOpError
from .builder import Builder
from .passes import fold_silu, pool_indices, pool_indices_gradient, silu_gradient
from .passes_channels import RULE as CHANNELS_RULE
from .passes_channels import seed_channels, seed_channels_gradient
from .passes_regions import ROI_RULE, region_rows, roi_rows, roi_rows_gradient
from .rules import find_rule, load_all

log = logging.getLogger(__name__)


def check_supported(b: Builder, nodes: list[gs.Node]) -> None:
    """Fail before building anything if some op on the path has no rule, naming every one of them."""
    missing = [n for n in nodes if find_rule(n.op, b.opset, n.domain or "") is None]
    if missing:
        listed = "; ".join(f"{n.op} (node {n.name!r}, domain {n.domain or 'ai.onnx'})" for n in missing)
        raise UnsupportedOpError(
            f"no gradient rule for {len({(n.domain, n.op) for n in missing})} op type(s) on the path from the "
            f"target layer(s) to the score, at opset {b.opset}: {listed}")


def backward(b: Builder, targets: list[gs.Tensor], score: gs.Tensor, seed: gs.Tensor) -> dict[str, gs.Tensor]:
    """Emit d(sum(seed * score))/d(target) for every target; return {target name: gradient tensor}. With
    b.apart, each target's gradient only along paths that cross no other target (graph/model.py path_nodes)."""
    load_all()
    nodes, on_path = b.model.path_nodes(targets, score, apart=b.apart)
    check_supported(b, nodes)
    b.targets = {t.name for t in targets}
    rois = roi_rows(b, nodes, seed)  # before region_rows, which replaces the seed by its rows
    nodes, on_path, top, seed = region_rows(b, nodes, on_path, score, seed)  # the passes below see its row views
    silu = fold_silu(b, nodes)
    pools = pool_indices(b, nodes)
    channels = seed_channels(b, nodes, top, seed)
    on_path = on_path - {s.name for s in silu.values()}  # a folded Sigmoid's output gets no gradient of its own
    grads: dict[str, list[gs.Tensor]] = {top.name: [seed]}
    for node in reversed(nodes):
        b.node = node  # set first: the Sum of the outputs' fan-in is named after (and blamed on) this node
        gy = [_total(b, grads, o.name) if o.name in on_path else None for o in node.outputs]
        if all(g is None for g in gy):
            continue
        r = find_rule(node.op, b.opset, node.domain or "")
        if id(node) in silu:
            b.rule = "passes.fold_silu"
            makers = silu_gradient(b, node, silu[id(node)], gy)
        elif id(node) in pools:
            b.rule = "passes.pool_indices"
            makers = pool_indices_gradient(b, node, gy)
        elif id(node) in channels:
            b.rule = CHANNELS_RULE
            makers = seed_channels_gradient(b, node, gy)
        elif id(node) in rois:
            b.rule = ROI_RULE
            makers = roi_rows_gradient(b, node, gy, r)
        else:
            b.rule = rule_name(r)
            makers = r.fn(b, node, gy)
        for i, inp in enumerate(node.inputs):
            if not inp.name or inp.name not in on_path:
                continue
            make = makers[i] if i < len(makers) else None
            if make is None:
                raise b.error(f"has no gradient with respect to its input {i} ({inp.name!r})")
            g = make()
            shape = b.grad_shapes.get(g.name, b.shape(node.outputs[0]) if r.broadcast else None)
            if shape is not None:  # broadcasting is summed back here, and only here
                g = b.unbroadcast(g, shape, b.shape(inp))
            b.gradient_of[id(g)] = (g, inp)
            grads.setdefault(inp.name, []).append(g)
    result = {}
    for t in targets:  # a target's fan-in Sum belongs to its producer, or is named after the graph input
        b.node = b.model.producer(t) or gs.Node("graph input", name=t.name)
        result[t.name] = _total(b, grads, t.name)
    b.node, b.rule = None, "rewrite.build"
    for t in targets:
        if result[t.name] is None:
            raise _no_gradient(b, t, score)
    return result


def rule_name(r) -> str:
    """A rule's name as its module and function (`shape._pad`), for internal-error reports."""
    return f"{r.fn.__module__.rsplit('.', 1)[-1]}.{r.fn.__qualname__}"


def _no_gradient(b: Builder, target: gs.Tensor, score: gs.Tensor) -> UnsupportedOpError:
    """A target that reaches the score only through integer tensors (rounding, argmax, casts) has no gradient."""
    reach = b.model.backward_reach(score)
    blockers = [f"{n.op} (node {n.name!r}) -> {o.name!r}"
                for n in b.model.graph.nodes for o in n.outputs
                if o.name in reach and o.name not in b.model.forward_reach([target])
                and any(i.name in b.model.forward_reach([target]) for i in n.inputs)]
    return UnsupportedOpError(f"layer {target.name!r} reaches the score {score.name!r} only through tensors that "
                              f"carry no gradient (integer results): {'; '.join(blockers) or 'none found'}")


def _total(b: Builder, grads: dict[str, list[gs.Tensor]], name: str) -> gs.Tensor | None:
    """The summed gradient of a tensor with several consumers; summed once, kept for later readers."""
    parts = grads.get(name)
    if not parts:
        return None
    if len(parts) > 1:
        b.rule = "fan-in Sum (autodiff/engine.py)"
        grads[name] = [b.op("Sum", *parts)]
        b.gradient_of[id(grads[name][0])] = (grads[name][0], b.model.tensor(name))
    return grads[name][0]
