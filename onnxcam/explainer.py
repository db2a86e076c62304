"""Explainer: one onnxruntime run gives the model's outputs, the target layers' activations and their gradients."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field, replace

import numpy as np
import onnx

from . import rewrite, runtime
from .cache import CACHE
from .errors import InputError, LayerError, ModelError, NumericalError
from .graph.evaluate import runtime_failure
from .graph.inputs import BATCH
from .graph.load import LoadedModel, with_weights
from .graph.model import ModelGraph
from .runtime import first_run_placement, gradient_fallbacks, session

log = logging.getLogger(__name__)

def _quantization(proto: onnx.ModelProto, mg: ModelGraph, layers: list[str]) -> tuple:
    """How the model is quantized, and the per-tensor (scale, zero point) of each integer layer."""
    from .graph.quant import is_quantized, quantization_of

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


@dataclass(frozen=True)
class Analysis:
    """What an Explainer resolves once per model and request, without running the model at any size: the names it
    explains and the input contract x must meet (Explainer.analysis; shared through onnxcam.cache)."""

    input_name: str
    score: str
    layers: tuple | None     # None: the automatic choice, made at the size of the first run (dynamic-size models)
    build_shape: tuple | None  # the one input shape built for (every dim known, or input_shape=); None: x's own
    expect: tuple | None     # the dims x must have (None: free); None when the input declares no shape at all
    dtype: np.dtype
    fixed_batch: int | None  # the batch the model declares, if it fixes one


def _analyse(mg: ModelGraph, layers, score, output) -> Analysis:
    """Resolve the names and the input contract. `mg` is shaped at the build size when there is one, else
    symbolically (shape inference only): names and the score need no sizes, the automatic layer choice does."""
    score_name = rewrite.resolve_score(mg, score, output)
    shape = mg.input_shape
    static = shape is not None and all(isinstance(d, int) for d in shape[1:])
    chosen = rewrite.resolve_layers(mg, layers, score_name) if static or layers is not None else None
    expect = None if shape is None else (None,) + tuple(shape[1:])
    dtype = _numpy_type(mg.tensor(mg.input_name).dtype)
    fixed = shape[0] if shape is not None and isinstance(shape[0], int) else None
    return Analysis(mg.input_name, score_name, None if chosen is None else tuple(chosen),
                    tuple(shape) if static else None, expect, dtype, fixed)


@dataclass
class Result:
    """What one explain run returns (Explainer.run); arrays are numpy.

    logits: the score (N, K) (or the score's own shape), as the model computes it.
    targets: (N,) class per sample, or (N, S) for S targets per sample (top_k, (N, S) targets); -1 where a dense
        seed had no single class.
    activations: layer -> the layer's activations (N, ...), in real units for integer layers of quantized models.
    gradients: layer -> d(sum(seed * score)) / d(activation), shaped like the activations ((N, S, ...) for S targets).
    outputs: the model's own outputs by name. seed: the weighting of the score that was differentiated.
    quantized: "qdq"/"qoperator" for a quantized model, differentiated as its dequantized float equivalent.
    """

    logits: np.ndarray
    targets: np.ndarray
    activations: dict[str, np.ndarray]
    gradients: dict[str, np.ndarray]
    outputs: dict[str, np.ndarray] = field(default_factory=dict)
    seed: np.ndarray | None = None
    quantized: str | None = None

    def rank(self, k: int) -> Result:
        """The single-target result of the k-th of S targets per sample (targets (N, S)); views, no copies."""
        if self.targets.ndim != 2:
            raise InputError("this result has one target per sample; rank() selects from (N, S) targets")
        return Result(self.logits, self.targets[:, k], self.activations,
                      {layer: g[:, k] for layer, g in self.gradients.items()}, self.outputs,
                      None if self.seed is None else self.seed[:, k], self.quantized)


@dataclass
class Compiled:
    """One built explainable model (Explainer.compiled): the rewrite, its onnxruntime session, what it cost."""

    rewritten: rewrite.Rewritten
    session: object
    build_seconds: float
    quantized: str | None = None  # "qdq" / "qoperator": differentiated as the dequantized float equivalent
    dequantize: dict = field(default_factory=dict)  # integer layer -> (scale, zero point)
    cpu_fallbacks: list | None = None  # CUDA: gradient nodes the first run computed on the CPU



def _session_config() -> tuple:
    """runtime.SESSION_CONFIG as a cache key part: sessions built with other onnxruntime options are others."""
    return tuple(sorted(runtime.SESSION_CONFIG.items()))


class Explainer:
    """Differentiate a model's score with respect to chosen activations, in standard ONNX ops.

    model: a path (external data next to it loads), bytes, an onnx.ModelProto (left untouched), a
        graph.load.LoadedModel, or another Explainer (its loaded model is shared, nothing is read again).
    layers: ONNX tensor names, or None for the last 4-D activation with spatial size > 1 before the score.
    score: a float tensor name, or None for the logits (the input of a final Softmax/LogSoftmax, if any).
    device: "auto" (CUDA when onnxruntime really runs there, else CPU), "cpu" or "cuda".
    output: which model output the default score follows, for models with several outputs.
    input_shape: the one input shape to build for (its batch is free), for models whose size is dynamic.
    guided: differentiate with guided-backpropagation ReLUs.
    apart: each layer's gradient only along the paths to the score that cross no other layer (rewrite.build): a
        multi-scale detector's per-scale layers (tasks/choose.py scale_layers), where a detection's gradient is then
        exact at its own scale's layer and zero at the others, without the neck crossing between them.
    base_dir: the folder holding the external data of a model given as bytes or a ModelProto.
    build: build a static-size model's session now (False: at the first run or compiled() call).
    input_name: the input explained, for models with side inputs (an image plus im_info, a scale or a prompt
        embedding); None: the first input. Inherited from an Explainer given as the model.
    extra_inputs: {name: array} for the other inputs, fed to every run (run()'s extra_inputs add or replace them);
        a value with batch 1 is repeated over a batch when its input's batch is free. Inherited like input_name.
    share_forward: a batch of copies of one sample with a dense seed each (several targets of one image, as
        `onnxcam explain` runs a picture's items) runs that sample's forward once and the backward of every seed
        over it (rewrite.build shared=: the same gradients), where the graph allows it (else, logged at INFO, the
        copies run); a one-sample run then also takes that model (one build for both). False by default: the
        copies' check and the Expands cost a plain run a few percent.

    The model is read once (graph/load.py LoadedModel): its skeleton stays, its large weights are dropped after
    each build, since onnxruntime holds its own copy. Anything that needs them later (a build at another size,
    explainable_model, export, the gradient-free CAMs' plain sessions) reads them again from the source, logged at
    INFO: a model file that changed meanwhile is then a ModelError. Built sessions and analyses are shared by
    every Explainer of the same model through onnxcam.cache (onnxcam.cache.clear(), .configure()).

    A model whose spatial size is dynamic is built for the size of each input that arrives (once per size, cached);
    the constructor never runs it at a guessed size. With layers=None such a model's layer is chosen at the size of
    the first run and kept for later sizes: `layers` is known after that run (or at once with input_shape=).
    `explainable_model`, `build_seconds` and `cpu_fallbacks` then describe the last size run (`explainable_model_at`
    and `score_shape` take a size). Explainers are safe to share between threads.
    """

    def __init__(self, model, layers: str | list[str] | None = None, score: str | None = None, device: str = "auto",
                 *, output: str | None = None, input_shape: tuple[int, ...] | None = None, guided: bool = False,
                 apart: bool = False, base_dir=None, build: bool = True, input_name: str | None = None,
                 extra_inputs: dict | None = None, share_forward: bool = False):
        if isinstance(model, Explainer):
            self._model = model._model
            input_name = model._input_choice if input_name is None else input_name
            extra_inputs = model.extra_inputs if extra_inputs is None else extra_inputs
        else:
            self._model = LoadedModel.of(model, base_dir)
        self.digest: str = self._model.digest
        self.device = device
        self.guided = guided
        self.apart = bool(apart)
        self.share_forward = bool(share_forward)
        self._unshared: set = set()  # input shapes whose graph cannot share one forward between seeds
        self._freed: onnx.ModelProto | None = None  # a batch-1 export with its batch freed (free_batch)
        self._kept_batch = False  # free_batch was tried and refused
        self._batch_1_analysis: Analysis | None = None  # the analysis before free_batch (for _keep_batch)
        self._plain: tuple | None = None  # (model freed?, its outputs, the plain session: plain_session())
        self._graph_for_build = None
        self._lock = threading.RLock()  # one build at a time per Explainer: builds share the loaded model
        self._last_shape: tuple | None = None  # the input shape of the last run (dynamic sizes)
        self._input_choice = input_name
        self.extra_inputs: dict = dict(extra_inputs or {})
        key = (self.digest, input_name, None if layers is None else tuple([layers] if isinstance(layers, str) else layers),
               score, output, None if input_shape is None else tuple(input_shape))

        def analyse() -> Analysis:
            mg = self._model.take_graph(input_shape, input_name) or ModelGraph(self.proto, input_shape, self.weights,
                                                                                input_name)
            found = _analyse(mg, layers, score, output)
            if found.build_shape is not None and build:
                self._graph_for_build = mg  # reused by the first build, so the analysis is not done twice
            return found

        self._analysis = CACHE.get_or_build("analyses", key, analyse)
        self.input_name, self.score_name = self._analysis.input_name, self._analysis.score
        self._layers = None if self._analysis.layers is None else list(self._analysis.layers)
        if self._analysis.build_shape is not None and build and not share_forward:
            self._compiled(self._analysis.build_shape)

    @property
    def layers(self) -> list[str]:
        """The target layers as tensor names (for dynamic-size models with layers=None: after the first run)."""
        if self._layers is None:
            raise InputError(f"input {self.input_name!r} has a dynamic size: the automatic layer is chosen at the size "
                             "of the first run; run the explainer once, or give layers or input_shape")
        return list(self._layers)

    @property
    def analysis(self) -> Analysis:
        """The resolved input name, score, layers and the input contract (shape, dtype, fixed batch)."""
        return self._analysis

    @property
    def loaded(self) -> LoadedModel:
        """The one loaded model (skeleton, weights, digest) this Explainer and the ones made from it share."""
        return self._model

    @property
    def proto(self) -> onnx.ModelProto:
        """The model's skeleton: the whole graph and metadata, with placeholders for the large weights. Read on first
        use: a second Explainer on an unchanged file whose build is cached reads nothing. After free_batch freed a
        batch-1 export: that model."""
        return self._model.skeleton if self._freed is None else self._freed

    @property
    def metadata(self) -> dict[str, str]:
        """The model's metadata_props (preprocessing, labels: onnxcam.preprocess reads them)."""
        return self._model.metadata

    @property
    def quantized(self) -> str | None:
        """"qdq" or "qoperator" for a quantized model (differentiated as its dequantized float equivalent), else None."""
        from .graph.quant import is_quantized

        return is_quantized(self.proto)

    @property
    def weights(self) -> dict:
        """{name: numpy array} of the model's large initializers (the proto holds placeholders for them). Read
        again from the source when they were released after a build (logged at INFO; see the class docstring)."""
        return self._model.weights

    @property
    def last_input_shape(self) -> tuple | None:
        """The input shape of the last run, or None before the first."""
        return self._last_shape

    # ---- building ------------------------------------------------------------------------------------------
    def compiled(self, input_shape: tuple | None = None, n_seeds: int = 1, by_class: bool = True) -> Compiled:
        """The built explainable model and session for inputs of `input_shape` (None: the size built for, or the
        last run's), with n_seeds targets per sample, by class index (by_class) or by a dense seed. Built on first
        use and kept in onnxcam.cache."""
        return self._compiled(self.resolved_input_shape(input_shape), n_seeds, by_class)

    def _compiled(self, shape: tuple, n_seeds: int = 1, by_class: bool = True, shared: bool = False) -> Compiled:
        self.choose_layers(shape)
        key = (self.digest, self.input_name, tuple(self._layers), self.score_name, tuple(shape[1:]), self.guided,
               self.apart, self.device, n_seeds, by_class, shared, self._freed is not None, _session_config())
        built = []

        def build() -> Compiled:
            with self._lock:
                start = time.perf_counter()
                mg = self._graph_at(shape)
                rw = rewrite.build(mg, self._layers, self.score_name, guided=self.guided, n_seeds=n_seeds,
                                   by_class=by_class, apart=self.apart, shared=shared)
                quantization = _quantization(self.proto, mg, self._layers)
                model, weights, data_file = self._session_inputs(rw)
                # The session gets its own copy of the weights (or reads them from the model file itself): holding
                # ours meanwhile would double the memory of big models.
                rw.weights, mg.weights, mg = {}, {}, None
                self._model.release_weights()
                try:
                    sess = session(model.SerializeToString(), self.device, weights, watch_placement=True,
                                   data_file=data_file)
                except ModelError:
                    if data_file is None:
                        raise
                    # an onnxruntime that cannot read external data from a given folder: pass the values instead
                    log.info("onnxruntime did not read the weights from %s: passing them", data_file)
                    held = self._model.weights
                    weights.update({t.name: held[t.name] for t in rw.model.graph.initializer
                                    if t.name in held and t.name not in weights})
                    sess = session(rw.model.SerializeToString(), self.device, weights, watch_placement=True)
                    self._model.release_weights()
                compiled = Compiled(rw, sess, time.perf_counter() - start, *quantization)
                built.append(True)
                log.debug("built the explainable model for input shape %s in %.3f s", shape, compiled.build_seconds)
                return compiled

        compiled = CACHE.get_or_build("sessions", key, build)
        if not built and self._model.holds_weights:  # built before (by another Explainer): the session has them
            self._model.release_weights()
        return compiled

    def _session_inputs(self, rw: rewrite.Rewritten) -> tuple[onnx.ModelProto, dict, str | None]:
        """(model, weights to pass, model file) for the session of a rewrite: weights that lie as they are in the
        model file this was read from are read by onnxruntime from there (its placeholders then point into the
        file), so that they are never in memory twice while the session is made."""
        in_file = self._model.file_backed(rw.weights)
        if not in_file:
            return rw.model, dict(rw.weights), None
        model = onnx.ModelProto()
        model.CopyFrom(rw.model)  # a skeleton: small; rw.model keeps its placeholders (explainable_model, export)
        path = str(self._model.source)
        for t in model.graph.initializer:
            if t.name in in_file:
                offset, length = in_file[t.name]
                del t.external_data[:]
                for key, value in (("location", os.path.basename(path)), ("offset", str(offset)),
                                   ("length", str(length))):
                    entry = t.external_data.add()
                    entry.key, entry.value = key, value
        return model, {k: v for k, v in rw.weights.items() if k not in in_file}, path

    def _graph_at(self, shape: tuple) -> ModelGraph:
        """The model shaped at `shape` (the analysis' graph when it is at that size: a build mutates it, so it
        serves once). A size that came from an input and that the model cannot run at is an InputError."""
        mg, self._graph_for_build = self._graph_for_build, None
        if mg is not None and tuple(mg.input_shape[1:]) == tuple(shape[1:]):
            return mg
        try:
            return ModelGraph(self.proto, shape, self.weights, self.input_name)
        except ModelError as exc:
            if self._analysis.build_shape is not None:
                raise
            raise InputError(f"input {self.input_name!r} of shape {tuple(shape)} is not a size this model accepts: "
                             f"{exc}") from exc

    def choose_layers(self, input_shape: tuple) -> list[str]:
        """The target layers for inputs of `input_shape`: for a dynamic-size model with layers=None, the automatic
        layer is chosen at the first size asked for (once per size and model across Explainers), then kept."""
        if self._layers is not None:
            return list(self._layers)
        with self._lock:
            if self._layers is not None:
                return list(self._layers)
            shape = tuple(input_shape)

            def choose() -> tuple:
                mg = self._graph_at(shape)
                self._graph_for_build = mg
                return tuple(rewrite.resolve_layers(mg, None, self.score_name))

            chosen = CACHE.get_or_build("analyses", (self.digest, "layers at", self.input_name, self.score_name,
                                                      shape[1:]), choose)
            log.info("layer %s chosen at input shape %s", ", ".join(chosen), shape[1:])
            self._layers = list(chosen)
        return list(self._layers)

    def resolved_input_shape(self, input_shape: tuple | None = None) -> tuple:
        """The input shape meant: the given one, the one built for, or the last run's; else InputError."""
        shape = input_shape or self._analysis.build_shape or self._last_shape
        if shape is None:
            raise InputError(f"input {self.input_name!r} has a dynamic size: give the input shape, or run the "
                             "explainer once")
        return tuple(shape)

    @property
    def explainable_model(self) -> onnx.ModelProto:
        """The rewritten model (original graph + activations and gradients as outputs), for inspection; for a
        dynamic-size model, at the size of the last run (explainable_model_at takes a size). Self-contained: its
        weights are read again from the source (see the class docstring)."""
        return self.explainable_model_at(None)

    def explainable_model_at(self, input_shape: tuple | None) -> onnx.ModelProto:
        """The rewritten model for inputs of `input_shape` (None: as explainable_model)."""
        return with_weights(self.compiled(input_shape).rewritten.model, self.weights)

    def score_shape(self, input_shape: tuple | None = None) -> tuple:
        """The score's static shape (batch symbolic) for inputs of `input_shape` (needed for dynamic-size models
        before their first run)."""
        a = self._analysis
        if a.build_shape is None and input_shape is not None:
            input_shape = (1, *tuple(input_shape)[1:])
            self._check_shape(input_shape)
        shape = self.resolved_input_shape(None if a.build_shape else input_shape)
        shared = self._shared_build(shape)  # the score is the same in either build: no second one for it
        return tuple((shared or self._compiled(shape)).rewritten.score_shape)

    def export(self, path: str | os.PathLike | None = None, method: str = "gradcam", *, top_k: int | None = None,
               size: tuple[int, int] | None = None, class_input: bool = False) -> onnx.ModelProto:
        """This model with `method`'s map of these layers in the graph (onnxcam.export.export); saved to `path`."""
        from .export import export

        return export(self, method, top_k=top_k, size=size, class_input=class_input, path=path)

    @property
    def build_seconds(self) -> float:
        """Seconds the build took (for a dynamic-size model: the build for the last run's size)."""
        return self.compiled().build_seconds

    @property
    def providers(self) -> list[str]:
        """onnxruntime's execution providers of the built session, in priority order."""
        return self.compiled().session.get_providers()

    @property
    def cpu_fallbacks(self) -> list[str] | None:
        """On CUDA, after a run: the gradient nodes onnxruntime computed on the CPU ("name (OpType)"; [] when none).
        None on the CPU or before the first run."""
        if self._analysis.build_shape is None and self._last_shape is None:
            return None
        return self.compiled().cpu_fallbacks

    # ---- running -------------------------------------------------------------------------------------------
    def run(self, x: np.ndarray, targets: int | list[int] | np.ndarray | None = None, *, top_k: int | None = None,
            seed: np.ndarray | None = None, extra_inputs: dict | None = None) -> Result:
        """Explain a preprocessed batch `x` (float32, the model's own layout) in one onnxruntime run.

        targets: None (each sample's top class), one int for all samples, one int per sample, or an (N, S)
            array of S classes per sample.
        top_k: explain each sample's k best classes at once (instead of targets).
        seed: instead of targets, any weighting of the score, shaped like it (N, K, ...).
        extra_inputs: {name: array} for the model's other inputs (added to, or replacing, the constructor's).
        With S > 1 targets per sample, gradients are (N, S, ...) and targets (N, S).
        NumericalError: x, or the run's score, activations or gradients, hold NaN or Inf (naming which, where).
        """
        x = self.check_input(x)
        n = x.shape[0]
        side = self._side_feeds(extra_inputs, n)
        plan = _Plan.make(targets, top_k, seed, n)
        if n > 1 and not side:
            self.free_batch(x.shape)
        shape = self._analysis.build_shape or x.shape
        shared = self._shared(shape, x, plan, side)
        if shared is not None:
            self._last_shape = tuple(x.shape)
            result = self._run_one(shared, x[:1], plan, rows=n)
            result = _broadcast_forward(result, shared.rewritten, n)
            _check_finite(result, shared.rewritten.score)
            return result
        try:
            compiled = self._compiled(shape, plan.n_seeds, plan.seed is None)
        except (LayerError, ModelError) as exc:
            if self._freed is None:
                raise
            self._keep_batch(exc)
            return self.run(x, seed=seed, targets=targets, top_k=top_k, extra_inputs=extra_inputs)
        self._last_shape = tuple(x.shape)
        rw = compiled.rewritten
        if rw.fixed_batch and n > 1 and self._analysis.fixed_batch == 1:
            result = _concat([self._run_one(compiled, x[i:i + 1], plan.sample(i), _sample(side, i, n))
                              for i in range(n)])
        else:
            result = self._run_one(compiled, x, plan, side)
        _check_finite(result, rw.score)
        return result

    def forward(self, x: np.ndarray, extra_inputs: dict | None = None) -> dict[str, np.ndarray]:
        """The model's outputs and the score for x from a plain session (the model alone, no gradient nodes): what a
        caller reads before it can seed a run (a detector's detections, a segmenter's classes) at the cost of one
        inference. The session (its own copy of the weights) is made on first use and kept by this Explainer.
        NumericalError when the score holds NaN or Inf, as run() would say."""
        x = self.check_input(x)
        n = x.shape[0]
        side = self._side_feeds(extra_inputs, n)
        if n > 1 and not side:
            self.free_batch(x.shape)
        sess = self.plain_session()
        names = [o.name for o in sess.get_outputs()]
        try:
            if self._analysis.fixed_batch == 1 and n > 1:
                parts = [sess.run(names, {self.input_name: x[i:i + 1], **_sample(side, i, n)}) for i in range(n)]
                values = [np.concatenate(chunk) for chunk in zip(*parts)]
            else:
                values = sess.run(names, {self.input_name: x, **side})
        except Exception as exc:  # onnxruntime's own types: one line that names the input and the failing node
            raise ModelError(f"onnxruntime failed on input {self.input_name!r} of shape {x.shape}: "
                             f"{runtime_failure(exc)}") from exc
        out = dict(zip(names, values))
        score = out[self.score_name]
        if not np.isfinite(score).all():
            raise NumericalError(f"the score {self.score_name!r} holds {_non_finite_kinds(score)} in samples "
                                 f"{_bad_samples(score)}: {_OVERFLOW}")
        return out

    def plain_session(self, names: tuple | list = ()) -> runtime.ort.InferenceSession:
        """A session of the model alone (no gradient nodes) whose outputs are the model's, the score and `names`
        (tensors of the graph), with its own copy of the weights; kept by this Explainer and made again when other
        names are asked for or free_batch freed the model since."""
        with self._lock:
            want = {self.score_name, *names}
            freed = self._freed is not None
            if self._plain is None or self._plain[0] != freed or not want <= set(self._plain[1]):
                proto = onnx.ModelProto()
                proto.CopyFrom(self.proto)
                have = {o.name for o in proto.graph.output}
                known = {vi.name: vi for vi in proto.graph.value_info}
                for name in sorted(want - have):  # typed where the model records it, else by onnxruntime
                    proto.graph.output.append(known.get(name) or onnx.helper.make_empty_tensor_value_info(name))
                held = self._model.holds_weights
                sess = session(proto.SerializeToString(), self.device, self.weights)
                if not held:
                    self._model.release_weights()
                self._plain = (freed, tuple(o.name for o in proto.graph.output), sess)
            return self._plain[2]

    def dense_seed_build(self, shape: tuple) -> Compiled:
        """The build a run with one dense seed per sample takes for inputs of `shape`: the shared-forward one where
        share_forward is on and the graph allows it, else the plain dense-seed build."""
        return self._shared_build(shape) or self._compiled(shape, 1, by_class=False)

    def _shared(self, shape: tuple, x: np.ndarray, plan: _Plan, side: dict) -> Compiled | None:
        """The model sharing one forward between the seeds (rewrite.build shared=) when share_forward is on, the
        run has one dense seed per sample, no side inputs, and x's samples are one sample's copies; else None."""
        if not self.share_forward or plan.seed is None or plan.n_seeds != 1 or side or not _copies(x):
            return None
        return self._shared_build(shape)

    def _may_share(self, shape: tuple) -> bool:
        return self.share_forward and self.free_batch(shape)

    def free_batch(self, input_shape: tuple | None = None) -> bool:
        """Whether a run of several samples (or the seeds of one, share_forward) takes one onnxruntime run: True for
        a model whose batch is free, and for a batch-1 export this Explainer could free (graph/free_batch.py: its
        batch made a symbol, kept only where a run of two different samples gives each sample's own result of the
        export, for every output and target layer; otherwise, logged at INFO, each sample runs alone as before).
        Tried once, at the size given or built for; run() tries it for batches of several samples."""
        if self._analysis.fixed_batch is None:
            return True
        if self._analysis.fixed_batch != 1 or self._kept_batch:
            return False
        with self._lock:
            if self._analysis.fixed_batch is None or self._kept_batch:
                return self._analysis.fixed_batch is None
            shape = self.resolved_input_shape(input_shape)
            layers = tuple(self.choose_layers(shape))
            key = ("freed batch", self.digest, self.input_name, layers, tuple(shape[1:]))
            freed = CACHE.get_or_build("analyses", key, lambda: (self._freed_model(shape, layers),))[0]
            if freed is None:
                self._kept_batch = True
                return False
            a = self._analysis
            self._freed, self._graph_for_build, self._batch_1_analysis = freed, None, a
            self._analysis = replace(a, fixed_batch=None,
                                     build_shape=None if a.build_shape is None else (BATCH, *a.build_shape[1:]))
            return True

    def _keep_batch(self, why: Exception) -> None:
        """Back to the export as it is (its batch of 1), after its freed graph failed to build."""
        with self._lock:
            log.info("input %r keeps its batch of 1 (each sample runs alone): the freed model did not build: %s",
                     self.input_name, why)
            self._freed, self._kept_batch, self._graph_for_build = None, True, None
            self._analysis = self._batch_1_analysis

    def _freed_model(self, shape: tuple, layers: tuple) -> onnx.ModelProto | None:
        from .graph.free_batch import NotFreed, check_freed, freed_batch

        start, held = time.perf_counter(), self._model.holds_weights
        skeleton = self._model.skeleton
        try:
            one = (1, *shape[1:])
            freed = freed_batch(skeleton, self.weights, self.input_name, one)
            check_freed(skeleton, freed, self.weights, self.input_name, one, self._analysis.dtype, layers)
        except NotFreed as exc:
            log.info("input %r keeps its batch of 1 (each sample runs alone): %s", self.input_name, exc)
            return None
        except Exception as exc:  # noqa: BLE001 - an optimization: the export as it is still explains
            log.warning("input %r keeps its batch of 1 (each sample runs alone): freeing it failed: %s: %s",
                        self.input_name, type(exc).__name__, exc)
            return None
        finally:
            if not held:  # read for the check: released again, as after a build
                self._model.release_weights()
        log.info("input %r: batch freed and checked in %.2f s", self.input_name, time.perf_counter() - start)
        return freed

    def _shared_build(self, shape: tuple) -> Compiled | None:
        """The shared-forward build for inputs of `shape` when share_forward is on and the graph allows it."""
        key = tuple(shape[1:])
        if not self._may_share(shape) or key in self._unshared:
            return None
        try:
            return self._compiled((1, *key), 1, False, shared=True)
        except LayerError as exc:  # the graph cannot broadcast its forward: the copies run, as without the option
            log.info("the seeds of one image run on copies of it: %s", exc)
            self._unshared.add(key)
            return None

    def _run_one(self, compiled: Compiled, x, plan: _Plan, side: dict | None = None, rows: int | None = None
                 ) -> Result:
        """rows: the seeds' count when the model shares x's one forward between them (x holds one sample)."""
        rw = compiled.rewritten
        n = rows or x.shape[0]
        score_shape = tuple(n if not isinstance(d, int) else d for d in rw.score_shape)
        feeds = {rw.input_name: x, **(side or {}), **plan.feeds(score_shape, rw)}
        names = list(rw.original_outputs)
        if rw.score not in names:
            names.append(rw.score)
        names += [n for n in (rw.act_outputs[layer] for layer in rw.layers) if n not in names]
        if rw.has_ranking:
            names.append(rewrite.TOP_CLASSES)
        for layer in rw.layers:
            names.append(rewrite.grad_name(layer))
        try:
            values = dict(zip(names, compiled.session.run(names, feeds)))
        except Exception as exc:  # onnxruntime's own types: one line that names the input and the failing node
            raise ModelError(f"onnxruntime failed on input {self.input_name!r} of shape {x.shape}: "
                             f"{runtime_failure(exc)}") from exc
        _check_placement(compiled)
        if rw.regions:
            _check_regions(plan.seed, values[rw.score].shape)
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

    def _side_feeds(self, given: dict | None, n: int) -> dict:
        """The model's other inputs for a batch of n: the constructor's extra_inputs updated by `given`, in each
        input's declared type; a batch-1 value repeated over n when its input's batch is free. InputError naming
        a missing, unknown or misshapen one."""
        from .graph.inputs import declared_shape, model_inputs

        side = {**self.extra_inputs, **(given or {})}
        declared = {i.name: i for i in model_inputs(self.proto) if i.name != self.input_name}
        unknown = [name for name in side if name not in declared]
        if unknown:
            others = ", ".join(repr(name) for name in declared) or "none"
            raise InputError(f"extra input {unknown[0]!r} is no other input of the model (those are: {others})")
        feeds = {}
        for name, vi in declared.items():
            shape = declared_shape(vi)
            if name not in side:
                raise InputError(f"the model's input {name!r} (shape {_fmt(shape or ())}) is missing: give it in "
                                 f"extra_inputs={{{name!r}: ...}}")
            a = np.asarray(side[name])
            dtype = _numpy_type(onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type)
                                if vi.type.tensor_type.elem_type else None)
            a = _converted(a, dtype, name) if a.dtype != dtype else a
            if shape and a.ndim == len(shape) and a.ndim and a.shape[0] == 1 and n > 1 and \
                    not isinstance(shape[0], int):
                a = np.repeat(a, n, axis=0)
            if shape is not None and (a.ndim != len(shape) or any(isinstance(d, int) and d != got
                                                                  for d, got in zip(shape, a.shape))):
                raise InputError(f"input {name!r} expects shape {_fmt(shape)}; got {a.shape}")
            feeds[name] = np.ascontiguousarray(a)
        return feeds

    def _check_shape(self, shape: tuple) -> None:
        """InputError unless `shape` fits the input's declared rank and dims (and the size built for)."""
        want = self._analysis.expect
        if want is not None and (len(shape) != len(want) or any(d is not None and d != got
                                                                for d, got in zip(want, shape))):
            raise InputError(f"input {self.input_name!r} expects shape {_fmt(want)}; got {tuple(shape)}")
        if len(shape) == 0 or any(d < 1 for d in shape[1:]):
            raise InputError(f"input {self.input_name!r} needs a batch axis and non-empty dims; got {tuple(shape)}")

    def check_input(self, x: np.ndarray) -> np.ndarray:
        """x as the model's input type, contiguous; InputError for a wrong shape or type, NumericalError for NaN/Inf
        (what run() checks first; methods that run the model themselves call it too)."""
        a = self._analysis
        if not isinstance(x, np.ndarray):
            raise InputError(f"x must be a numpy array, not {type(x).__name__}")
        self._check_shape(x.shape)
        if x.shape[0] < 1:
            raise InputError("x has an empty batch")
        if a.fixed_batch is not None and a.fixed_batch != 1 and x.shape[0] != a.fixed_batch:
            raise InputError(f"input {self.input_name!r} has a fixed batch of {a.fixed_batch}; got {x.shape[0]} "
                             "samples")
        if x.dtype != a.dtype:
            x = _converted(x, a.dtype, self.input_name)
        if x.dtype.kind in "fc":
            _refuse_non_finite(f"input {self.input_name!r}", x)
        return np.ascontiguousarray(x)


def _numpy_type(dtype) -> np.dtype:
    """The input's numpy type (float32 when it is unknown, or a type numpy lacks, such as bfloat16)."""
    try:
        return np.dtype(np.float32) if dtype is None else np.dtype(dtype)
    except TypeError:
        return np.dtype(np.float32)


def _converted(x: np.ndarray, dtype: np.dtype, name: str) -> np.ndarray:
    """x in the model's input type: floats of another width (fp16 models take fp16), or integers and booleans
    (uint8 images) when every value is one; anything else is an error naming a value that does not fit."""
    if x.dtype.kind not in "biuf":
        raise InputError(f"x must be a real numeric array ({dtype}), not {x.dtype}")
    if dtype.kind == "f":
        with np.errstate(over="ignore"):
            out = x.astype(dtype)
        if x.size and not np.isfinite(out).all() and np.isfinite(x).all():
            raise NumericalError(f"input {name!r} is {dtype}, and x holds values it cannot represent (up to "
                                 f"{np.abs(x).max():.3g}) in samples {_bad_samples(out)}")
        return out
    if dtype.kind not in "iub":
        raise InputError(f"input {name!r} is {dtype}: onnxcam feeds real numeric inputs only")
    low, high = (0, 1) if dtype.kind == "b" else (np.iinfo(dtype).min, np.iinfo(dtype).max)
    with np.errstate(invalid="ignore"):
        fits = (x >= low) & (x <= high)
        if x.dtype.kind == "f":
            fits &= x == np.floor(x)
    if not fits.all():
        bad = x[~fits].ravel()[0].item()
        raise InputError(f"input {name!r} takes {dtype} values; x holds {bad!r}, which is not one")
    return x.astype(dtype)


def _refuse_non_finite(what: str, a: np.ndarray) -> None:
    """NumericalError naming `what` and the samples (first axis) where `a` holds NaN or Inf."""
    if np.isfinite(a).all():
        return
    raise NumericalError(f"{what} holds {_non_finite_kinds(a)} in samples {_bad_samples(a)}")


def _bad_samples(a: np.ndarray) -> list:
    bad = ~np.isfinite(a.reshape(a.shape[0], -1)).all(axis=1) if a.ndim else np.array([True])
    return np.flatnonzero(bad).tolist()


def _non_finite_kinds(a: np.ndarray) -> str:
    kinds = [kind for kind, found in (("NaN", np.isnan(a).any()), ("Inf", np.isinf(a).any())) if found]
    return " and ".join(kinds)


def _check_finite(r: Result, score: str) -> None:
    """NumericalError when the score, a layer's activation or a gradient holds NaN or Inf: such maps would be all
    NaN, or all zero after scaling. The first non-finite tensor in the order they are computed is named."""
    found = []
    for layer, a in r.activations.items():
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            found.append((f"the activation of layer {layer!r}", a))
    if not np.isfinite(r.logits).all():
        found.append((f"the score {score!r}", r.logits))
    for layer, g in r.gradients.items():
        if not np.isfinite(g).all():
            found.append((f"the gradient at layer {layer!r}", g))
    if not found:
        return
    what, a = found[0]
    also = f" (also non-finite: {', '.join(w for w, _ in found[1:])})" if len(found) > 1 else ""
    raise NumericalError(f"{what} holds {_non_finite_kinds(a)} in samples {_bad_samples(a)}{also}: {_OVERFLOW}")


_OVERFLOW = "the model overflows float at this input, or its weights hold NaN or Inf"


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
            try:
                seed = np.asarray(seed, np.float32)
            except (TypeError, ValueError) as exc:  # strings, ragged lists
                raise InputError(f"seed must be an array of numbers shaped like the score: {exc}") from None
            _refuse_non_finite("the seed", seed)
            return _Plan(1, False, True, seed=seed)
        if top_k is not None:
            if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, (bool, np.bool_)) or top_k < 1:
                raise InputError(f"top_k must be a positive int, not {top_k!r}")
            return _Plan(int(top_k), True, False)
        if targets is None:
            return _Plan(1, True, True)
        classes = _target_classes(targets, n)
        return _Plan(classes.shape[1], False, classes.shape[1] == 1 and np.ndim(targets) < 2, classes=classes)

    def feeds(self, score_shape: tuple, rw: rewrite.Rewritten) -> dict:
        """The seed inputs of the built graph: class indices, or the dense seed (custom targets)."""
        n = score_shape[0]
        if rw.regions:
            return _region_entries(self.seed, score_shape)
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


def _copies(x: np.ndarray) -> bool:
    """Whether every sample of x equals the first (a sparse look first: distinct images differ there at once)."""
    first = x[:1]
    if len(x) > 1 and not np.array_equal(x[:, ..., ::97], np.broadcast_to(first[..., ::97], x[:, ..., ::97].shape)):
        return False
    return bool(np.array_equal(x, np.broadcast_to(first, x.shape)))


def _broadcast_forward(r: Result, rw: rewrite.Rewritten, n: int) -> Result:
    """The result of a shared-forward run (one sample's forward, n seeds) shaped as n copies' run would be: the
    forward's batched arrays (score, activations, batched outputs) broadcast to n rows (read-only views)."""
    batched = {o.name for o in rw.model.graph.output
               if o.type.tensor_type.shape.dim and o.type.tensor_type.shape.dim[0].dim_param}

    def rows(a: np.ndarray) -> np.ndarray:
        return np.broadcast_to(a, (n, *a.shape[1:])) if a.ndim and a.shape[0] == 1 else a
    return Result(rows(r.logits), r.targets, {k: rows(v) for k, v in r.activations.items()}, r.gradients,
                  {k: rows(v) if k in batched else v for k, v in r.outputs.items()}, r.seed, r.quantized)


def _region_entries(seed: np.ndarray | None, score_shape: tuple) -> dict:
    """The seed of per-region scores (1, R, C) as its nonzero rows and their regions (rewrite.ROWS, REGIONS): R is
    the run's, so the dense seed cannot be an input of fixed shape."""
    classes = score_shape[2]
    if seed is None:
        raise InputError(f"the score holds per-region scores (1, regions, {classes}), whose regions are the run's: "
                         "give a seed shaped like one run's score (e.g. a SelectedDetectionTarget's), not classes")
    if seed.ndim != 3 or seed.shape[0] != 1 or seed.shape[2] != classes:
        raise InputError(f"seed must have the per-region score's shape (1, regions, {classes}), got {seed.shape}")
    regions = np.flatnonzero(np.any(seed[0], axis=1))
    return {rewrite.REGIONS: regions[None].astype(np.int64), rewrite.ROWS: seed[0][regions][None]}


def _check_regions(seed: np.ndarray, score_shape: tuple) -> None:
    """A nonzero seed of per-region scores must be laid out on this run's regions (an all-zero seed, reading the
    score, fits any count)."""
    if seed.shape != score_shape and np.any(seed):
        raise InputError(f"the seed covers {seed.shape[1]} regions, but this run's per-region score has "
                         f"{score_shape[1]} (the count of regions is the run's): build the seed from this run's score "
                         f"(Result.logits, shape {score_shape})")


def _check_placement(compiled: Compiled) -> None:
    """On CUDA, once per compiled graph: warn about gradient nodes that onnxruntime left on the CPU."""
    placed = first_run_placement(compiled.session)
    if placed is None:
        return
    compiled.cpu_fallbacks = gradient_fallbacks(placed)
    if compiled.cpu_fallbacks:
        log.warning("onnxruntime runs %d gradient nodes on the CPU instead of CUDA, each a copy per run: %s",
                    len(compiled.cpu_fallbacks), ", ".join(compiled.cpu_fallbacks))


def _target_classes(targets, n: int) -> np.ndarray:
    """targets as an (N, S) int64 array; validates the count against the batch, and refuses classes beyond int64
    (2**70, big uint64s) before a cast could wrap them to valid-looking ones."""
    if isinstance(targets, (bool, np.bool_)):
        raise InputError(f"targets must be None, an int, or one int per sample; got {targets!r}")
    scalar = isinstance(targets, (int, np.integer))
    try:
        classes = np.asarray([targets] * n if scalar else targets)
    except ValueError:  # ragged nested lists
        classes = np.asarray(None)
    ints = (np.issubdtype(classes.dtype, np.integer) or classes.dtype == object and all(
        isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_)) for v in classes.ravel()))
    if classes.ndim not in (1, 2) or classes.size == 0 or not ints:
        raise InputError(f"targets must be None, an int, one int per sample or (N, S) ints; got {targets!r}")
    if len(classes) != n:
        raise InputError(f"got {len(classes)} targets for a batch of {n} samples")
    huge = [int(v) for v in classes.ravel() if not _INT64_MIN <= int(v) <= _INT64_MAX]
    if huge:
        raise InputError(f"target class {huge[0]} is out of range: classes are indices into the score")
    return classes.astype(np.int64).reshape(n, -1)


