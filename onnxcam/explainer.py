"""Explainer: one onnxruntime run gives the model's outputs, the target layers' activations and their gradients."""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import rewrite
from .errors import InputError
from .graph.load import load_model, model_digest
from .graph.model import ModelGraph
from .runtime import session

log = logging.getLogger(__name__)

_CACHE: OrderedDict = OrderedDict()  # (digest, layers, score, shape, guided, device) -> _Compiled
_CACHE_SIZE = 8
_CACHE_LOCK = threading.Lock()


@dataclass
class Result:
    """What one explain run returns; arrays are numpy, gradients are d(sum(seed * score)) / d(activation)."""

    logits: np.ndarray
    targets: np.ndarray
    activations: dict[str, np.ndarray]
    gradients: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    seed: np.ndarray | None = None


@dataclass
class _Compiled:
    rewritten: rewrite.Rewritten
    session: object
    build_seconds: float


class Explainer:
    """Differentiate a model's score with respect to chosen activations, in standard ONNX ops.

    model: a path (external data next to it loads), bytes or an onnx.ModelProto.
    layers: ONNX tensor names, or None for the last 4-D activation with spatial size > 1 before the score.
    score: a float tensor name, or None for the logits (the input of a final Softmax/LogSoftmax, if any).
    device: "auto" (CUDA when onnxruntime really runs there, else CPU), "cpu" or "cuda".
    output: which model output the default score follows, for models with several outputs.
    input_shape: the full input shape to build for when the model's spatial size is dynamic.
    """

    def __init__(self, model, layers=None, score=None, device: str = "auto", *, output: str | None = None,
                 input_shape: tuple[int, ...] | None = None, guided: bool = False):
        self.proto: onnx.ModelProto = load_model(model)
        self.digest = model_digest(self.proto)
        self.device = device
        self.guided = guided
        mg = ModelGraph(self.proto, _guess_shape(self.proto, input_shape))
        self.input_name = mg.input_name
        self.score_name = rewrite.resolve_score(mg, score, output)
        self.layers = rewrite.resolve_layers(mg, layers, self.score_name)
        declared = mg.declared_input_shape or (None,) * len(mg.input_shape)
        self._static = input_shape is not None or all(isinstance(d, int) for d in declared[1:])
        # What x must look like: None marks a free dim (the batch, and dynamic sizes built per size).
        self._expect = (None,) + tuple(d if self._static else (d if isinstance(d, int) else None)
                                       for d in mg.input_shape[1:])
        self._input_shape = mg.input_shape
        self._graph_for_build = mg  # reused by the first build, so the analysis is not done twice
        if self._static:
            self._compiled(mg.input_shape)

    # ---- building ------------------------------------------------------------------------------------------
    def _compiled(self, shape: tuple) -> _Compiled:
        key = (self.digest, tuple(self.layers), self.score_name, tuple(shape[1:]), self.guided, self.device)
        with _CACHE_LOCK:
            hit = _CACHE.get(key)
            if hit is not None:
                _CACHE.move_to_end(key)
                return hit
        start = time.perf_counter()
        mg = self._graph_for_build
        if mg is None or tuple(mg.input_shape[1:]) != tuple(shape[1:]):
            mg = ModelGraph(self.proto, shape)
        self._graph_for_build = None  # the build mutates the graph; a second build re-reads the model
        rw = rewrite.build(mg, self.layers, self.score_name, guided=self.guided)
        sess = session(rw.model.SerializeToString(), self.device, rw.initializer_arrays())
        compiled = _Compiled(rw, sess, time.perf_counter() - start)
        log.debug("built the explainable model in %.3f s", compiled.build_seconds)
        with _CACHE_LOCK:
            _CACHE[key] = compiled
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        return compiled

    @property
    def explainable_model(self) -> onnx.ModelProto:
        """The rewritten model (original graph + activations and gradients as outputs), for inspection."""
        return self._compiled(self._input_shape).rewritten.full_model()

    @property
    def providers(self) -> list[str]:
        return self._compiled(self._input_shape).session.get_providers()

    # ---- running -------------------------------------------------------------------------------------------
    def run(self, x: np.ndarray, targets=None, *, seed: np.ndarray | None = None) -> Result:
        """Explain a preprocessed batch `x` (float32, the model's own layout).

        targets: None (each sample's top class), one int for all samples, or one int per sample.
        seed: instead of targets, any weighting of the score, shaped like it (N, K, ...).
        """
        x = self._check_input(x)
        compiled = self._compiled(self._input_shape if self._static else x.shape)
        rw = compiled.rewritten
        n = x.shape[0]
        if rw.fixed_batch and n > 1 and self._input_shape[0] == 1:
            parts = [self._run_one(compiled, x[i:i + 1], *_split_targets(targets, seed, i)) for i in range(n)]
            return _concat(parts)
        return self._run_one(compiled, x, targets, seed)

    def _run_one(self, compiled: _Compiled, x, targets, seed) -> Result:
        rw = compiled.rewritten
        n = x.shape[0]
        score_shape = tuple(n if not isinstance(d, int) else d for d in rw.score_shape)
        feeds = {rw.input_name: x}
        top1 = False
        if seed is not None:
            seed = np.asarray(seed, dtype=np.float32)
            if seed.shape != score_shape:
                raise InputError(f"seed must have the score's shape {score_shape}, got {seed.shape}")
        elif targets is None:
            if not rw.has_top1:
                raise InputError(f"the score {rw.score!r} is not (N, K): give a seed shaped like it")
            seed, top1 = np.zeros(score_shape, np.float32), True
        else:
            seed = one_hot(targets, n, score_shape)
        feeds[rewrite.SEED] = seed
        if rw.has_top1:
            feeds[rewrite.TOP1] = np.array(top1)
        names = list(rw.original_outputs)
        if rw.score not in names:
            names.append(rw.score)
        if rw.has_top1:
            names.append(rewrite.TOP1_CLASS)
        for layer in rw.layers:
            names += [rewrite.act_name(layer), rewrite.grad_name(layer)]
        values = dict(zip(names, compiled.session.run(names, feeds)))
        logits = values[rw.score]
        chosen = values[rewrite.TOP1_CLASS] if top1 else (
            np.argmax(seed.reshape(n, -1), axis=1) if seed.ndim == 2 else np.full(n, -1))
        return Result(
            logits=logits,
            targets=np.asarray(chosen, dtype=np.int64),
            activations={layer: values[rewrite.act_name(layer)] for layer in rw.layers},
            gradients={layer: values[rewrite.grad_name(layer)] for layer in rw.layers},
            outputs={k: values[k] for k in rw.original_outputs},
            seed=seed if not top1 else _one_hot_rows(values[rewrite.TOP1_CLASS], score_shape),
        )

    def _check_input(self, x) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise InputError(f"x must be a numpy array, not {type(x).__name__}")
        if x.dtype != np.float32:
            if not np.issubdtype(x.dtype, np.number):
                raise InputError(f"x must be float32, not {x.dtype}")
            x = x.astype(np.float32)
        want = self._expect
        if x.ndim != len(want) or any(d is not None and d != got for d, got in zip(want, x.shape)):
            raise InputError(f"input {self.input_name!r} expects shape {_fmt(want)}; got {x.shape}")
        if x.shape[0] < 1:
            raise InputError("x has an empty batch")
        return np.ascontiguousarray(x)


