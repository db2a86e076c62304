"""Guided backpropagation (Springenberg et al., arXiv 1412.6806) and Guided Grad-CAM (arXiv 1610.02391).

The engine builds a second gradient graph, from the score down to the model input, in which every ReLU-like
backward (Relu, LeakyRelu, PRelu, Elu, Clip, HardSwish) also zeroes negative incoming gradients.
pytorch-grad-cam's GuidedBackpropReLUModel guides only nn.ReLU modules: on models whose ReLUs are functional or
ReLU6 (Clip), its maps differ from the guided-everywhere ones here.
"""

from __future__ import annotations

import numpy as np

from ..explainer import Result
from .base import BaseCAM, as_numpy_input, degenerate_maps, input_name
from .cams import GradCAM


class GuidedBackprop(BaseCAM):
    """d score / d input through guided ReLUs, per sample: `gb(input_tensor, targets)` -> (N, H, W, C) float32."""

    guided = True

    def __init__(self, model, **options):
        super().__init__(model, None, None, **options)

    def _explainer_layers(self, proto, target_layers):
        return [input_name(proto)]

    def __call__(self, input_tensor, targets=None) -> np.ndarray:
        x = as_numpy_input(input_tensor)
        maps = self.gradients(self.run(x, targets), x)
        self._call.degenerate = degenerate_maps(maps, self.result, self.explainer.layers)
        return maps

    def gradients(self, r: Result, x: np.ndarray) -> np.ndarray:
        g = np.float32(r.gradients[self.explainer.layers[0]])
        return g if self._input_channels_last(x) else g.transpose(0, 2, 3, 1)


class GuidedBackpropReLUModel:
    """pytorch-grad-cam's GuidedBackpropReLUModel(model, device)(input_img, target_category) -> (H, W, C) of sample 0.

    target_category=None explains sample 0's top class. For batches, GuidedBackprop gives every sample's map.
    """

    def __init__(self, model, device=None, **options):
        device = "auto" if device is None else str(device).split(":")[0]
        self._guided = GuidedBackprop(model, device=device, **options)

    def forward(self, input_img):
        """The model's outputs (logits) for input_img."""
        return self._guided.explainer.run(as_numpy_input(input_img)).logits

    def __call__(self, input_img, target_category: int | None = None) -> np.ndarray:
        x = as_numpy_input(input_img)[:1]
        targets = None if target_category is None else [int(target_category)]
        return self._guided(x, targets)[0]


class GuidedGradCAM:
    """Guided Grad-CAM: the guided backprop map times the upsampled Grad-CAM map, per channel.

    `ggc(input_tensor, targets)` -> (N, H, W, C) float32, what pytorch-grad-cam's example computes as
    `cam_mask * gb` (pass it to deprocess_image for display). Two runs: the Grad-CAM one and the guided one.
    """

    def __init__(self, model, target_layers=None, reshape_transform=None, **options):
        self.gradcam = GradCAM(model, target_layers, reshape_transform, **options)
        self.guided = GuidedBackprop(self.gradcam.explainer, **options)  # shares the loaded model

    @property
    def target_layers(self) -> list[str]:
        return self.gradcam.target_layers

    @property
    def outputs(self):
        return self.gradcam.outputs

    @property
    def raw(self):
        return self.gradcam.raw

    @property
    def degenerate_reasons(self) -> list[str | None]:
        """Per sample of this thread's last call: why its map is all zero (Grad-CAM's or guided backprop's), or
        None."""
        return [cam or guided for cam, guided in zip(self.gradcam.degenerate_reasons, self.guided.degenerate_reasons)]

    @property
    def degenerate(self) -> np.ndarray:
        return np.array([why is not None for why in self.degenerate_reasons], bool)

    def __call__(self, input_tensor, targets=None, aug_smooth: bool = False, eigen_smooth: bool = False) -> np.ndarray:
        x = as_numpy_input(input_tensor)
        cam = self.gradcam(x, targets, aug_smooth=aug_smooth, eigen_smooth=eigen_smooth)
        return self.guided(x, targets) * cam[..., None]

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, exc_tb):
        return None
