"""BaseCAM: pytorch-grad-cam's calling convention on an ONNX model.

    cam = GradCAM(model="model.onnx", target_layers=["layer4"])
    grayscale = cam(input_tensor=x, targets=[ClassifierOutputTarget(281)] * len(x))   # (N, H, W) in [0, 1]
    cam.outputs                                                                        # the logits of that call

One onnxruntime run gives the outputs, every target layer's activations and the gradients of the targets' score
(explainer.py); the method turns each layer's (activations, gradients) into a raw map (methods.py), and the maps are
post-processed exactly as pytorch-grad-cam 1.5.7 does (postprocess.py).

Where pytorch-grad-cam takes torch modules and tensors, this takes layer names (ONNX tensor names, or the exporting
framework's module paths: graph/names.py) and numpy arrays (torch tensors are converted). Differences on purpose:
a target list whose length is not the batch size raises ValueError (pytorch-grad-cam zip-truncates it), and the
default score is the logits even when the model ends in a Softmax (give score=<output name> to explain that).
"""

from __future__ import annotations

import logging
import threading
from collections import defaultdict
from collections.abc import Callable, Sequence

import numpy as np
import onnx

from ..cache import CACHE
from ..errors import InputError, NumericalError
from ..explainer import Explainer, Result
from ..graph import inputs as graph_inputs
from ..graph.load import LoadedModel
from ..graph.model import ModelGraph
from ..runtime import SESSION_CONFIG
from ..tasks import detect, ocr
from ..tasks.layout import tokens_to_maps
from .postprocess import aggregate_layers, layer_map
from .targets import ClassifierOutputTarget, _SeedTarget, as_target, seeds

log = logging.getLogger(__name__)

# aug_smooth: pytorch-grad-cam's default test-time augmentation (ttach): horizontal flip x brightness factors,
# in ttach's order (flip outer, factor inner); each map is flipped back, then the maps are averaged.
AUG_FLIPS = (False, True)
AUG_FACTORS = (0.9, 1, 1.1)