def one_hot(targets, n: int, score_shape: tuple) -> np.ndarray:
    """Seed rows selecting one class per sample; validates the targets against the batch and the classes."""
    if len(score_shape) != 2:
        raise InputError(f"class targets need an (N, K) score; this score has shape {score_shape}: give a seed")
    k = score_shape[1]
    if isinstance(targets, (int, np.integer)):
        classes = np.full(n, int(targets), np.int64)
    else:
        classes = np.asarray(list(targets) if not isinstance(targets, np.ndarray) else targets)
        if classes.ndim != 1 or not np.issubdtype(classes.dtype, np.integer):
            raise InputError(f"targets must be None, an int, or one int per sample; got {targets!r}")
        if len(classes) != n:
            raise InputError(f"got {len(classes)} targets for a batch of {n} samples")
    bad = classes[(classes < 0) | (classes >= k)]
    if bad.size:
        raise InputError(f"target class {int(bad[0])} is out of range: the score has {k} classes (0..{k - 1})")
    return _one_hot_rows(classes, score_shape)


def _one_hot_rows(classes, score_shape) -> np.ndarray:
    seed = np.zeros((len(classes), score_shape[1]), np.float32)
    seed[np.arange(len(classes)), classes] = 1.0
    return seed


def _split_targets(targets, seed, i):
    if seed is not None:
        return None, seed[i:i + 1]
    if targets is None or isinstance(targets, (int, np.integer)):
        return targets, None
    return [list(targets)[i]], None


def _concat(parts: list[Result]) -> Result:
    cat = np.concatenate
    return Result(
        logits=cat([p.logits for p in parts]), targets=cat([p.targets for p in parts]),
        activations={k: cat([p.activations[k] for p in parts]) for k in parts[0].activations},
        gradients={k: cat([p.gradients[k] for p in parts]) for k in parts[0].gradients},
        outputs={k: cat([p.outputs[k] for p in parts]) for k in parts[0].outputs},
        seed=cat([p.seed for p in parts]))


def _guess_shape(proto: onnx.ModelProto, given):
    """For models with a dynamic spatial size: the given shape, else 224 for the layer choice (built per size)."""
    if given is not None:
        return tuple(given)
    init = {t.name for t in proto.graph.initializer}
    for inp in proto.graph.input:
        if inp.name in init:
            continue
        dims = inp.type.tensor_type.shape.dim
        shape = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        if any(d is None for d in shape[1:]):
            return tuple([1] + [d if d is not None else 224 for d in shape[1:]])
        return None
    return None


def _fmt(shape) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else "?" for d in shape) + ")"
