"""The CAM classes: pytorch-grad-cam's names (an import swap is the migration), plus CAM, counterfactual Grad-CAM,
saliency and gradient x input in the same style. Each only picks its method; base.py does the rest."""

from __future__ import annotations

import numpy as np
import onnx

from ..errors import InputError, LayerError
from ..explainer import Result
from ..graph import names
from . import methods
from .base import BaseCAM, as_numpy_input, input_name


class GradCAM(BaseCAM):
    """Grad-CAM: channel weights = spatially averaged gradients (arXiv 1610.02391)."""

    method = staticmethod(methods.gradcam)


class HiResCAM(BaseCAM):
    """HiResCAM: gradient x activation summed over channels; faithful to the score (arXiv 2011.08891)."""

    method = staticmethod(methods.hirescam)


class GradCAMElementWise(BaseCAM):
    """Element-wise Grad-CAM: ReLU(gradient x activation) summed over channels."""

    method = staticmethod(methods.gradcam_elementwise)


class GradCAMPlusPlus(BaseCAM):
    """Grad-CAM++ (arXiv 1710.11063)."""

    method = staticmethod(methods.gradcam_plusplus)


class XGradCAM(BaseCAM):
    """XGrad-CAM (arXiv 2008.02312)."""

    method = staticmethod(methods.xgradcam)


class LayerCAM(BaseCAM):
    """LayerCAM: ReLU(gradient) x activation summed over channels."""

    method = staticmethod(methods.layercam)


class EigenCAM(BaseCAM):
    """Eigen-CAM: first principal component of the activations; class-agnostic (arXiv 2008.00299)."""

    method = staticmethod(methods.eigencam)
    gradient_free = True


class EigenGradCAM(BaseCAM):
    """Eigen-Grad-CAM: first principal component of gradient x activation."""

    method = staticmethod(methods.eigengradcam)


class KPCA_CAM(BaseCAM):
    """KPCA-CAM: first kernel principal component of the activations (arXiv 2410.00267).

    kernel: "sigmoid" (default), "rbf", "poly", "linear" or "cosine"; gamma: None for 1 / channels.
    """

    def __init__(self, model, target_layers=None, reshape_transform=None, kernel: str = "sigmoid",
                 gamma: float | None = None, **options):
        super().__init__(model, target_layers, reshape_transform, **options)
        self.kernel, self.gamma = kernel, gamma

    gradient_free = True

    def method(self, activations, grads, eigen_smooth=False):
        return methods.kpca_cam(activations, grads, eigen_smooth, kernel=self.kernel, gamma=self.gamma)


class CounterfactualGradCAM(BaseCAM):
    """Counterfactual Grad-CAM: Grad-CAM of the negated gradients, the regions that argue against the target."""

    method = staticmethod(methods.counterfactual_gradcam)


class CAM(BaseCAM):
    """CAM (arXiv 1512.04150) for models ending in global average pooling + linear: map = sum_c W[target, c] A_c.

    The head weights of each sample's target are read as the gradient at the pooled features, so the target layer
    must be the pooled tensor's input. target_layers=None takes the input of the last global average pooling.
    pooled: the pooled tensor of each target layer, when it is not found by itself.
    """

    method = staticmethod(methods.cam)

    def __init__(self, model, target_layers=None, reshape_transform=None, *, pooled=None, **options):
        self._pooled_given = pooled
        super().__init__(model, target_layers, reshape_transform, **options)

    def _explainer_layers(self, proto: onnx.ModelProto, target_layers):
        tensors = _tensor_names(proto)
        if target_layers is None:
            layers = [_last_pool_input(proto)]
        else:
            layers = [names.resolve(proto, name, tensors) for name in ([target_layers] if isinstance(
                target_layers, str) else target_layers)]
        if self._pooled_given is not None:
            given = [self._pooled_given] if isinstance(self._pooled_given, str) else list(self._pooled_given)
            if len(given) != len(layers):
                raise InputError(f"pooled names {len(given)} tensors for {len(layers)} target layers")
            pooled = [names.resolve(proto, name, tensors) for name in given]
        else:
            pooled = [_pool_of(proto, layer) for layer in layers]
        self._layers, self._pooled = layers, dict(zip(layers, pooled))
        return layers + pooled

    @property
    def target_layers(self) -> list[str]:
        return list(self._layers)

    @property
    def _gradient_layers(self) -> list[str]:
        return [self._pooled[layer] for layer in self._layers]  # the head weights are read there

    def raw_map(self, r: Result, layer: str, x: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
        activations, _ = self.layer_arrays(r, layer, x)
        pooled = self._pooled[layer]
        n, c = activations.shape[:2]
        mean = r.activations[pooled].reshape(n, -1)
        if mean.shape[1] != c or not np.allclose(mean, activations.mean(axis=(2, 3)), rtol=1e-3, atol=1e-5):
            raise LayerError(f"tensor {pooled!r} {r.activations[pooled].shape} is not the global average of layer "
                             f"{layer!r} {r.activations[layer].shape}: CAM needs the layer that is pooled")
        weights = np.float32(r.gradients[pooled].reshape(n, c))
        return methods.cam(activations, weights, eigen_smooth)


class RandomCAM(BaseCAM):
    """Random-CAM: random channel weights in [-1, 1), a baseline for the metrics. Drawn from numpy's global
    generator (np.random.seed reproduces pytorch-grad-cam's maps), or from `rng` when given."""

    def __init__(self, model, target_layers=None, reshape_transform=None, *, rng: np.random.Generator | None = None,
                 **options):
        super().__init__(model, target_layers, reshape_transform, **options)
        self.rng = rng

    def method(self, activations, grads, eigen_smooth=False):
        return methods.random_cam(activations, grads, eigen_smooth, rng=self.rng)


class FEM(BaseCAM):
    """FEM: channels weighted by the share of their positions above mean + k std (k-sigma rule); no gradients."""

    gradient_free = True

    def __init__(self, model, target_layers=None, reshape_transform=None, k: float = 2, **options):
        super().__init__(model, target_layers, reshape_transform, **options)
        self.k = k

    def method(self, activations, grads, eigen_smooth=False):
        return methods.fem(activations, grads, eigen_smooth, k=self.k)


class FinerCAM:
    """Finer-CAM (arXiv 2501.11309): a base method (Grad-CAM by default) explaining FinerWeightedTarget, the target
    class's logit against the classes the model finds most similar to it (softmax-weighted differences).

    With targets=None each sample's main class is its top class (or target_idx), compared with the classes whose
    logits are nearest to it: comparison_categories are ranks in that order (1 = the nearest other class).
    """

    def __init__(self, model, target_layers=None, reshape_transform=None, base_method=GradCAM, **options):
        self.base_cam = base_method(model, target_layers, reshape_transform, **options)

    def __getattr__(self, name):  # outputs, result, raw, target_layers, degenerate...: the base method's
        if name == "base_cam":
            raise AttributeError(name)
        return getattr(self.base_cam, name)

    def __call__(self, input_tensor, targets=None, eigen_smooth: bool = False, alpha: float = 1,
                 comparison_categories=None, target_idx: int | None = None, aug_smooth: bool = False) -> np.ndarray:
        """(N, H, W) maps in [0, 1]; targets given explicitly are used as they are (as pytorch-grad-cam does)."""
        x = as_numpy_input(input_tensor)
        if targets is None:
            targets = finer_targets(self.base_cam.score_outputs(x), alpha, comparison_categories, target_idx)
        return self.base_cam(x, targets, aug_smooth=aug_smooth, eigen_smooth=eigen_smooth)

    forward = __call__

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, exc_tb):
        return None


