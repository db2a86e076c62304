"""onnxcam's exceptions: every message names the node, tensor or value that was wrong."""

from __future__ import annotations


class OnnxCamError(Exception):
    """Base class of every error onnxcam raises on purpose. `option`: the parameter that fixes it, if one does
    ("size", "layout", "bgr", "out"): the CLI names its flag, library messages never do."""

    def __init__(self, *args, option: str | None = None):
        super().__init__(*args)
        self.option = option


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


class InternalError(OnnxCamError):
    """onnxcam emitted an invalid graph: a bug in onnxcam, not in the model. Names who emitted the bad node."""

    def __init__(self, problem: str, node: str | None = None, op: str | None = None, rule: str | None = None):
        self.node, self.op, self.rule = node, op, rule
        who = f"the {op} node {node!r} by rule {rule}" if node is not None else "onnxcam"
        super().__init__(f"internal error (an onnxcam bug, please report it): the gradient nodes emitted for {who} "
                         f"are invalid: {problem}")


class NumericalError(OnnxCamError, ArithmeticError):
    """Non-finite values (NaN, Inf) in the input, the score, an activation or a gradient; names which and where."""


class ImageTooLargeError(InputError):
    """An image has more pixels than the limit (read from its header: it is refused before decoding)."""
