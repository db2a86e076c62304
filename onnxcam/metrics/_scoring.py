"""Running a model plainly (no gradients) on batches of perturbed inputs, and reading targets off its output.

One onnxruntime session per model, built once from the model's weights as onnxcam loaded them; inputs are scored
in chunks of batch_size (one at a time for models exported with a batch of 1)."""

from __future__ import annotations

import logging

import numpy as np
import onnx

from ..cam.targets import ClassifierOutputTarget, _numpy, as_target
from ..errors import InputError, ModelError
from ..explainer import Explainer
from ..graph.evaluate import runtime_failure
from ..graph.inputs import model_inputs
from ..graph.load import load_detached
from ..runtime import session

log = logging.getLogger(__name__)


class ModelScorer:
    """A model's output on numpy inputs, through one plain onnxruntime session.

    model: an Explainer (its loaded model is shared), a path, bytes or onnx.ModelProto, or a CAM object (its
        Explainer's model).
    output: the tensor whose values the targets read; None: the model's first output (pytorch-grad-cam's metrics
        read the model's output too: for a model ending in a Softmax, the probabilities). Any tensor name works.
    """

    def __init__(self, model, *, output: str | None = None, device: str = "cpu", batch_size: int = 32,
                 base_dir=None):
        check_positive(batch_size, "batch_size")
        model = getattr(model, "explainer", model)  # a CAM object
        if isinstance(model, Explainer):
            proto, weights = model.proto, model.weights
        else:
            proto, weights, _ = load_detached(model, base_dir)
        graph = proto.graph
        inputs = model_inputs(proto)
        if len(inputs) != 1:
            raise ModelError(f"the metrics run models with one input; this one has {[i.name for i in inputs]}")
        self.input_name = inputs[0].name
        dims = inputs[0].type.tensor_type.shape.dim
        self.batch_size = 1 if dims and dims[0].HasField("dim_value") and dims[0].dim_value == 1 else batch_size
        self.output = output or graph.output[0].name
        if self.output not in {o.name for o in graph.output}:
            proto = _with_output(proto, self.output)
        self._session = session(proto.SerializeToString(), device, weights)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """The output for a batch x (N, ...), run in chunks of batch_size."""
        x = np.ascontiguousarray(x, np.float32)
        parts = []
        for start in range(0, len(x), self.batch_size):
            try:
                parts.append(self._session.run([self.output], {self.input_name: x[start:start + self.batch_size]})[0])
            except Exception as exc:  # onnxruntime's own error types
                raise InputError(f"input {self.input_name!r} of shape {x.shape}: the model failed on it: "
                                 f"{runtime_failure(exc)}") from exc
        return np.concatenate(parts)


def scorer(model, **options) -> ModelScorer:
    """model as a ModelScorer (given one, itself)."""
    return model if isinstance(model, ModelScorer) else ModelScorer(model, **options)


class UsesModel:
    """Metrics that take the model at each call keep the session of the last model they saw."""

    _model = None
    _scorer: ModelScorer | None = None

    def scorer_for(self, model) -> ModelScorer:
        if isinstance(model, ModelScorer):
            return model
        same = self._model is model or (isinstance(model, str) and model == self._model)
        if not same or self._scorer is None:
            self._scorer, self._model = ModelScorer(model), model
        return self._scorer


def as_input(x, what: str = "input_tensor") -> np.ndarray:
    """A torch tensor or array -> float32 numpy (N, C, H, W)."""
    x = np.asarray(_numpy(x), np.float32)
    if x.ndim != 4:
        raise InputError(f"{what} must be a batch (N, C, H, W), not an array of shape {x.shape}")
    return x


def as_cams(cams, x: np.ndarray) -> np.ndarray:
    """The maps (N, H, W), one per input of x at its spatial size."""
    cams = np.asarray(_numpy(cams), np.float32)
    if cams.shape != (x.shape[0], *x.shape[2:]):
        raise InputError(f"cams must be (N, H, W) = {(x.shape[0], *x.shape[2:])} to match the input, "
                         f"not {cams.shape}")
    return cams


def target_list(targets, outputs: np.ndarray) -> list:
    """One numpy target per sample; None: each sample's top class (pytorch-grad-cam requires targets)."""
    n = len(outputs)
    if targets is None:
        return [ClassifierOutputTarget(int(np.argmax(o))) for o in outputs.reshape(n, -1)]
    targets = list(targets)
    if len(targets) != n:
        raise InputError(f"{len(targets)} targets for a batch of {n}: give one target per sample")
    return [as_target(t) for t in targets]


def target_scores(targets: list, outputs: np.ndarray) -> np.ndarray:
    """float32 target(output) per sample, stacked, as pytorch-grad-cam does (repeating the list over `outputs`
    when it holds several perturbed copies of the batch, copy after copy)."""
    n = len(targets)
    return np.float32([targets[i % n](o) for i, o in enumerate(outputs)])


def check_positive(value, what: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value <= 0:
        raise InputError(f"{what} must be a positive integer, not {value!r}")


def _with_output(proto: onnx.ModelProto, name: str) -> onnx.ModelProto:
    """A copy of the skeleton that also outputs tensor `name` (its type from the graph's value_info, else float)."""
    produced = {o for node in proto.graph.node for o in node.output}
    if name not in produced:
        raise InputError(f"output {name!r} is not a tensor of this model (outputs: "
                         f"{[o.name for o in proto.graph.output]})")
    copy = onnx.ModelProto()
    copy.CopyFrom(proto)
    known = {vi.name: vi for vi in copy.graph.value_info}
    vi = known.get(name) or onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None)
    copy.graph.output.append(vi)
    return copy
