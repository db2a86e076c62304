"""FullGrad (Srinivas & Fleuret, arXiv 1905.00780): input gradient x input plus every layer's bias gradients.

The score's gradient with respect to a bias b of a convolution is the gradient at that convolution's output, g,
summed over space; FullGrad keeps it per position, |b_c g_c|. In ONNX a bias sits inside its Conv node (an exported
BatchNorm is usually folded into the Conv before it), so the layers are the outputs of every 2-D Conv with a bias and
of every BatchNormalization (bias B - mean * scale / sqrt(var + eps)); one run gives all their gradients and the
input's. The post-processing is pytorch-grad-cam 1.5.7's: every channel map min-max scaled and resized on its own,
summed per layer, all summed, and the sum scaled (no ReLU).

pytorch-grad-cam takes torch's Conv2d and BatchNorm2d modules with a bias; a Conv2d with a bias followed by a
BatchNorm2d is one folded Conv in the exported model, so there the two count once (with the summed bias).
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import numpy_helper

from ..errors import LayerError
from ..explainer import Result
from ..utils.image import scale_accross_batch_and_channels
from .base import BaseCAM, input_name
from .postprocess import scale_cam_image
from .projection import get_2d_projection

log = logging.getLogger(__name__)


class FullGrad(BaseCAM):
    """FullGrad: |input gradient x input| plus |bias x gradient| at every biased Conv / BatchNormalization output.

    target_layers is ignored (all bias layers are used), as in pytorch-grad-cam.
    """

    def __init__(self, model, target_layers=None, reshape_transform=None, **options):
        if target_layers:
            log.warning("FullGrad ignores target_layers: it uses every layer with a bias")
        self._bias_specs: dict = {}
        super().__init__(model, None, reshape_transform, **options)
        self._biases: dict[str, np.ndarray] | None = None

    def _explainer_layers(self, proto: onnx.ModelProto, target_layers):
        self._input = input_name(proto)
        self._bias_specs = _bias_layers(proto)
        if not self._bias_specs:
            raise LayerError("FullGrad needs layers with a bias (a 2-D Conv with a bias, or a BatchNormalization); "
                             "this model has none")
        return [self._input, *self._bias_specs]

    @property
    def target_layers(self) -> list[str]:
        return list(self._bias_specs)

    def biases(self) -> dict[str, np.ndarray]:
        """layer -> its (C,) bias, read from the model's weights once."""
        if self._biases is None:
            weights = self.explainer.weights
            inits = {t.name: t for t in self.explainer.proto.graph.initializer}

            def value(name):
                return np.asarray(weights[name] if name in weights else numpy_helper.to_array(inits[name]))

            self._biases = {layer: _bias(spec, value) for layer, spec in self._bias_specs.items()}
        return self._biases

    def maps_for(self, x: np.ndarray, r: Result, eigen_smooth: bool = False) -> np.ndarray:
        self.outputs, self.result = r.logits, r
        size = self.target_size(x)
        inputs, grads = r.activations[self._input], r.gradients[self._input]
        if self._input_channels_last(x):
            inputs, grads = inputs.transpose(0, 3, 1, 2), grads.transpose(0, 3, 1, 2)
        per_layer = [scale_accross_batch_and_channels(np.abs(grads * inputs), size)]
        self.raw = {}
        for layer, bias in self.biases().items():
            _, g = self.layer_arrays(r, layer, x)
            summed = scale_accross_batch_and_channels(np.abs(bias[None, :, None, None] * g), size).sum(axis=1)
            self.raw[layer] = summed
            per_layer.append(summed[:, None])
        stacked = np.concatenate(per_layer, axis=1)
        if eigen_smooth:  # pytorch-grad-cam's: the first component of all maps at 1/8 of the size
            small = scale_accross_batch_and_channels(stacked, (size[0] // 8, size[1] // 8))
            stacked = scale_accross_batch_and_channels(get_2d_projection(small)[:, None], size)
        maps = scale_cam_image(np.sum(stacked, axis=1))
        self._call.degenerate = _degenerate(maps)
        return maps


def _degenerate(maps: np.ndarray) -> list[str | None]:
    return [None if np.any(m) else "the map is all zero: every gradient of the target's score is zero"
            for m in maps]


def _bias_layers(proto: onnx.ModelProto) -> dict[str, tuple]:
    """Output tensor -> ("conv", bias name) or ("bn", scale, B, mean, var, eps) for 2-D layers with a bias."""
    ranks = {t.name: len(t.dims) for t in proto.graph.initializer}
    found = {}
    for node in proto.graph.node:
        if node.op_type == "Conv" and len(node.input) > 2 and node.input[2] in ranks and ranks.get(node.input[1]) == 4:
            found[node.output[0]] = ("conv", node.input[2])
        elif node.op_type == "BatchNormalization" and all(name in ranks for name in node.input[1:5]):
            eps = next((a.f for a in node.attribute if a.name == "epsilon"), 1e-5)
            found[node.output[0]] = ("bn", *node.input[1:5], eps)
    return found


def _bias(spec: tuple, value) -> np.ndarray:
    if spec[0] == "conv":
        return np.float32(value(spec[1]))
    _, scale, b, mean, var, eps = spec
    scale, b, mean, var = (np.float32(value(name)) for name in (scale, b, mean, var))
    return b - mean * scale / np.sqrt(var + np.float32(eps))