class BaseCAM:
    """A CAM method over target layers of an ONNX model; subclasses set `method` (a function of methods.py).

    model: a path, bytes, onnx.ModelProto, or an Explainer (whose layers are then the target layers).
    target_layers: layer names (tensor names, node names, module paths, Keras layer names), or None for the last
        4-D activation with a spatial size > 1 before the score.
    reshape_transform: a numpy function applied to activations and gradients, e.g. tokens -> (N, C, h, w).
    device: "auto", "cpu" or "cuda". score / output / input_shape / base_dir / input_name / extra_inputs: as for
        Explainer (the last two: the image input among side inputs, and the side inputs' values).
    channels_last: whether the input is (N, H, W, C); None guesses it from its shape. Each activation's layout is
        guessed from how its dims scale with the input's.

    targets=None explains each sample's top class; for a text recognizer's CTC scores ((N, T, C) or (T, N, C)
    behind an LSTM/GRU/RNN) it explains each sample's greedily decoded string (ocr.StringTarget: every decoded
    character's score at its time steps, the command line's map of the whole text line). A two-stage detector's
    per-region scores (Faster R-CNN's (R, C), R the run's own count of proposals) take a seed array laid out on
    that image's own run (one image per call), or a tasks.detect.SelectedDetectionTarget; methods whose runs of
    their own change the regions (perturbed inputs, aug_smooth) are refused for them.
    """

    method: Callable = None
    guided = False
    gradient_free = False  # EigenCAM, KPCA-CAM: a zero map never comes from a zero gradient
    builds_gradients = True  # False: the method never runs the gradient graph (Score-CAM, Ablation-CAM)
    # what the method's runs of its own change besides the caller's input: "input" (noise, masks), "layers"
    # (ablated activations, the model after them rerun) or None (every run is of the caller's input)
    perturbs: str | None = None
    # the score's shape per input shape, learnt from the runs (for targets whose seed needs it)
    _score_shapes: dict

    def __init__(self, model, target_layers: Sequence[str] | str | None = None,
                 reshape_transform: Callable | None = None, *, device: str = "auto", score: str | None = None,
                 output: str | None = None, input_shape: tuple[int, ...] | None = None,
                 channels_last: bool | None = None, base_dir=None, input_name: str | None = None,
                 extra_inputs: dict | None = None):
        if isinstance(model, Explainer):
            # Reuse it when it already computes what this method needs; else build one on its model. Its layers
            # are None until chosen when they are chosen at the first run's size (dynamic-size models).
            self.model = model.proto
            layers = self._explainer_layers(self.model, model._layers if target_layers is None else target_layers)
            self.explainer = _derived(model, None if layers is None else list(layers), self.guided, input_shape)
        else:
            loaded = LoadedModel.of(model, base_dir)  # read once; the Explainer keeps it and drops the weights
            self.model = loaded.skeleton
            layers = self._explainer_layers(self.model, target_layers)
            self.explainer = Explainer(loaded, layers, score, device, output=output, input_shape=input_shape,
                                       guided=self.guided, build=self.builds_gradients, input_name=input_name,
                                       extra_inputs=extra_inputs)
        self.reshape_transform = reshape_transform
        self.channels_last = channels_last
        self._call = _PerCall()  # what the last call made, per thread: one object may serve several threads
        self._score_shapes = {}

    # ---- what the calling thread's last call made ------------------------------------------------------------
    @property
    def outputs(self) -> np.ndarray | None:
        """The logits of this thread's last call."""
        return self._call.outputs

    @outputs.setter
    def outputs(self, value) -> None:
        self._call.outputs = value

    @property
    def result(self) -> Result | None:
        """The explain run of this thread's last call (activations, gradients, targets)."""
        return self._call.result

    @result.setter
    def result(self, value) -> None:
        self._call.result = value

    @property
    def explainer_used(self) -> Explainer:
        """The Explainer this thread's last call ran: `explainer`, or for detection targets without an IoU term one
        on the same layers seeding the head's class-score tensor (its score_name), the box branch off the gradient
        path (run's results read as the score's own either way)."""
        return self._call.explainer or self.explainer

    @property
    def raw(self) -> dict[str, np.ndarray]:
        """layer -> raw (N, h, w) map of this thread's last call, before ReLU and scaling."""
        return self._call.raw

    @raw.setter
    def raw(self, value) -> None:
        self._call.raw = value

    @property
    def degenerate_reasons(self) -> list[str | None]:
        """Per sample of this thread's last call: why its map is all zero (one line), or None for a map that shows
        something. A zero map is no finding: the target's gradient at the layer is zero, or nothing is positive."""
        return self._call.degenerate

    @property
    def degenerate(self) -> np.ndarray:
        """(N,) bool: the samples of the last call whose map is all zero (see degenerate_reasons)."""
        return np.array([why is not None for why in self._call.degenerate], bool)

    # ---- what to build -------------------------------------------------------------------------------------
    def _explainer_layers(self, proto: onnx.ModelProto, target_layers):
        return None if target_layers is None else _as_list(target_layers)

    @property
    def target_layers(self) -> list[str]:
        """The target layers as tensor names (module paths resolved)."""
        return list(self.explainer.layers)

    # ---- calling -------------------------------------------------------------------------------------------
    def __call__(self, input_tensor, targets=None, aug_smooth: bool = False, eigen_smooth: bool = False) -> np.ndarray:
        """(N, H, W) float32 maps in [0, 1] at the input's spatial size.

        targets: None (each sample's top class), or one target per sample (onnxcam.targets; an int means
        ClassifierOutputTarget(int)). aug_smooth: average over flips and brightness changes of the input.
        eigen_smooth: first principal component of the weighted activations instead of their channel sum.
        """
        x = as_numpy_input(input_tensor)
        if aug_smooth:
            self.refuse_moved_regions(x, "aug_smooth explains flipped and brightened copies of the input", "input",
                                      "leave aug_smooth off", "aug_smooth")
            maps = self.forward_augmentation_smoothing(x, targets, eigen_smooth)
            self._call.degenerate = degenerate_maps(maps, self.result, self._gradient_layers, self.gradient_free)
            return maps
        return self.forward(x, targets, eigen_smooth)

    def forward(self, x: np.ndarray, targets=None, eigen_smooth: bool = False) -> np.ndarray:
        return self.maps_for(x, self.run(x, targets), eigen_smooth)

    def maps_for(self, x: np.ndarray, r: Result, eigen_smooth: bool = False) -> np.ndarray:
        """The maps of a run already made for x by this method's explainer (e.g. one rank of a top-k run)."""
        self.outputs, self.result = r.logits, r
        size = self.target_size(x)
        self.raw = {layer: self.raw_map(r, layer, x, eigen_smooth) for layer in self.target_layers}
        maps = aggregate_layers([layer_map(raw, size) for raw in self.raw.values()], fresh=True)
        self._call.degenerate = degenerate_maps(maps, r, self._gradient_layers, self.gradient_free)
        return maps

    @property
    def _gradient_layers(self) -> list[str]:
        """The layers whose gradients make the map (CAM's are those at the pooled tensors)."""
        return self.target_layers

    def forward_augmentation_smoothing(self, x: np.ndarray, targets=None, eigen_smooth: bool = False) -> np.ndarray:
        w_axis = 2 if self._input_channels_last(x) else 3
        cams, kept = [], None
        for flip in AUG_FLIPS:
            for factor in AUG_FACTORS:
                augmented = np.flip(x, axis=w_axis) if flip else x
                if factor != 1:
                    augmented = augmented * factor
                cam = self.forward(np.ascontiguousarray(augmented), targets, eigen_smooth)
                cams.append(np.flip(cam, axis=2) if flip else cam)
                if not flip and factor == 1:
                    kept = (self.raw, self.outputs, self.result)
        self.raw, self.outputs, self.result = kept  # what the plain input gave
        return np.mean(np.float32(cams), axis=0)

    def run(self, x: np.ndarray, targets=None) -> Result:
        """One explain run for the targets (two when a target's seed needs the outputs); sets self.outputs."""
        ex = self.explainer
        n = x.shape[0]
        if self.perturbs is not None:
            self.refuse_moved_regions(x, f"{type(self).__name__} makes runs of its own on changed copies of the input",
                                      "input")
        if targets is None:
            targets = self.default_targets(x)
        if targets is None:
            r = ex.run(x)
        else:
            targets = _target_list(targets, n)
            if all(type(t) is ClassifierOutputTarget for t in targets):
                r = ex.run(x, [t.category for t in targets])
            elif any(ocr.is_sequence_target(t) for t in targets):  # CTC targets: each sample's (T, C) scores,
                r = ocr.run_sequence(ex, x, targets)  # whichever axis of the score holds the batch
            elif (rows := self._class_rows(x, targets)) is not None:
                ex, r = self._run_on_rows(x, targets, rows)
            elif self._per_region(x):
                r = self._run_on_regions(x, targets)
            else:
                shape = self._score_shape(x)
                outputs = np.zeros((n, *shape), np.float32)
                if any(getattr(t, "needs_output", False) for t in targets):
                    known = self._call.known_outputs  # score_outputs(x) just read them
                    outputs = known[1] if known is not None and known[0] is x else self.score_outputs(x)
                    self._call.known_outputs = None
                r = ex.run(x, seed=seeds(targets, outputs))
        self._score_shapes[x.shape[1:]] = r.logits.shape[1:]
        self.outputs, self.result, self._call.explainer = r.logits, r, ex
        return r

    def default_targets(self, x: np.ndarray) -> list | None:
        """What targets=None explains: None (each sample's top class), or for a text recognizer's sequence scores
        each sample's greedily decoded string (ocr.StringTarget, blank class 0), as the command line's text-line
        map does. A score with no decoded character is then refused in one line (StringTarget's)."""
        ex = self.explainer
        if not has_op(ex, ocr.RECURRENT):  # no recognizer: skip shaping the graph
            return None
        shape = self._analysis_shape(x)
        key = (ex.digest, "recognizer", ex.input_name, ex.score_name, tuple(shape[1:]))
        found = CACHE.get_or_build("analyses", key, lambda: (ocr.is_recognizer(
            ModelGraph(ex.proto, shape, ex.weights, ex.input_name), ex.score_name),))[0]
        return [ocr.StringTarget()] * len(x) if found else None

    def refuse_moved_regions(self, x: np.ndarray, what: str, perturbed: str,
                             fix: str = "use a method that explains the image's own run (GradCAM, HiResCAM, ...)",
                             option: str = "method") -> None:
        """InputError when the score holds per-region scores (Faster R-CNN's (R, C)) whose regions (RoiAlign's
        rois) are computed from what a run of the method's own changes (perturbed: "input", or "layers"): that run
        proposes other regions, so a row's score there is another region's, a silent wrong answer. Regions that
        provably stay (computed from nothing the method changes) are no reason to refuse."""
        ex = self.explainer
        starts = [ex.input_name] if perturbed == "input" else ex.choose_layers(self._analysis_shape(x))
        for start in starts:
            roi = moved_regions(ex, start)
            if roi is None or not self._per_region_graph(x):
                continue
            changed = "the input" if start == ex.input_name else f"layer {start!r}"
            raise InputError(f"{what}, but the per-region scores {ex.score_name!r} are rows of the regions each run "
                             f"proposes ({roi} reads regions computed from {changed}): a row's score in another run "
                             f"would be another region's; {fix}", option=option)

    def _analysis_shape(self, x: np.ndarray) -> tuple:
        """The input shape the graph is read at: the one built for, else x's (checked first, as the run would)."""
        ex = self.explainer
        if ex.analysis.build_shape is None:
            ex.check_input(x)
        return ex.analysis.build_shape or (ex.analysis.fixed_batch or 1, *x.shape[1:])

    def _per_region_graph(self, x: np.ndarray) -> bool:
        """The score is per-region ((R, C) computed from RoiAlign's regions, no batch axis), read from the graph."""
        ex, shape = self.explainer, self._analysis_shape(x)

        def find() -> tuple:
            mg = ModelGraph(ex.proto, shape, ex.weights, ex.input_name)
            t = mg.tensor(ex.score_name)
            return (len(mg.shape(t) or ()) == 2 and mg.per_region(t),)

        return CACHE.get_or_build("analyses", (ex.digest, "per region", ex.input_name, ex.score_name,
                                               tuple(shape[1:])), find)[0]

    def _per_region(self, x: np.ndarray) -> bool:
        """The score is per-region, as the explainable model a dense seed runs (built once; the run reuses it)."""
        ex = self.explainer
        self._analysis_shape(x)  # a bad x is refused first, as the run would
        return ex.dense_seed_build(ex.resolved_input_shape(ex.analysis.build_shape or x.shape)).rewritten.regions

    def _run_on_regions(self, x: np.ndarray, targets: list) -> Result:
        """Per-region scores (R, C), R being this image's own count of proposals: seed arrays go to the run as they
        are (checked there against this run's regions); other targets are seeded on this run's own scores, read by
        a first run (a zero seed fits any count of regions)."""
        ex = self.explainer
        if len(x) != 1:
            raise InputError(f"the per-region scores {ex.score_name!r} are one image's regions, a count of their "
                             f"own per image: explain one image per call, not {len(x)}")
        if all(isinstance(t, _SeedTarget) for t in targets):
            seed = np.stack([t.weights for t in targets])
        else:
            known = self._call.known_outputs  # score_outputs(x) just read them
            self._call.known_outputs = None
            outputs = known[1] if known is not None and known[0] is x else self.score_outputs(x)
            seed = seeds(targets, outputs)
        return ex.run(x, seed=seed)

    def _class_rows(self, x: np.ndarray, targets: list) -> detect.ClassRows | None:
        """The head's class-score tensor to seed instead of the score, when every target weights only the class
        rows of one head (class_layout: a DetectionTarget without IoU) and the score, a model output, is a pure
        copy of them (detect.class_rows, once per model and size); None: seed the score itself."""
        layouts = {getattr(t, "class_layout", None) for t in targets}
        if len(layouts) != 1 or None in layouts:
            return None
        ex, layout, a = self.explainer, layouts.pop(), self.explainer.analysis
        if a.build_shape is None:  # the graph is read at x's size: a bad x is refused first, as the run would
            ex.check_input(x)
        shape = a.build_shape or (a.fixed_batch or 1, *x.shape[1:])
        key = (ex.digest, "class rows", ex.input_name, ex.score_name, tuple(shape[1:]), layout)
        return CACHE.get_or_build("analyses", key, lambda: (_class_rows_at(ex, shape, layout),))[0]

    def _run_on_rows(self, x: np.ndarray, targets: list, rows: detect.ClassRows) -> tuple[Explainer, Result]:
        """(the Explainer used, its Result) for targets whose seeds on the score lie in `rows`: each seed is made
        from the score's values as always, then sliced to rows.tensor, which a derived Explainer on the same layers
        seeds. The Result reads as the score's own (logits the score, seed the score-shaped seeds)."""
        ex = self.explainer
        n, shape = x.shape[0], self._score_shape(x)
        sub = _derived(ex, ex.choose_layers(x.shape), ex.guided, ex.analysis.build_shape, score=rows.tensor,
                       build=False)
        outputs = np.zeros((n, *shape), np.float32)
        if any(getattr(t, "needs_output", False) for t in targets):
            known = self._call.known_outputs  # score_outputs(x) just read them
            self._call.known_outputs = None
            if known is not None and known[0] is x:
                outputs = known[1]
            else:  # the score's values from a first run of the cheaper graph (a zero seed)
                outputs = sub.run(x, seed=rows.slice(outputs)).outputs[ex.score_name]
        seed = seeds(targets, outputs)
        r = sub.run(x, seed=rows.slice(seed))
        return sub, Result(r.outputs[ex.score_name], r.targets, r.activations, r.gradients, r.outputs, seed,
                           r.quantized)

    def score_outputs(self, x: np.ndarray) -> np.ndarray:
        """The score (logits) for x by a run with a zero seed (no target), remembered for this thread's next run
        of the same array (targets built from the logits, e.g. FinerCAM's, then cost no second first run)."""
        shape = self._score_shape(x)
        logits = self.explainer.run(x, seed=np.zeros((x.shape[0], *shape), np.float32)).logits
        self._call.known_outputs = (x, logits)
        return logits

    # ---- per layer -----------------------------------------------------------------------------------------
    def raw_map(self, r: Result, layer: str, x: np.ndarray, eigen_smooth: bool = False) -> np.ndarray:
        """The method's raw (N, h, w) map of one layer, before ReLU and scaling."""
        activations, grads = self.layer_arrays(r, layer, x)
        return self.method(activations, grads, eigen_smooth)

    def layer_arrays(self, r: Result, layer: str, x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A layer's activations and gradients as (N, C, h, w)."""
        a, g = r.activations[layer], r.gradients[layer]
        if self.reshape_transform is not None:
            a, g = self.reshape_transform(a), self.reshape_transform(g)
        elif a.ndim == 4 and self._channels_last(a.shape, x):
            a, g = a.transpose(0, 3, 1, 2), g.transpose(0, 3, 1, 2)
        elif a.ndim == 3:  # ViT tokens (N, 1+hw, C) or sequence-first (T, N, C): onnxcam/tasks/layout.py
            a, g = tokens_to_maps(a, g, self.target_size(x)[::-1], x.shape[0])
        if a.ndim != 4:
            raise InputError(f"layer {layer!r} has shape {a.shape}; CAM methods need a 4-D (N, C, h, w) activation "
                             "(give a reshape_transform for token or 3-D layouts)")
        return np.asarray(a, np.float32), np.asarray(g, np.float32)  # no copy: the methods do not write

    def target_size(self, x: np.ndarray) -> tuple[int, int]:
        """(W, H) of the input, where the maps are resized to."""
        return (x.shape[2], x.shape[1]) if self._input_channels_last(x) else (x.shape[-1], x.shape[-2])

    # ---- layouts -------------------------------------------------------------------------------------------
    def _input_channels_last(self, x: np.ndarray) -> bool:
        if self.channels_last is not None:
            return bool(self.channels_last)
        if x.ndim != 4:
            raise InputError(f"the input must be a 4-D image batch, got shape {x.shape}")
        return _looks_nhwc(x.shape)

    def _channels_last(self, shape: tuple, x: np.ndarray) -> bool:
        """Guess an activation's layout: the one whose spatial dims scale like the input's; else the input's.

        (Exporters from channels-last frameworks often keep NCHW inside: tf2onnx moves its Transposes outward.)
        """
        nhwc = self._input_channels_last(x)
        height, width = (x.shape[1], x.shape[2]) if nhwc else (x.shape[2], x.shape[3])
        fits = [_scales_like((h, w), (height, width)) for h, w in ((shape[2], shape[3]), (shape[1], shape[2]))]
        if fits[0] != fits[1]:
            return fits[1]
        return nhwc

    def _score_shape(self, x: np.ndarray) -> tuple:
        """One sample's score shape at x's size (known after a run; else from the built model)."""
        key = x.shape[1:]
        if key not in self._score_shapes:
            ex = self.explainer
            shape = ex.score_shape(x.shape)
            if not all(isinstance(d, int) for d in shape[1:]):
                raise InputError(f"the score {ex.score_name!r} has no static shape; give targets as a seed array")
            self._score_shapes[key] = tuple(shape[1:])
        return self._score_shapes[key]

    def export(self, path=None, *, top_k: int | None = None, size=None, class_input: bool = False) -> onnx.ModelProto:
        """The model with this method's map in the graph (onnxcam.export.export); saved to `path` when given."""
        from ..export import export

        return export(self, top_k=top_k, size=size, class_input=class_input, path=path)

    # ---- context manager (nothing to release: no hooks) ----------------------------------------------------
    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc_value, exc_tb):
        return None


