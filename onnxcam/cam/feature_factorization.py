"""Deep Feature Factorization (Collins et al., arXiv 1806.10206) with pytorch-grad-cam 1.5.7's calling convention.

The layer's activations of the whole batch, (N, C, h, w), are read as C rows (channels) of N*h*w non-negative
values (each channel shifted by its minimum) and factorized by non-negative matrix factorization, X ~ W H with k
components: W (C, k) + the shifts are the concepts (a channel vector each), H (k, N*h*w) their heatmaps. Concept
scores run the concept vectors through the classifier.

The factorization is scikit-learn's NMF(n_components, init="random", random_state=0) exactly (what pytorch-grad-cam
calls): the same random start (numpy's RandomState(0)), the same cyclic coordinate descent in the same order and
precision, the same stopping rule, in numpy, so the same activations give the same concepts and heatmaps
(tests/test_feature_factorization.py checks them equal to scikit-learn's); scikit-learn is not needed.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import numpy as np

from ..errors import InputError, LayerError, ModelError
from .gradient_free import AblationCAM, runtime_failure  # the same wording as the other cut-tail runs
from .postprocess import scale_cam_image

log = logging.getLogger(__name__)

HEAD = "head"  # computation_on_concepts: the model's own part after the layer


def nmf(x: np.ndarray, n_components: int, *, random_state: int = 0, tol: float = 1e-4,
        max_iter: int = 200) -> tuple[np.ndarray, np.ndarray, int]:
    """scikit-learn's NMF(n_components, init="random", random_state, solver="cd", tol, max_iter).fit_transform(x):
    (W (n_samples, k), H (k, n_features), iterations) with x ~ W H, in x's float precision (float32 or float64).

    Start: |avg * standard normal| from RandomState(random_state), H drawn first, avg = sqrt(mean(x) / k). Each
    iteration updates every coordinate of W, then of H, once (cyclic coordinate descent, Hsieh & Dhillon 2011);
    it stops when the summed projected gradient falls to tol times the first iteration's."""
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        x = x.astype(np.float64)
    if x.ndim != 2 or x.size == 0 or not np.isfinite(x).all() or x.min() < 0:
        raise InputError(f"NMF needs a finite non-negative 2-D array, got shape {x.shape}")
    n_samples, n_features = x.shape
    avg = np.sqrt(x.mean() / n_components)
    rng = np.random.RandomState(random_state)
    h = avg * rng.standard_normal(size=(n_components, n_features)).astype(x.dtype, copy=False)
    w = avg * rng.standard_normal(size=(n_samples, n_components)).astype(x.dtype, copy=False)
    np.abs(h, out=h)
    np.abs(w, out=w)
    ht = np.ascontiguousarray(h.T)
    violation_init = None
    for n_iter in range(1, max_iter + 1):
        violation = _coordinate_descent(x, w, ht) + _coordinate_descent(x.T, ht, w)
        if violation_init is None:
            violation_init = violation
        if violation_init == 0 or violation / violation_init <= tol:
            break
    return w, ht.T, n_iter


def _coordinate_descent(x: np.ndarray, w: np.ndarray, ht: np.ndarray) -> float:
    """One cyclic pass over W's coordinates for x ~ W Ht.T, in place; returns the summed |projected gradient|.

    Column t's update of row i reads row i's columns updated before it, never another row: updating a whole column
    at once is scikit-learn's row-by-row loop, with its float operations in its order (the gradient summed term by
    term, the violation accumulated sequentially in the array's precision)."""
    hht = np.dot(ht.T, ht)
    xht = x @ ht
    violation = np.zeros(1, w.dtype)
    terms = np.empty((w.shape[1] + 1, w.shape[0]), w.dtype)
    for t in range(w.shape[1]):
        # -XHt[i, t] + sum_r HHt[t, r] W[i, r], added term by term in r's order (cumsum over rows is sequential)
        terms[0] = -xht[:, t]
        np.multiply(w.T, hht[t][:, None], out=terms[1:])
        grad = np.cumsum(terms, axis=0)[-1]
        pg = np.where(w[:, t] == 0, np.minimum(grad, 0), grad)
        violation = np.cumsum(np.concatenate([violation, np.abs(pg)]), dtype=w.dtype)[-1:]
        if hht[t, t] != 0:
            w[:, t] = np.maximum(w[:, t] - grad / hht[t, t], 0)
    return float(violation[0])


