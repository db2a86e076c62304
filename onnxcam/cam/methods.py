"""CAM methods as pure numpy functions of a layer's activations A and gradients G, both (N, C, h, w) float32.

Each returns the raw low-resolution map (N, h, w), before the ReLU and scaling of postprocess.py. G is
d(sum over samples of the target score) / dA, as the engine returns it. The arithmetic is pytorch-grad-cam 1.5.7's
in float32, so identical A and G give the same maps up to float32 summation order: the Grad-CAM weights and the
channel sums run as flat means and matrix products, several times faster than numpy's multi-axis reductions.

With eigen_smooth=True, the methods that weight the activations project the weighted activations on their first
principal component (projection.py) instead of summing them over channels, as pytorch-grad-cam does.
"""

from __future__ import annotations

import logging

import numpy as np

from .projection import get_2d_projection, get_2d_projection_kernel

log = logging.getLogger(__name__)
_SPATIAL = (2, 3)


def _reduce(weighted: np.ndarray, eigen_smooth: bool) -> np.ndarray:
    return get_2d_projection(weighted) if eigen_smooth else weighted.sum(axis=1)


def _with_channel_weights(weights: np.ndarray, activations: np.ndarray, eigen_smooth: bool) -> np.ndarray:
    if eigen_smooth:
        return _reduce(weights[:, :, None, None] * activations, eigen_smooth)
    n, c, h, w = activations.shape
    return (np.asarray(weights, np.float32)[:, None, :] @ activations.reshape(n, c, h * w)).reshape(n, h, w)


def _spatial_mean(t: np.ndarray) -> np.ndarray:
    """(N, C, h, w) -> (N, C): the mean over space, over one flat axis."""
    return t.reshape(t.shape[0], t.shape[1], -1).mean(axis=2)


