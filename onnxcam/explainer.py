"""Explainer: one onnxruntime run gives the model's outputs, the target layers' activations and their gradients."""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np
import onnx

from . import rewrite
from .errors import InputError
from .graph.load import load_detached, with_weights
from .graph.model import ModelGraph
from .runtime import first_run_placement, gradient_fallbacks, session

log = logging.getLogger(__name__)

_CACHE: OrderedDict = OrderedDict()  # (digest, layers, score, shape, guided, device) -> _Compiled
_CACHE_SIZE = 8
_CACHE_LOCK = threading.Lock()
_ANALYSES: dict = {}  # (digest, layers, score, output, input_shape) -> what Explainer.__init__ resolved
_DIGESTS: dict = {}  # (path, size, mtime) -> model digest


def _digest_of(path) -> str | None:
    """The model digest of a file seen before (same path, size and mtime), else None."""
    try:
        st = os.stat(path)
    except OSError:
        return None  # loading reports the missing file clearly
    with _CACHE_LOCK:
        return _DIGESTS.get((os.path.realpath(path), st.st_size, st.st_mtime_ns))


def _remember_digest(path, digest: str) -> None:
    try:
        st = os.stat(path)
    except OSError:
        return
    with _CACHE_LOCK:
        _DIGESTS[(os.path.realpath(path), st.st_size, st.st_mtime_ns)] = digest


def _quantization(proto: onnx.ModelProto, mg: ModelGraph, layers: list[str]) -> tuple:
    """How the model is quantized, and the per-tensor (scale, zero point) of each integer layer."""
    from .autodiff.rules.qlinear import is_quantized, quantization_of

    kind = is_quantized(proto)
    found = {}
    for layer in layers if kind else []:
        dtype = mg.tensor(layer).dtype
        if dtype is not None and np.dtype(dtype).kind in "iu":
            q = quantization_of(proto, layer)
            if q is None or np.size(q[0]) != 1:
                log.warning("layer %r is an integer tensor without a per-tensor scale: reported raw", layer)
                continue
            found[layer] = (float(np.ravel(q[0])[0]), 0.0 if q[1] is None else float(np.ravel(q[1])[0]))
    return kind, found


def _analyse(mg: ModelGraph, layers, score, output, input_shape) -> tuple:
    """Resolve the names and the input contract once per model and request."""
    score_name = rewrite.resolve_score(mg, score, output)
    chosen = rewrite.resolve_layers(mg, layers, score_name)
    declared = mg.declared_input_shape or (None,) * len(mg.input_shape)
    static = input_shape is not None or all(isinstance(d, int) for d in declared[1:])
    # What x must look like: None marks a free dim (the batch, and dynamic sizes built per size).
    expect = (None,) + tuple(d if static else (d if isinstance(d, int) else None) for d in mg.input_shape[1:])
    dtype = mg.tensor(mg.input_name).dtype
    dtype = np.dtype(dtype) if dtype is not None and np.dtype(dtype).kind == "f" else np.dtype(np.float32)
    return mg.input_name, score_name, chosen, static, expect, mg.input_shape, dtype


@dataclass
class Result:
    """What one explain run returns; arrays are numpy, gradients are d(sum(seed * score)) / d(activation)."""

    logits: np.ndarray
    targets: np.ndarray
    activations: dict[str, np.ndarray]
    gradients: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    seed: np.ndarray | None = None
    quantized: str | None = None  # "qdq"/"qoperator": a quantized model, differentiated as its float equivalent

    def rank(self, k: int) -> Result:
        """The single-target result of the k-th of S targets per sample (targets (N, S)); views, no copies."""
        if self.targets.ndim != 2:
            raise InputError("this result has one target per sample; rank() selects from (N, S) targets")
        return Result(self.logits, self.targets[:, k], self.activations,
                      {layer: g[:, k] for layer, g in self.gradients.items()}, self.outputs,
                      None if self.seed is None else self.seed[:, k], self.quantized)


@dataclass
class _Compiled:
    rewritten: rewrite.Rewritten
    session: object
    build_seconds: float
    quantized: str | None = None  # "qdq" / "qoperator": differentiated as the dequantized float equivalent
    dequantize: dict = field(default_factory=dict)  # integer layer -> (scale, zero point)
    cpu_fallbacks: list | None = None  # CUDA: gradient nodes the first run computed on the CPU