class _PerCall(threading.local):
    """A CAM object's per-call results, one set per thread."""

    outputs: np.ndarray | None = None
    result: Result | None = None
    raw: dict = {}  # noqa: RUF012 - only ever replaced, never mutated
    degenerate: list = []  # noqa: RUF012 - only ever replaced, never mutated
    known_outputs: tuple | None = None  # (x, its logits) from score_outputs
    explainer: Explainer | None = None  # the Explainer the last call ran (BaseCAM.explainer_used)


def degenerate_maps(maps: np.ndarray, r: Result, layers: list[str], gradient_free: bool = False) -> list[str | None]:
    """Per sample: one line saying why its map is all zero, or None when it is not.

    An all-zero map means "nothing here", not "the model looks nowhere": either the target's gradient is zero at
    every given layer (a zero-weight head, a saturated score), or the method's weighted activations are nowhere
    positive (counterfactual Grad-CAM of a class with nothing against it) or are constant."""
    reasons: list[str | None] = []
    for i in range(len(maps)):
        if np.any(maps[i]):
            reasons.append(None)
            continue
        target = np.ravel(r.targets[i])[0] if r.targets.size else -1
        what = f"class {int(target)}'s score" if target >= 0 else "the target's score"
        names = ", ".join(repr(layer) for layer in layers)
        if not gradient_free and not any(np.any(r.gradients[layer][i]) for layer in layers):
            reasons.append(f"the map is all zero: the gradient of {what} at {names} is zero everywhere")
        else:
            reasons.append(f"the map is all zero: the method's (weighted) activations at {names} are nowhere "
                           "positive, or constant")
    bad = [i for i, why in enumerate(reasons) if why]
    if bad:
        # INFO, not WARNING: callers read degenerate_reasons (the CLI prints each zero map beside its image); a
        # warning on every call would flood loops over many images.
        log.info("samples %s: %s", bad, reasons[bad[0]])
    return reasons