_INT64_MIN, _INT64_MAX = int(np.iinfo(np.int64).min), int(np.iinfo(np.int64).max)


def _one_hot_rows(classes: np.ndarray, score_shape) -> np.ndarray:
    """(N, S) classes -> (N, S, K) one-hot seeds."""
    classes = np.asarray(classes).reshape(len(classes), -1)
    n, s = classes.shape
    seeds = np.zeros((n * s, score_shape[1]), np.float32)
    seeds[np.arange(n * s), classes.ravel()] = 1.0
    return seeds.reshape(n, s, score_shape[1])


def _sample(side: dict, i: int, n: int) -> dict:
    """Sample i's side inputs, for a model run one sample at a time (those with a batch axis of n are sliced)."""
    return {k: v[i:i + 1] if v.ndim and v.shape[0] == n else v for k, v in side.items()}


def _concat(parts: list[Result]) -> Result:
    cat = np.concatenate
    return Result(
        logits=cat([p.logits for p in parts]), targets=cat([p.targets for p in parts]),
        activations={k: cat([p.activations[k] for p in parts]) for k in parts[0].activations},
        gradients={k: cat([p.gradients[k] for p in parts]) for k in parts[0].gradients},
        outputs={k: cat([p.outputs[k] for p in parts]) for k in parts[0].outputs},
        seed=cat([p.seed for p in parts]), quantized=parts[0].quantized)


def _fmt(shape) -> str:
    return "(" + ", ".join(str(d) if isinstance(d, int) else "?" for d in shape) + ")"