class Explainer:
    """Differentiate a model's score with respect to chosen activations, in standard ONNX ops.

    model: a path (external data next to it loads), bytes, an onnx.ModelProto (left untouched), or another
        Explainer (its loaded model is shared, nothing is read again).
    layers: ONNX tensor names, or None for the last 4-D activation with spatial size > 1 before the score.
    score: a float tensor name, or None for the logits (the input of a final Softmax/LogSoftmax, if any).
    device: "auto" (CUDA when onnxruntime really runs there, else CPU), "cpu" or "cuda".
    output: which model output the default score follows, for models with several outputs.
    input_shape: the full input shape to build for when the model's spatial size is dynamic.
    """

    def __init__(self, model, layers=None, score=None, device: str = "auto", *, output: str | None = None,
                 input_shape: tuple[int, ...] | None = None, guided: bool = False):
        self._source = model
        self._proto: onnx.ModelProto | None = None  # a skeleton: large weights live in self._weights
        self._weights: dict | None = None  # released after each build: the session holds its own copy
        if isinstance(model, Explainer):
            self._source, self._proto, self._weights, self.digest = model._source, model._proto, model._weights, \
                model.digest
        elif isinstance(model, (str, os.PathLike)):
            self.digest = _digest_of(model)
            if self.digest is None:  # first sight of this file: read it once, keep what was read for the build
                self.digest = self._load()
                _remember_digest(model, self.digest)
        else:
            self.digest = self._load()
        self.device = device
        self.guided = guided
        self._graph_for_build = None
        key = (self.digest, None if layers is None else tuple([layers] if isinstance(layers, str) else layers),
               score, output, None if input_shape is None else tuple(input_shape))
        with _CACHE_LOCK:
            found = _ANALYSES.get(key)
        if found is None:
            mg = ModelGraph(self.proto, _guess_shape(self.proto, input_shape), self.weights)
            found = _analyse(mg, layers, score, output, input_shape)
            self._graph_for_build = mg  # reused by the first build, so the analysis is not done twice
            with _CACHE_LOCK:
                _ANALYSES[key] = found
        (self.input_name, self.score_name, self.layers, self._static, self._expect, self._input_shape,
         self._input_dtype) = found
        if self._static:
            self._compiled(self._input_shape)

    @property
    def proto(self) -> onnx.ModelProto:
        """The model without its large weights, read on first use: a second Explainer on an unchanged file
        builds nothing and reads nothing."""
        if self._proto is None:
            self._load()
        return self._proto

    @property
    def weights(self) -> dict:
        """{name: numpy array} of the model's large initializers (the proto holds placeholders for them),
        read again from the source when a build needs them after they were released."""
        if self._weights is None:
            self._load()
        return self._weights

    def _load(self) -> str:
        """Read the model once and hold each large weight once, as numpy (the proto keeps placeholders);
        returns the model digest."""
        self._proto, self._weights, digest = load_detached(self._source)
        return digest

    # ---- building ------------------------------------------------------------------------------------------
    def _compiled(self, shape: tuple, n_seeds: int = 1, by_class: bool = True) -> _Compiled:
        """The session for one input shape and seed form (class indices, or a dense seed for custom targets)."""
        key = (self.digest, tuple(self.layers), self.score_name, tuple(shape[1:]), self.guided, self.device, n_seeds,
               by_class)
        with _CACHE_LOCK:
            hit = _CACHE.get(key)
            if hit is not None:
                _CACHE.move_to_end(key)
                return hit
        start = time.perf_counter()
        mg = self._graph_for_build
        if mg is None or tuple(mg.input_shape[1:]) != tuple(shape[1:]):
            mg = ModelGraph(self.proto, shape, self.weights)
        self._graph_for_build = None  # the build mutates the graph; a second build re-reads the model
        rw = rewrite.build(mg, self.layers, self.score_name, guided=self.guided, n_seeds=n_seeds, by_class=by_class)
        sess = session(rw.model.SerializeToString(), self.device, rw.weights, watch_placement=True)
        compiled = _Compiled(rw, sess, time.perf_counter() - start, *_quantization(self.proto, mg, self.layers))
        # onnxruntime copied the weights: holding a second copy would double the memory of big models.
        rw.weights, mg.weights, self._weights = {}, {}, None
        log.debug("built the explainable model in %.3f s", compiled.build_seconds)
        with _CACHE_LOCK:
            _CACHE[key] = compiled
            while len(_CACHE) > _CACHE_SIZE:
                _CACHE.popitem(last=False)
        return compiled

    @property
    def explainable_model(self) -> onnx.ModelProto:
        """The rewritten model (original graph + activations and gradients as outputs), for inspection."""
        return with_weights(self._compiled(self._input_shape).rewritten.model, self.weights)



    def score_shape(self, input_shape: tuple | None = None) -> tuple:
        """The score's static shape (batch symbolic) for inputs of `input_shape` (needed for dynamic-size models)."""
        if input_shape is None and not self._static:
            raise InputError(f"input {self.input_name!r} has a dynamic size: give the input shape")
        return tuple(self._compiled(self._input_shape if self._static else tuple(input_shape)).rewritten.score_shape)

    @property
    def build_seconds(self) -> float:
        return self._compiled(self._input_shape).build_seconds

    @property
    def providers(self) -> list[str]:
        return self._compiled(self._input_shape).session.get_providers()

    @property
    def cpu_fallbacks(self) -> list[str] | None:
        """On CUDA, after a run: the gradient nodes onnxruntime computed on the CPU ("name (OpType)"; [] when none).
        None on the CPU or before the first run."""
        return self._compiled(self._input_shape).cpu_fallbacks

    # ---- running -------------------------------------------------------------------------------------------
    def run(self, x: np.ndarray, targets=None, *, top_k: int | None = None, seed: np.ndarray | None = None) -> Result:
        """Explain a preprocessed batch `x` (float32, the model's own layout) in one onnxruntime run.

        targets: None (each sample's top class), one int for all samples, one int per sample, or an (N, S)
            array of S classes per sample.
        top_k: explain each sample's k best classes at once (instead of targets).
        seed: instead of targets, any weighting of the score, shaped like it (N, K, ...).
        With S > 1 targets per sample, gradients are (N, S, ...) and targets (N, S).
        """
        x = self._check_input(x)
        n = x.shape[0]
        plan = _Plan.make(targets, top_k, seed, n)
        compiled = self._compiled(self._input_shape if self._static else x.shape, plan.n_seeds, plan.seed is None)
        rw = compiled.rewritten
        if rw.fixed_batch and n > 1 and self._input_shape[0] == 1:
            return _concat([self._run_one(compiled, x[i:i + 1], plan.sample(i)) for i in range(n)])
        return self._run_one(compiled, x, plan)

    def _run_one(self, compiled: _Compiled, x, plan: _Plan) -> Result:
        rw = compiled.rewritten
        n = x.shape[0]
        score_shape = tuple(n if not isinstance(d, int) else d for d in rw.score_shape)
        feeds = {rw.input_name: x, **plan.feeds(score_shape, rw)}
        names = list(rw.original_outputs)
        if rw.score not in names:
            names.append(rw.score)
        names += [n for n in (rw.act_outputs[layer] for layer in rw.layers) if n not in names]
        if rw.has_ranking:
            names.append(rewrite.TOP_CLASSES)
        for layer in rw.layers:
            names.append(rewrite.grad_name(layer))
        values = dict(zip(names, compiled.session.run(names, feeds)))
        _check_placement(compiled)
        if plan.ranked:
            classes = values[rewrite.TOP_CLASSES]
        elif plan.classes is not None:
            classes = plan.classes
        else:
            seeds = plan.seed[:, None]
            classes = np.argmax(seeds.reshape(n, plan.n_seeds, -1), axis=2) if seeds.ndim == 3 else \
                np.full((n, plan.n_seeds), -1)
        if plan.seed is None:
            seeds = _one_hot_rows(classes, score_shape)
        squeeze = plan.single
        acts = {layer: values[rw.act_outputs[layer]] for layer in rw.layers}
        grads = {layer: values[rewrite.grad_name(layer)] for layer in rw.layers}
        if rw.n_seeds == 1:  # the graph leaves out the seed axis when there is one seed
            grads = {layer: g[:, None] for layer, g in grads.items()}
        for layer, (scale, zero) in compiled.dequantize.items():
            # Integer layers are reported as the real values they stand for: d/d(real) = d/dq / scale.
            acts[layer] = ((acts[layer].astype(np.float32) - zero) * scale).astype(np.float32)
            grads[layer] = (grads[layer] / scale).astype(np.float32)
        return Result(
            logits=values[rw.score],
            targets=np.asarray(classes[:, 0] if squeeze else classes, dtype=np.int64),
            activations=acts,
            gradients={layer: g[:, 0] if squeeze else g for layer, g in grads.items()},
            outputs={k: values[k] for k in rw.original_outputs},
            seed=seeds[:, 0] if squeeze else seeds,
            quantized=compiled.quantized,
        )

    def _check_input(self, x) -> np.ndarray:
        if not isinstance(x, np.ndarray):
            raise InputError(f"x must be a numpy array, not {type(x).__name__}")
        if x.dtype != self._input_dtype:
            if not np.issubdtype(x.dtype, np.number):
                raise InputError(f"x must be a float array ({self._input_dtype}), not {x.dtype}")
            x = x.astype(self._input_dtype)  # e.g. fp16 models take fp16 inputs
        want = self._expect
        if x.ndim != len(want) or any(d is not None and d != got for d, got in zip(want, x.shape)):
            raise InputError(f"input {self.input_name!r} expects shape {_fmt(want)}; got {x.shape}")
        if x.shape[0] < 1:
            raise InputError("x has an empty batch")
        return np.ascontiguousarray(x)