def _derived(ex: Explainer, layers: list | None, guided: bool, input_shape, score: str | None = None,
             build: bool = True) -> Explainer:
    """An Explainer on ex's model for other layers, guided gradients or another score tensor (CAM, input gradients,
    guided methods, a detection head's class scores), kept in onnxcam.cache (table "derived"), so that
    explain(explainer, ...) in a loop analyses once. layers None: the explainer's own automatic choice (not made
    yet). build=False: its session is built at its first run (the constructor's by-class build is not needed)."""
    score = ex.score_name if score is None else score
    same_layers = layers is None or layers == ex._layers
    if guided == ex.guided and score == ex.score_name and same_layers:
        return ex
    apart = ex.apart and same_layers  # the same layers differentiated as the explainer's are
    if ex.extra_inputs:  # side inputs are values, not a cache key: a fresh Explainer (its sessions are cached)
        return Explainer(ex, layers, score, ex.device, input_shape=input_shape, guided=guided, build=build,
                         apart=apart)
    key = (ex.digest, ex.input_name, score, ex.device, None if layers is None else tuple(layers), guided, apart,
           None if input_shape is None else tuple(input_shape), tuple(sorted(SESSION_CONFIG.items())))
    return CACHE.get_or_build("derived", key, lambda: Explainer(ex, layers, score, ex.device, input_shape=input_shape,
                                                                guided=guided, build=build, apart=apart))


