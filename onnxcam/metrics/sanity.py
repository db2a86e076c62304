"""The model-parameter randomization sanity check (Adebayo et al., "Sanity Checks for Saliency Maps", NeurIPS 2018).

The weights of the model's weighted nodes (Conv, ConvTranspose, Gemm, MatMul: their weight initializer) are
re-initialized stage by stage from the top (the output end), cumulatively ("cascading randomization"), in the ONNX
initializers; after each stage the maps are made again for the same inputs and the same target classes (those of
the trained model) and compared with the trained model's maps: Spearman rank correlation and SSIM. An explanation
that depends on what the model learned changes; a method whose maps stay the same once the model is random fails.

Re-initialization draws from a normal distribution with the original tensor's standard deviation (seeded), so
activations keep their scale and no map is zero just because the weights shrank.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import InputError
from ..graph.load import load_model
from ._scoring import check_positive

log = logging.getLogger(__name__)
WEIGHTED_OPS = {"Conv": 1, "ConvTranspose": 1, "Gemm": 1, "MatMul": 1}  # op -> the input index of its weight
THRESHOLD = 0.5  # the last stage's mean Spearman correlation above which the maps "did not change"


@dataclass
class SanityStage:
    """One cumulative stage: the initializers re-initialized so far and how the maps compare with the trained ones."""

    nodes: list[str]                # the weighted nodes re-initialized in this stage (top first)
    spearman: np.ndarray            # (N,) Spearman rank correlation per image
    ssim: np.ndarray                # (N,) SSIM per image (maps in [0, 1])

    def as_dict(self) -> dict:
        return {"nodes": self.nodes, "spearman": _floats(self.spearman), "ssim": _floats(self.ssim),
                "mean_spearman": float(np.mean(self.spearman)), "mean_ssim": float(np.mean(self.ssim))}


@dataclass
class SanityReport:
    method: str
    layers: list[str]
    stages: list[SanityStage] = field(default_factory=list)
    threshold: float = THRESHOLD

    @property
    def final_spearman(self) -> float:
        """The mean Spearman correlation after the last stage (every weighted node re-initialized)."""
        return float(np.mean(self.stages[-1].spearman))

    @property
    def final_ssim(self) -> float:
        return float(np.mean(self.stages[-1].ssim))

    @property
    def passed(self) -> bool:
        """True when the randomized model's maps are no longer rank-correlated with the trained model's."""
        return self.final_spearman < self.threshold

    def as_dict(self) -> dict:
        return {"method": self.method, "layers": self.layers, "threshold": self.threshold, "passed": self.passed,
                "final_spearman": self.final_spearman, "final_ssim": self.final_ssim,
                "stages": [s.as_dict() for s in self.stages]}


def weighted_nodes(proto: onnx.ModelProto, after: str | None = None) -> list[tuple[str, str]]:
    """(node name, weight initializer) of the weighted nodes, top (output end) first. With `after` (a tensor
    name), only the nodes downstream of it: re-initializing them changes the gradients, not the activations there."""
    inits = {t.name: t for t in proto.graph.initializer}
    downstream = _downstream(proto.graph, after) if after is not None else None
    found = []
    for i, node in enumerate(proto.graph.node):
        k = WEIGHTED_OPS.get(node.op_type)
        if k is None or len(node.input) <= k or node.input[k] not in inits:
            continue
        if inits[node.input[k]].data_type not in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE):
            continue
        if downstream is None or i in downstream:
            found.append((node.name or f"{node.op_type}_{i}", node.input[k]))
    return found[::-1]


def randomization_check(model, x: np.ndarray, method: str = "gradcam", layers=None, targets=None, *,
                        stages: int = 4, seed: int = 0, below_layer: bool = True, device: str = "cpu",
                        threshold: float = THRESHOLD, base_dir=None, **options) -> SanityReport:
    """Cascading model-parameter randomization of `method`'s maps for the preprocessed batch x.

    model: a path, bytes or ModelProto. targets: None (the trained model's top class per image, kept for every
    stage), an int or one per image. stages: how many groups the weighted nodes are split into, top first.
    below_layer: False re-initializes only the nodes downstream of the (first) target layer.
    options: passed to the method's class (as for onnxcam.explain).
    """
    from ..cam.api import explain

    check_positive(stages, "stages")
    full = onnx.ModelProto()
    full.CopyFrom(load_model(model, base_dir))  # a copy: the caller's ModelProto is never changed
    trained = explain(full, x, method, targets, layers, device=device, **options)
    if trained.maps.ndim != 3:
        raise InputError(f"the sanity check compares (N, H, W) maps; {method} gives maps of shape "
                         f"{trained.maps.shape}")
    fixed = trained.targets if targets is None and (trained.targets >= 0).all() else targets
    layer_names = list(trained.layers)
    nodes = weighted_nodes(full, None if below_layer else layer_names[0])
    if not nodes:
        raise InputError("the model has no weighted node (Conv, Gemm, MatMul with an initializer weight)"
                         + ("" if below_layer else f" after layer {layer_names[0]!r}") + " to re-initialize")
    rng = np.random.default_rng(seed)
    report = SanityReport(method, layer_names, threshold=threshold)
    inits = {t.name: t for t in full.graph.initializer}
    for group in np.array_split(np.arange(len(nodes)), min(stages, len(nodes))):
        for k in group:
            _reinitialize(inits[nodes[k][1]], rng)
        again = explain(full, x, method, fixed, layer_names, device=device, **options)
        report.stages.append(SanityStage([nodes[k][0] for k in group], spearman(trained.maps, again.maps),
                                         ssim(trained.maps, again.maps)))
        log.debug("%s: after %s, Spearman %.3f", method, report.stages[-1].nodes, report.stages[-1].spearman.mean())
    return report


def spearman(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(N,) Spearman rank correlation of each pair of maps (ties get their mean rank). Two constant maps correlate
    1 if equal (nothing changed), else 0; one constant map against a varying one: 0."""
    a, b = np.asarray(a, np.float64).reshape(len(a), -1), np.asarray(b, np.float64).reshape(len(b), -1)
    out = np.zeros(len(a))
    for i, (u, v) in enumerate(zip(a, b)):
        if np.ptp(u) == 0 or np.ptp(v) == 0:
            out[i] = float(np.array_equal(u, v))
            continue
        ru, rv = _ranks(u), _ranks(v)
        out[i] = np.corrcoef(ru, rv)[0, 1]
    return out