@dataclass
class _Plan:
    """What to differentiate in one run: S seeds per sample, given or ranked in-graph."""

    n_seeds: int
    ranked: bool
    single: bool  # results keep the (N, ...) shapes of one target per sample
    classes: np.ndarray | None = None  # (N, S) explicit classes
    seed: np.ndarray | None = None     # (N, K, ...) explicit weighting

    @staticmethod
    def make(targets, top_k, seed, n: int) -> _Plan:
        given = [name for name, v in (("targets", targets), ("top_k", top_k), ("seed", seed)) if v is not None]
        if len(given) > 1:
            raise InputError(f"give only one of targets, top_k and seed (got {', '.join(given)})")
        if seed is not None:
            return _Plan(1, False, True, seed=np.asarray(seed, np.float32))
        if top_k is not None:
            if not isinstance(top_k, (int, np.integer)) or top_k < 1:
                raise InputError(f"top_k must be a positive int, not {top_k!r}")
            return _Plan(int(top_k), True, False)
        if targets is None:
            return _Plan(1, True, True)
        classes = _target_classes(targets, n)
        return _Plan(classes.shape[1], False, classes.shape[1] == 1 and np.ndim(targets) < 2, classes=classes)

    def feeds(self, score_shape: tuple, rw: rewrite.Rewritten) -> dict:
        """The seed inputs of the built graph: class indices, or the dense seed (custom targets)."""
        n = score_shape[0]
        if self.seed is not None:
            if self.seed.shape != score_shape:
                raise InputError(f"seed must have the score's shape {score_shape}, got {self.seed.shape}")
            feeds = {rewrite.SEED: self.seed[:, None]}
            return {**feeds, rewrite.RANKED: np.array(False)} if rw.has_ranking else feeds
        if not rw.has_ranking:
            raise InputError(f"the score is not (N, K) but {score_shape}: give a seed shaped like it")
        if self.ranked:
            return {rewrite.CLASSES: np.zeros((n, self.n_seeds), np.int64), rewrite.RANKED: np.array(True)}
        bad = self.classes[(self.classes < 0) | (self.classes >= score_shape[1])]
        if bad.size:
            raise InputError(f"target class {int(bad[0])} is out of range: the score has {score_shape[1]} classes "
                             f"(0..{score_shape[1] - 1})")
        return {rewrite.CLASSES: self.classes, rewrite.RANKED: np.array(False)}

    def sample(self, i: int) -> _Plan:
        pick = (lambda a: None if a is None else a[i:i + 1])
        return _Plan(self.n_seeds, self.ranked, self.single, pick(self.classes), pick(self.seed))