def _class_rows_at(ex: Explainer, shape: tuple, layout: detect.DetectionLayout) -> detect.ClassRows | None:
    """detect.class_rows for ex's score in its model shaped at `shape`; None when the score is no model output
    (the run then could not read the score's values to make the seeds)."""
    mg = ModelGraph(ex.proto, shape, ex.weights, ex.input_name)
    if ex.score_name not in {t.name for t in mg.graph.outputs}:
        return None
    return detect.class_rows(mg, ex.score_name, layout)


def moved_regions(ex: Explainer, start: str) -> str | None:
    """The RoiAlign behind ex's score whose regions (rois, batch indices) are computed from tensor `start` (the
    input or a layer), named for messages; None when there is none. Read from the graph's data flow, including
    what subgraphs (If branches) read from outside; kept in onnxcam.cache per model."""
    key = (ex.digest, "regions from", ex.score_name, start)
    return CACHE.get_or_build("analyses", key, lambda: (_moved_regions(ex.proto.graph, ex.score_name, start),))[0]


def _moved_regions(graph: onnx.GraphProto, score: str, start: str) -> str | None:
    nodes = list(graph.node)
    reads = [_reads(node) for node in nodes]
    made_by = {out: i for i, node in enumerate(nodes) for out in node.output if out}
    behind, todo = set(), [score]
    while todo:
        i = made_by.get(todo.pop())
        if i is not None and i not in behind:
            behind.add(i)
            todo.extend(reads[i])
    readers = defaultdict(list)
    for i, names in enumerate(reads):
        for name in names:
            readers[name].append(i)
    moved, todo = {start}, [start]
    while todo:
        for i in readers.get(todo.pop(), ()):
            fresh = [out for out in nodes[i].output if out and out not in moved]
            moved.update(fresh)
            todo.extend(fresh)
    for i in sorted(behind):
        node = nodes[i]
        # a RoiAlign's regions are its inputs 1 and 2; a node whose subgraphs hold one: anything it reads
        regions = node.input[1:] if node.op_type == "RoiAlign" else reads[i] if _holds(node, "RoiAlign") else ()
        if any(name in moved for name in regions):
            return f"{node.op_type} {node.name or node.output[0]!r}"
    return None