def finer_targets(outputs: np.ndarray, alpha: float = 1, comparison_categories=None,
                  target_idx: int | None = None) -> list:
    """Finer-CAM's default targets from the logits (N, K): main class = the top one (or target_idx); the classes
    sorted by |z_k - z_main| ascending; comparisons = those at the given ranks (default 1, 2, 3, within K)."""
    from .targets import FinerWeightedTarget

    outputs = np.asarray(outputs)
    if outputs.ndim != 2:
        raise InputError(f"FinerCAM needs a score of one vector per sample, not of shape {outputs.shape}")
    k = outputs.shape[-1]
    if comparison_categories is None:
        ranks = [1, 2, 3][:max(k - 1, 0)]
    else:
        ranks = [int(c) for c in comparison_categories if c < k]
    if target_idx is not None and not 0 <= target_idx < k:
        raise InputError(f"target_idx {target_idx} is out of range: the model has {k} classes")
    main = outputs.max(axis=-1) if target_idx is None else outputs[:, target_idx]
    order = np.argsort(np.abs(outputs - main[:, None]), axis=-1)
    return [FinerWeightedTarget(int(row[0]), [int(row[r]) for r in ranks], alpha) for row in order]


class _InputMap(BaseCAM):
    """A map from the gradient with respect to the model input (the input is the only 'layer')."""

    def __init__(self, model, *, reshape_transform=None, **options):
        super().__init__(model, None, reshape_transform, **options)

    def _explainer_layers(self, proto, target_layers):
        return [input_name(proto)]


class Saliency(_InputMap):
    """Saliency (arXiv 1312.6034): max over channels of |d score / d input|, scaled to [0, 1] per image."""

    method = staticmethod(methods.saliency)


class GradientXInput(_InputMap):
    """Gradient x input summed over channels (HiResCAM at the input), ReLU, scaled to [0, 1] per image."""

    method = staticmethod(methods.gradient_x_input)


# ---- finding the pooling after a layer ------------------------------------------------------------------------------
_POOLS = ("GlobalAveragePool", "ReduceMean", "AveragePool")


def _tensor_names(proto: onnx.ModelProto) -> set[str]:
    out = {i.name for i in proto.graph.input} | {t.name for t in proto.graph.initializer}
    for node in proto.graph.node:
        out.update(o for o in node.output if o)
    return out


def _pool_of(proto: onnx.ModelProto, layer: str) -> str:
    for node in proto.graph.node:
        if node.op_type in _POOLS and node.input and node.input[0] == layer:
            return node.output[0]
    used_by = sorted({n.op_type for n in proto.graph.node if layer in n.input})
    raise LayerError(f"layer {layer!r} is not globally average-pooled (it feeds {used_by}); CAM needs the input "
                     "of the global pooling before the classifier, or pooled=<the pooled tensor>")


def _last_pool_input(proto: onnx.ModelProto) -> str:
    for node in reversed(proto.graph.node):
        if node.op_type in ("GlobalAveragePool", "ReduceMean") and node.input:
            return node.input[0]
    raise LayerError("the model has no global average pooling: CAM needs one (give target_layers and pooled)")