def dff(activations: np.ndarray, n_components: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """Deep Feature Factorization of (N, C, h, w) activations: (concepts (C, k), heatmaps (N, k, h, w)).

    NaNs count as 0; each channel is shifted by its minimum over the batch before the factorization, and the shift
    is added back to the concepts (pytorch-grad-cam's dff)."""
    if activations.ndim != 4:
        raise InputError(f"Deep Feature Factorization needs (N, C, h, w) activations, got shape {activations.shape}")
    n, c, h, w = activations.shape
    x = np.where(np.isnan(activations), 0, activations).transpose(1, 0, 2, 3).reshape(c, -1)
    offset = x.min(axis=-1)
    x = x - offset[:, None]
    weights, heat, _ = nmf(x, n_components)
    return weights + offset[:, None], heat.reshape(n_components, n, h, w).transpose(1, 0, 2, 3)


class DeepFeatureFactorization:
    """pytorch-grad-cam's DeepFeatureFactorization on an ONNX model (one plain forward, then NMF in numpy).

    target_layer: one layer name (tensor name or module path); None for the automatic CAM layer.
    computation_on_concepts: None; a function of the (k, C) float32 concept vectors (a torch module such as the
        classifier `model.fc` is called on a torch tensor); or "head": the model itself after the layer, fed each
        concept as a spatially constant activation -- for a global-average-pooling + linear head exactly the
        classifier's scores of the concept vector.
    Calling it returns (concepts (C, k), a list of N arrays (k, H, W) of heatmaps scaled to [0, 1] at the input's
    size[, the concepts' outputs (k, ...)]).
    """

    def __init__(self, model, target_layer=None, reshape_transform: Callable | None = None,
                 computation_on_concepts=None, **options):
        if computation_on_concepts is not None and computation_on_concepts != HEAD and \
                not callable(computation_on_concepts):
            raise InputError(f"computation_on_concepts must be None, {HEAD!r} or a function of the concept vectors, "
                             f"not {computation_on_concepts!r}")
        layers = None if target_layer is None else [target_layer]
        # AblationCAM's forward gives the activations without gradients, and its cut tail runs what follows
        self._forward = AblationCAM(model, layers, reshape_transform, **options)
        self.computation_on_concepts = computation_on_concepts

    @property
    def target_layer(self) -> str:
        return self._forward.target_layers[0]

    def __call__(self, input_tensor, n_components: int = 16):
        from .base import as_numpy_input

        if isinstance(n_components, bool) or not isinstance(n_components, (int, np.integer)) or n_components < 1:
            raise InputError(f"n_components must be a positive integer, not {n_components!r}")
        x = as_numpy_input(input_tensor)
        fw = self._forward
        r = fw.run(x)
        layer = self.target_layer
        activations = fw.layer_activations(r.activations[layer], layer, x)
        concepts, heatmaps = dff(activations, int(n_components))
        size = fw.target_size(x)
        explanations = [scale_cam_image(maps, size) for maps in heatmaps]
        if self.computation_on_concepts is None:
            return concepts, explanations
        return concepts, explanations, self._concept_outputs(np.float32(concepts).T, r, x)

    def _concept_outputs(self, vectors: np.ndarray, r, x: np.ndarray) -> np.ndarray:
        fn = self.computation_on_concepts
        if fn == HEAD:
            return self._head(vectors, r, x)
        if hasattr(fn, "parameters"):  # a torch module: pytorch-grad-cam's calling convention
            import torch

            with torch.no_grad():
                return fn(torch.from_numpy(vectors)).cpu().numpy()
        return np.asarray(fn(vectors))

    def _head(self, vectors: np.ndarray, r, x: np.ndarray) -> np.ndarray:
        """The score of each concept as a constant map at the layer, by the model's part after the layer."""
        fw, layer = self._forward, self.target_layer
        raw = r.activations[layer]
        if fw.reshape_transform is not None:
            raise InputError(f"computation_on_concepts={HEAD!r} feeds the layer's own tensor, which a "
                             "reshape_transform hides; pass a function of the concept vectors")
        fed = fw._fed_names[layer]
        if any(r.outputs[name].dtype.kind == "f" for name in fed):
            raise LayerError(f"the model after layer {layer!r} also reads {fed}: a concept at the layer alone has "
                             f"no score there; pass computation_on_concepts as a function of the concept vectors")
        axis = fw._channel_axis(raw, layer, x, vectors.shape[1])
        shape = [1] * raw.ndim
        shape[axis] = vectors.shape[1]
        values = {layer: raw, **{name: r.outputs[name] for name in fed}}
        sess, feeds = fw._tail(layer, values)
        n, outs = len(raw), []
        # the tail's shape tensors (if any) were computed for batches of n: run the concepts n at a time
        step = 1 if fw.explainer.analysis.fixed_batch == 1 else n if fed else len(vectors)
        for start in range(0, len(vectors), step):
            part = vectors[start:start + step]
            count = len(part)
            part = np.concatenate([part, np.repeat(part[:1], step - count, axis=0)])
            maps = np.broadcast_to(part.reshape(step, *shape[1:]), (step, *raw.shape[1:])).astype(raw.dtype)
            try:
                out = sess.run([fw.explainer.score_name], {feeds[0]: maps, **{name: values[name]
                                                                             for name in feeds[1:]}})[0]
            except Exception as exc:  # onnxruntime's own error types
                raise ModelError(f"onnxruntime failed on the model after layer {layer!r}: "
                                 f"{runtime_failure(exc)}") from exc
            outs.append(out[:count])
        return np.concatenate(outs)

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, exc_tb):
        return None