def ssim(a: np.ndarray, b: np.ndarray, data_range: float = 1.0) -> np.ndarray:
    """(N,) mean structural similarity of each pair of maps (Wang et al. 2004: Gaussian window, sigma 1.5)."""
    import cv2

    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    out = np.zeros(len(a))
    for i, (u, v) in enumerate(zip(np.asarray(a, np.float64), np.asarray(b, np.float64))):
        def blur(t):
            return cv2.GaussianBlur(t, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)
        mu, mv = blur(u), blur(v)
        suu, svv, suv = blur(u * u) - mu * mu, blur(v * v) - mv * mv, blur(u * v) - mu * mv
        num = (2 * mu * mv + c1) * (2 * suv + c2)
        den = (mu * mu + mv * mv + c1) * (suu + svv + c2)
        out[i] = float(np.mean(num / den))
    return out


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    sorted_v = v[order]
    starts = np.r_[0, np.flatnonzero(np.diff(sorted_v)) + 1]
    ends = np.r_[starts[1:], len(v)]
    mean_rank = (starts + ends - 1) / 2.0
    ranks = np.empty(len(v))
    ranks[order] = np.repeat(mean_rank, ends - starts)
    return ranks


def _reinitialize(tensor: onnx.TensorProto, rng: np.random.Generator) -> None:
    values = numpy_helper.to_array(tensor)
    std = float(values.std()) or 1.0 / np.sqrt(max(1, values[0].size if values.ndim else 1))
    fresh = rng.normal(0.0, std, values.shape).astype(values.dtype)
    tensor.CopyFrom(numpy_helper.from_array(fresh, tensor.name))


def _downstream(graph: onnx.GraphProto, tensor: str) -> set[int]:
    """Indexes of the nodes that read `tensor`, directly or through other nodes (graph nodes are in topological
    order)."""
    reached, tensors = set(), {tensor}
    for i, node in enumerate(graph.node):
        if tensors.intersection(node.input):
            reached.add(i)
            tensors.update(node.output)
    return reached


def _floats(a: np.ndarray) -> list[float]:
    return [round(float(v), 6) for v in a]