def _check_placement(compiled: _Compiled) -> None:
    """On CUDA, once per compiled graph: warn about gradient nodes that onnxruntime left on the CPU."""
    placed = first_run_placement(compiled.session)
    if placed is None:
        return
    compiled.cpu_fallbacks = gradient_fallbacks(placed)
    if compiled.cpu_fallbacks:
        log.warning("onnxruntime runs %d gradient nodes on the CPU instead of CUDA, each a copy per run: %s",
                    len(compiled.cpu_fallbacks), ", ".join(compiled.cpu_fallbacks))


def _target_classes(targets, n: int) -> np.ndarray:
    """targets as an (N, S) int array; validates the count against the batch."""
    if isinstance(targets, (bool, np.bool_)):
        raise InputError(f"targets must be None, an int, or one int per sample; got {targets!r}")
    if isinstance(targets, (int, np.integer)):
        return np.full((n, 1), int(targets), np.int64)
    classes = np.asarray(targets)
    if classes.ndim not in (1, 2) or classes.size == 0 or not np.issubdtype(classes.dtype, np.integer):
        raise InputError(f"targets must be None, an int, one int per sample or (N, S) ints; got {targets!r}")
    if len(classes) != n:
        raise InputError(f"got {len(classes)} targets for a batch of {n} samples")
    return classes.reshape(n, -1).astype(np.int64)


def _one_hot_rows(classes: np.ndarray, score_shape) -> np.ndarray:
    """(N, S) classes -> (N, S, K) one-hot seeds."""
    classes = np.asarray(classes).reshape(len(classes), -1)
    n, s = classes.shape
    seeds = np.zeros((n * s, score_shape[1]), np.float32)
    seeds[np.arange(n * s), classes.ravel()] = 1.0
    return seeds.reshape(n, s, score_shape[1])


def _concat(parts: list[Result]) -> Result:
    cat = np.concatenate
    return Result(
        logits=cat([p.logits for p in parts]), targets=cat([p.targets for p in parts]),
        activations={k: cat([p.activations[k] for p in parts]) for k in parts[0].activations},
        gradients={k: cat([p.gradients[k] for p in parts]) for k in parts[0].gradients},
        outputs={k: cat([p.outputs[k] for p in parts]) for k in parts[0].outputs},
        seed=cat([p.seed for p in parts]), quantized=parts[0].quantized)


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
