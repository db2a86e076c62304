"""ShapleyCAM (Cai et al., arXiv 2501.06261): Grad-CAM with a second-order term, w_c = mean over space of
(g - H A / 2)_c, where H A is the Hessian-vector product d<g, A>/dA at the layer's activation A (A held constant
in the product), as pytorch-grad-cam 1.5.7's ShapleyCAM computes it with torch.autograd.grad(g, A, A).

onnxcam differentiates its own gradient graph for H A (onnxcam/hessian.py): one onnxruntime run gives the logits,
A, g and H A. The target is written into that graph so that its own curvature counts: a class score (or any
target linear in the score: a seed array, a mask), a class's softmax probability (ClassifierOutputSoftmaxTarget) or
ReST's logit minus cross-entropy (ClassifierOutputReST, the paper's target). Other targets whose seed depends on
the logits (FinerWeightedTarget) are refused: their second derivative is not in the graph.
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from .. import hessian, rewrite
from ..cache import CACHE
from ..errors import InputError, ModelError, NumericalError
from ..explainer import Result
from ..graph.evaluate import runtime_failure
from ..runtime import SESSION_CONFIG, session
from .base import BaseCAM
from .methods import gradcam
from .targets import ClassifierOutputReST, ClassifierOutputSoftmaxTarget, ClassifierOutputTarget, per_sample

log = logging.getLogger(__name__)


class ShapleyCAM(BaseCAM):
    """ShapleyCAM: channels weighted by the spatial mean of the gradient minus half the Hessian-vector product.

    Same signature as pytorch-grad-cam's: ShapleyCAM(model, target_layers, reshape_transform=None); the options of
    BaseCAM (device, score, output, input_shape, channels_last, base_dir) as keywords. `hvp` holds this thread's
    last H A per layer, shaped like the activations.
    """

    builds_gradients = False  # the plain explainable model is never run: the Hessian model gives g too

    def __init__(self, model, target_layers=None, reshape_transform=None, **options):
        super().__init__(model, target_layers, reshape_transform, **options)

    @property
    def hvp(self) -> dict[str, np.ndarray] | None:
        """layer -> H A of this thread's last call (None before the first)."""
        return getattr(self._call, "hvp", None)

    def run(self, x: np.ndarray, targets=None) -> Result:
        """One run per kind of target in the batch (a class score, its softmax probability, ReST); sets outputs."""
        ex = self.explainer
        if ex.quantized:
            raise ModelError(f"ShapleyCAM does not differentiate quantized models twice ({ex.quantized}); explain "
                             "the float model")
        x = ex.check_input(x)
        n = x.shape[0]
        shape = ex.analysis.build_shape or x.shape  # as Explainer.run: the size built for, else this input's
        layers = ex.choose_layers(shape)
        groups = _kinds(None if targets is None else per_sample(targets, n), n)
        parts = []
        for kind, (rows, wanted) in groups.items():
            hm, sess = self._compiled(kind, shape, layers)
            # a model whose batch is fixed at 1 runs sample by sample (as Explainer.run does)
            chunks = [[i] for i in range(len(rows))] if ex.analysis.fixed_batch == 1 else [list(range(len(rows)))]
            for chunk in chunks:
                part = _run(sess, hm, x[rows[chunk]], None if wanted is None else [wanted[i] for i in chunk],
                            ex.input_name)
                parts.append((rows[chunk], part))
        r, hvp = _merged(parts, n, layers)
        self._call.hvp = hvp
        self.outputs, self.result = r.logits, r
        return r

    def raw_map(self, r: Result, layer: str, x: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
        activations, grads = self.layer_arrays(r, layer, x)
        _, hvp = self.layer_arrays(dataclasses.replace(r, gradients=self.hvp), layer, x)
        return gradcam(activations, grads - 0.5 * hvp, eigen_smooth)  # Grad-CAM of the corrected gradient

    def export(self, path=None, **kwargs):
        raise InputError("ShapleyCAM cannot be exported as an ONNX graph yet: its Hessian-vector product is built "
                         "only for runs")

    def _compiled(self, kind: str, shape: tuple, layers: list[str]):
        """(HvpModel, session) for a kind of target at an input shape, built once and kept in onnxcam.cache."""
        ex = self.explainer
        if ex.apart:
            raise InputError("ShapleyCAM's Hessian-vector product is not built for layers differentiated apart "
                             "(Explainer(apart=True)): give it an Explainer without apart, or use GradCAM, HiResCAM, "
                             "...", option="method")
        key = (ex.digest, "hvp", kind, tuple(layers), ex.score_name, tuple(shape[1:]), ex.device,
               tuple(sorted(SESSION_CONFIG.items())))

        def build():
            hm = hessian.build_hvp(ex.proto, ex.weights, shape, layers, ex.score_name, kind)
            sess = session(hm.model.SerializeToString(), ex.device, hm.weights)
            hm.weights = {}  # onnxruntime holds its own copy
            ex.loaded.release_weights()
            return hm, sess
        return CACHE.get_or_build("sessions", key, build)


def _kinds(targets: list | None, n: int) -> dict[str, tuple[np.ndarray, list | None]]:
    """kind -> (sample rows, their targets; None: each sample's top class) for hessian.KINDS."""
    if targets is None:
        return {"linear": (np.arange(n), None)}
    by_kind: dict[str, list[int]] = {}
    for i, t in enumerate(targets):
        by_kind.setdefault(_kind(t), []).append(i)
    return {kind: (np.asarray(rows), [targets[i] for i in rows]) for kind, rows in by_kind.items()}


def _kind(target) -> str:
    if isinstance(target, ClassifierOutputSoftmaxTarget):
        return "softmax"
    if isinstance(target, ClassifierOutputReST):
        return "rest"
    if getattr(target, "sequence", False):  # its seeds are built batch-first; a (T, N, C) score is not
        raise InputError(f"ShapleyCAM cannot take target {target!r} of a recognizer's sequence scores yet; use "
                         "GradCAM or another gradient method")
    if getattr(target, "needs_output", False):
        raise InputError(f"ShapleyCAM cannot take target {target!r}: its seed depends on the logits and its second "
                         "derivative is not in the graph; use ClassifierOutputTarget, ClassifierOutputSoftmaxTarget, "
                         "ClassifierOutputReST or a target linear in the score")
    return "linear"


def _seeds(hm: hessian.HvpModel, targets: list | None, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(dense seed (n, 1, *score), explained classes (n,); -1 where the seed is not one class)."""
    score_shape = tuple(hm.rewritten.score_shape[1:])
    seed = np.zeros((n, 1, *score_shape), np.float32)
    classes = np.full(n, -1, np.int64)
    for i, t in enumerate(targets or ()):
        if isinstance(t, ClassifierOutputTarget):  # also the softmax and ReST targets: a class of T(score)
            if len(score_shape) != 1 or not 0 <= t.category < score_shape[0]:
                raise InputError(f"{t!r} needs a class-score vector per sample with that class; the score has "
                                 f"shape {score_shape}")
            seed[i, 0, t.category], classes[i] = 1, t.category
        else:
            seed[i, 0] = t.seed(np.zeros(score_shape, np.float32))
    return seed, classes


def _run(sess, hm: hessian.HvpModel, x: np.ndarray, targets: list | None, input_name: str) -> tuple:
    """(logits, classes, {layer: (A, g, H A)}) of one run."""
    rw = hm.rewritten
    n = x.shape[0]
    seed, classes = _seeds(hm, targets, n)
    feeds = {input_name: x, rewrite.SEED: seed}
    names = hm.outputs()
    if rw.has_ranking:
        feeds[rewrite.RANKED] = np.asarray(targets is None)
        names.append(rewrite.TOP_CLASSES)
    elif targets is None:
        raise InputError(f"the score {hm.score!r} has no classes to rank; give ShapleyCAM a target per sample")
    try:
        values = dict(zip(names, sess.run(names, feeds)))
    except Exception as exc:  # onnxruntime's own types: one line naming the input and the failing node
        raise ModelError(f"onnxruntime failed on input {input_name!r} of shape {x.shape}: "
                         f"{runtime_failure(exc)}") from exc
    if targets is None:
        classes = values[rewrite.TOP_CLASSES][:, 0].astype(np.int64)
    per_layer = {}
    for layer in hm.layers:
        arrays = tuple(values[name] for name in (rw.act_outputs[layer], rewrite.grad_name(layer),
                                                  hessian.hvp_name(layer)))
        for what, a in zip(("activation", "gradient", "Hessian-vector product"), arrays):
            if not np.isfinite(a).all():
                raise NumericalError(f"the {what} at layer {layer!r} holds NaN or Inf")
        per_layer[layer] = arrays
    return values[hm.score], classes, per_layer


def _merged(parts: list, n: int, layers: list[str]) -> tuple[Result, dict]:
    """One Result (and the H A per layer) for the whole batch from its runs: (sample rows, what _run gave) each."""
    first = parts[0][1]
    logits = np.zeros((n, *first[0].shape[1:]), first[0].dtype)
    classes = np.full(n, -1, np.int64)
    acts, grads, hvps = ({layer: np.zeros((n, *first[2][layer][k].shape[1:]), np.float32) for layer in layers}
                         for k in range(3))
    for rows, (z, c, per_layer) in parts:
        logits[rows], classes[rows] = z, c
        for layer, (a, g, h) in per_layer.items():
            acts[layer][rows], grads[layer][rows], hvps[layer][rows] = a, g, h
    return Result(logits=logits, targets=classes, activations=acts, gradients=grads), hvps