# ---- channel-weight methods: a weight per channel, map = sum_c w_c A_c ----------------------------------------------
def gradcam(activations: np.ndarray, grads: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """Grad-CAM (Selvaraju et al., arXiv 1610.02391): w_c = mean over space of dY/dA_c."""
    return _with_channel_weights(_spatial_mean(grads), activations, eigen_smooth)


def counterfactual_gradcam(activations: np.ndarray, grads: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """Counterfactual Grad-CAM (Grad-CAM paper, section 'Counterfactual Explanations'): negated gradients.

    Highlights the regions whose removal would make the network more confident in the target.
    """
    return gradcam(activations, -grads, eigen_smooth)


def gradcam_plusplus(activations: np.ndarray, grads: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """Grad-CAM++ (Chattopadhyay et al., arXiv 1710.11063, eq. 19), with pytorch-grad-cam's closed form:

    a_kij = g^2 / (2 g^2 + sum_ab A_kab g^3 + 1e-6)  (0 where g == 0),  w_k = sum_ij a_kij relu(g_kij).
    """
    grads_2 = grads ** 2
    grads_3 = grads_2 * grads
    sum_activations = np.sum(activations, axis=_SPATIAL)[:, :, None, None]
    alpha = grads_2 / (2 * grads_2 + sum_activations * grads_3 + 0.000001)
    alpha = np.where(grads != 0, alpha, 0)
    weights = np.sum(np.maximum(grads, 0) * alpha, axis=_SPATIAL)
    return _with_channel_weights(weights, activations, eigen_smooth)


def xgradcam(activations: np.ndarray, grads: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """XGrad-CAM (Fu et al., arXiv 2008.02312): w_c = sum_ij g_cij A_cij / (sum_ij A_cij + 1e-7)."""
    sum_activations = np.sum(activations, axis=_SPATIAL)[:, :, None, None]
    weights = (grads * activations / (sum_activations + 1e-7)).sum(axis=_SPATIAL)
    return _with_channel_weights(weights, activations, eigen_smooth)


def cam(activations: np.ndarray, class_weights: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """CAM (Zhou et al., arXiv 1512.04150): map = sum_c W[target, c] A_c, for models ending in GAP + linear.

    class_weights (N, C): the head's weights of each sample's target; the engine gives them as the gradient of the
    score with respect to the pooled features (exactly W[target] for a linear head).
    """
    return _with_channel_weights(class_weights, activations, eigen_smooth)


# ---- element-wise methods -------------------------------------------------------------------------------------------
def hirescam(activations: np.ndarray, grads: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """HiResCAM (Draelos & Carin, arXiv 2011.08891): map = sum_c g_c * A_c (no spatial averaging)."""
    if eigen_smooth:
        log.warning("HiResCAM's faithfulness guarantees do not hold if smoothing is applied")
    return _reduce(grads * activations, eigen_smooth)


def gradcam_elementwise(activations: np.ndarray, grads: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """Element-wise Grad-CAM (pytorch-grad-cam's GradCAMElementWise): map = sum_c relu(g_c * A_c)."""
    return _reduce(np.maximum(grads * activations, 0), eigen_smooth)


def layercam(activations: np.ndarray, grads: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """LayerCAM (Jiang et al., IEEE TIP 2021): map = sum_c relu(g_c) * A_c."""
    return _reduce(np.maximum(grads, 0) * activations, eigen_smooth)


# ---- principal-component methods (eigen_smooth does not apply) ------------------------------------------------------
def eigencam(activations: np.ndarray, grads: np.ndarray | None = None, eigen_smooth: bool = False) -> np.ndarray:
    """Eigen-CAM (Muhammad & Yeasin, arXiv 2008.00299): the activations' first principal component. No gradients."""
    return get_2d_projection(activations)


def eigengradcam(activations: np.ndarray, grads: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """Eigen-Grad-CAM (pytorch-grad-cam): the first principal component of g * A."""
    return get_2d_projection(grads * activations)


def kpca_cam(activations: np.ndarray, grads: np.ndarray | None = None, eigen_smooth: bool = False, *,
             kernel: str = "sigmoid", gamma: float | None = None) -> np.ndarray:
    """KPCA-CAM (Karmani et al., arXiv 2410.00267): the activations' first kernel principal component."""
    return get_2d_projection_kernel(activations, kernel, gamma)


# ---- methods without gradients (eigen_smooth applies to the weighted activations) ---------------------------------
def random_cam(activations: np.ndarray, grads: np.ndarray | None = None, eigen_smooth: bool = False, *,
               rng: np.random.Generator | None = None) -> np.ndarray:
    """Random-CAM (pytorch-grad-cam's baseline): channel weights drawn uniformly from [-1, 1).

    rng None draws from numpy's global generator, as pytorch-grad-cam does: after np.random.seed(s) both give the
    same maps. A sanity baseline for the metrics, not an explanation."""
    size = activations.shape[:2]
    weights = np.random.uniform(-1, 1, size=size) if rng is None else rng.uniform(-1, 1, size=size)
    return _reduce(weights[:, :, None, None] * activations, eigen_smooth)


def fem(activations: np.ndarray, grads: np.ndarray | None = None, eigen_smooth: bool = False, *,
        k: float = 2) -> np.ndarray:
    """FEM, Feature Explanation Method (Fuad et al., IPTA 2020, hal-02963298): the weight of channel c is the share
    of its positions above mean_c + k std_c (the k-sigma rule); map = sum_c w_c A_c. No gradients, no eigen_smooth."""
    n, c = activations.shape[:2]
    flat = activations.reshape(n, c, -1)
    threshold = flat.mean(axis=2) + k * flat.std(axis=2)
    weights = (flat > threshold[:, :, None]).mean(axis=2)
    return (weights[:, :, None, None] * activations).sum(axis=1)


def score_weights(scores: np.ndarray) -> np.ndarray:
    """Score-CAM's channel weights (Wang et al., arXiv 1910.01279): softmax over channels of the target scores of
    the masked inputs, (N, C) -> (N, C) float32."""
    scores = np.asarray(scores, np.float32)
    e = np.exp(scores - scores.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ablation_weights(original: np.ndarray, ablated: np.ndarray) -> np.ndarray:
    """Ablation-CAM's channel weights (Desai & Ramaswamy, WACV 2020): the relative drop of the target score when
    the channel is ablated, (y - y_c) / y; original (N,), ablated (N, C)."""
    original = np.float32(original)[:, None]
    return (original - np.float32(ablated)) / original


def weighted_sum(weights: np.ndarray, activations: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """map = sum_c w_c A_c (or, with eigen_smooth, the first principal component of w_c A_c)."""
    return _reduce(weights[:, :, None, None] * activations, eigen_smooth)


# ---- input-space maps (A is the model input) ------------------------------------------------------------------------
def saliency(inputs: np.ndarray, grads: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """Saliency (Simonyan et al., arXiv 1312.6034): max over channels of |dY/dx|."""
    return np.abs(grads).max(axis=1)


def gradient_x_input(inputs: np.ndarray, grads: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
    """Gradient x input (Shrikumar et al., arXiv 1605.01713), summed over channels: HiResCAM at the input."""
    return _reduce(grads * inputs, eigen_smooth)


METHODS = {
    "gradcam": gradcam,
    "hirescam": hirescam,
    "gradcam_elementwise": gradcam_elementwise,
    "gradcam++": gradcam_plusplus,
    "xgradcam": xgradcam,
    "layercam": layercam,
    "eigencam": eigencam,
    "eigengradcam": eigengradcam,
    "kpca_cam": kpca_cam,
    "counterfactual_gradcam": counterfactual_gradcam,
    "cam": cam,
    "saliency": saliency,
    "gradient_x_input": gradient_x_input,
}
# METHODS: the numpy functions of the methods that are one function of (A, G). Which methods exist, and what the
# command line, explain() and the classes offer, is onnxcam.cam.api.REGISTRY.
