"""onnxcam's exceptions: every message names the node, tensor or value that was wrong."""

from __future__ import annotations


class OnnxCamError(Exception):
    """Base class of every error onnxcam raises on purpose."""


class ModelError(OnnxCamError):
    """The model cannot be read, or is not a model onnxcam can explain."""


class UnsupportedOpError(OnnxCamError):
    """An op on the gradient path has no gradient rule (or an unsupported form)."""


class LayerError(OnnxCamError, ValueError):
    """A layer or score name does not exist or does not reach the score."""


class InputError(OnnxCamError, ValueError):
    """An input array, target or option is malformed."""


class DeviceError(OnnxCamError):
    """The requested execution device cannot be used."""