def _subgraphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    return [a.g for a in node.attribute if a.HasField("g")] + [g for a in node.attribute for g in a.graphs]


def _reads(node: onnx.NodeProto) -> list[str]:
    """The tensors a node reads: its inputs and whatever its subgraphs' nodes read (names made inside them too:
    more than needed, never less)."""
    names = [name for name in node.input if name]
    for g in _subgraphs(node):
        for inner in g.node:
            names += _reads(inner)
    return names


def _holds(node: onnx.NodeProto, op: str) -> bool:
    return any(inner.op_type == op or _holds(inner, op) for g in _subgraphs(node) for inner in g.node)


def has_op(ex: Explainer, ops) -> bool:
    """Whether ex's model holds one of `ops` (subgraphs included): a cheap test before shaping the graph, kept in
    onnxcam.cache per model."""
    ops = frozenset(ops)

    def find() -> tuple:
        return (any(node.op_type in ops or any(_holds(node, op) for op in ops) for node in ex.proto.graph.node),)

    return CACHE.get_or_build("analyses", (ex.digest, "holds ops", ops), find)[0]


def as_numpy_input(value) -> np.ndarray:
    """A torch tensor (detached, on the CPU) or an array-like -> a contiguous float32 numpy array."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    try:
        value = np.asarray(value)
    except ValueError as exc:  # ragged nested lists
        raise InputError(f"input_tensor is not an array: {exc}") from None
    if value.dtype.kind not in "biuf":
        raise InputError(f"input_tensor must be real numbers, not {value.dtype}")
    with np.errstate(over="ignore"):
        x = np.ascontiguousarray(value, dtype=np.float32)
    if value.dtype.kind == "f" and value.dtype.itemsize > 4 and not np.isfinite(x).all() and np.isfinite(value).all():
        raise NumericalError(f"input_tensor holds values beyond float32 (up to {np.abs(value).max():.3g})")
    return x


def input_name(proto: onnx.ModelProto) -> str:
    return graph_inputs.input_name(proto, InputError)


def _target_list(targets, n: int) -> list:
    if isinstance(targets, (int, np.integer)):
        targets = [targets] * n
    targets = list(targets)
    if len(targets) != n:
        raise InputError(f"got {len(targets)} targets for a batch of {n} samples; give one per sample "
                         f"(pytorch-grad-cam would silently explain only the first {min(len(targets), n)})")
    try:
        return [as_target(t) for t in targets]
    except TypeError as exc:  # an object that is no target: the API speaks in onnxcam errors
        raise InputError(str(exc)) from None


def _as_list(layers) -> list:
    return [layers] if isinstance(layers, str) else list(layers)


def _looks_nhwc(shape: tuple) -> bool:
    small = (1, 3, 4)
    return shape[3] in small and shape[1] not in small


def _scales_like(hw: tuple, input_hw: tuple) -> bool:
    """True when (h, w) is the input's (H, W) divided by one stride in both directions (within rounding)."""
    (h, w), (height, width) = hw, input_hw
    if not (0 < h <= height and 0 < w <= width):
        return False
    sh, sw = height / h, width / w
    return abs(sh - sw) <= 0.15 * max(sh, sw)
