"""Text recognizers and detectors (onnxcam/tasks/ocr.py) and models with side inputs (Explainer's input_name and
extra_inputs).

Every net here is smooth (tanh, sigmoid, average pooling, LSTM, bilinear upsampling): no ReLU or MaxPool kink can
flip between the float32 run and the float64 reference. What is discrete (the CTC decoding's argmax, DBNet's 0.3
threshold) is checked to sit well away from a tie in float64 before the seed from the float32 run is used.
"""

from __future__ import annotations

import functools
import io

import numpy as np
import onnx
import pytest

import onnxcam
from onnxcam.errors import InputError
from onnxcam.graph.model import ModelGraph
from onnxcam.targets import ClassifierOutputTarget
from onnxcam.tasks import choose, ocr

torch = pytest.importorskip("torch")
nn = torch.nn

HEIGHT, WIDTH, CLASSES, HIDDEN = 8, 16, 6, 10


def _export(model, args: tuple, names: list[str], dynamic: dict | None = None) -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(model, args, buf, dynamo=False, opset_version=17, input_names=names, output_names=["y"],
                      dynamic_axes=dynamic)
    return buf.getvalue()


def _reference(model, args: tuple, module: nn.Module, seed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """float64 torch: the module's output and d(sum(seed * model(*args))) / d(that output), by a forward hook."""
    model = model.double()
    kept = {}

    def hook(_, __, out):
        out.retain_grad()
        kept["a"] = out

    handle = module.register_forward_hook(hook)
    try:
        y = model(*(torch.tensor(a, dtype=torch.float64) for a in args))
        (y * torch.tensor(seed, dtype=torch.float64)).sum().backward()
    finally:
        handle.remove()
        model.float()
    return kept["a"].detach().numpy(), kept["a"].grad.numpy()


def _close(got: np.ndarray, want: np.ndarray) -> None:
    assert np.abs(want).max() > 1e-4  # a gradient that shows something
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def _producer(model_bytes: bytes, op: str) -> list[str]:
    return [n.output[0] for n in onnx.load_from_string(model_bytes).graph.node if n.op_type == op]


# ---- a CRNN with a CTC (T, N, C) output -------------------------------------------------------------------------
class CRNN(nn.Module):
    """Conv backbone (height pooled to 1) -> (T, N, C) columns -> bidirectional LSTM -> per-step class scores."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.Tanh(),
                                      nn.Conv2d(8, 12, 3, stride=(2, 1), padding=1), nn.Tanh(),
                                      nn.AvgPool2d((HEIGHT // 2, 1)))
        self.lstm = nn.LSTM(12, HIDDEN, bidirectional=True)
        self.fc = nn.Linear(2 * HIDDEN, CLASSES)

    def forward(self, x):
        f = self.backbone(x).squeeze(2).permute(2, 0, 1)  # (W, N, C): one time step per column
        return self.fc(self.lstm(f)[0])


@functools.cache
def _crnn() -> tuple[CRNN, bytes, np.ndarray]:
    torch.manual_seed(3)
    model = CRNN().eval()
    with torch.no_grad():  # sharper per-step scores than the default init: a string of several characters
        model.fc.weight.mul_(12)
        model.fc.bias.zero_()
        model.lstm.weight_ih_l0.mul_(3)
        model.lstm.weight_ih_l0_reverse.mul_(3)
    x = np.random.default_rng(3).normal(size=(2, 1, HEIGHT, WIDTH)).astype(np.float32) * 2
    onnx_model = _export(model, (torch.tensor(x),), ["x"], {"x": {0: "n"}, "y": {1: "n"}})
    return model, onnx_model, x


def _decoded_away_from_ties(model, x) -> np.ndarray:
    """float64 scores (T, N, C); asserts every step's best class leads the next by a margin float32 keeps."""
    with torch.no_grad():
        scores = model.double()(torch.tensor(x, dtype=torch.float64)).numpy()
    model.float()
    top2 = np.sort(scores, axis=2)[..., -2:]
    assert (top2[..., 1] - top2[..., 0]).min() > 1e-3
    return scores


def test_crnn_automatic_layer_is_the_backbone_output_before_the_lstm():
    _, model_bytes, _ = _crnn()
    mg = ModelGraph(onnx.load_from_string(model_bytes), (1, 1, HEIGHT, WIDTH))
    assert choose.task_of(mg, "y") == "ocr"
    assert mg.default_layer("y") == _producer(model_bytes, "AveragePool")[0]  # (N, 12, 1, W), not the LSTM's
    assert "height collapsed to 1" in mg.layer_rule and "LSTM" in mg.layer_rule


def test_quantized_crnn_automatic_layer():
    """quantize_dynamic's CRNN (tests/test_ocr_detector_builds.py): ConvInteger maps, a DynamicQuantizeLSTM."""
    from .test_ocr_detector_builds import _quantized_crnn

    quantized = _quantized_crnn()
    mg = ModelGraph(quantized, (1, 1, 8, 16))
    assert choose.task_of(mg, "y") == "ocr"
    assert mg.default_layer("y") == _producer(quantized.SerializeToString(), "MaxPool")[0]
    assert "DynamicQuantizeLSTM" in mg.layer_rule and "2 rows high" in mg.layer_rule


@pytest.mark.parametrize("which", ["character", "string", "step"])
def test_crnn_gradient_matches_float64_torch(which):
    model, model_bytes, x = _crnn()
    ex = onnxcam.Explainer(model_bytes)
    layer = ex.layers[0]
    assert layer == _producer(model_bytes, "AveragePool")[0]
    scores = _decoded_away_from_ties(model, x)
    chars = [ocr.greedy_decode(scores[:, i]) for i in range(2)]
    assert all(len(c) >= 2 for c in chars), chars  # a string to explain, and a character that is not the only one
    target = {"character": ocr.CharacterTarget(1), "string": ocr.StringTarget(),
              "step": ocr.TimeStepTarget(5, 2)}[which]
    r = ocr.run_sequence(ex, x, target)
    # the seed as built from the float32 run's decoding, in the (T, N, C) layout, equals the float64 one
    want_seed = np.stack([target.seed(scores[:, i]) for i in range(2)], axis=1)
    np.testing.assert_array_equal(r.seed, want_seed)
    if which == "character":
        assert want_seed.sum() == sum(len(c[1].steps) for c in chars)  # one entry per step the character spans
    a, g = _reference(model, (x,), model.backbone[4], want_seed)
    _close(r.activations[layer], a)
    _close(r.gradients[layer], g)


def test_crnn_map_is_a_strip_over_the_columns():
    """A CAM class makes the map of a sequence target's run (maps_for): the layer's height is 1, so each column of
    the (H, W) map is constant and the map varies along the text."""
    _, model_bytes, x = _crnn()
    cam = onnxcam.GradCAM(model_bytes)
    maps = cam.maps_for(x, ocr.run_sequence(cam.explainer, x, ocr.CharacterTarget(1)))
    assert maps.shape == (2, HEIGHT, WIDTH) and cam.degenerate_reasons == [None, None]
    assert np.ptp(maps, axis=1).max() == 0 and np.ptp(maps, axis=2).min() > 0.5


def test_crnn_batch_of_targets_and_explicit_layout():
    model, model_bytes, x = _crnn()
    ex = onnxcam.Explainer(model_bytes)
    targets = [ocr.CharacterTarget(0), ocr.CharacterTarget(-1)]
    r = ocr.run_sequence(ex, x, targets, layout="TNC")
    scores = _decoded_away_from_ties(model, x)
    seed = np.stack([t.seed(scores[:, i]) for i, t in enumerate(targets)], axis=1)
    _, g = _reference(model, (x,), model.backbone[4], seed)
    _close(r.gradients[ex.layers[0]], g)
    with pytest.raises(InputError, match=r"not NTC for a batch of 2"):
        ocr.run_sequence(ex, x, targets, layout="NTC")


def test_greedy_decode_collapses_repeats_and_drops_blanks():
    best = [0, 3, 3, 0, 3, 2, 2, 2, 0, 0, 4]
    steps = np.eye(5)[best]
    assert ocr.greedy_decode(steps) == [ocr.Character(3, (1, 2)), ocr.Character(3, (4,)),
                                        ocr.Character(2, (5, 6, 7)), ocr.Character(4, (10,))]
    # another blank class: 0 becomes a character, 4 is dropped
    assert [c.category for c in ocr.greedy_decode(steps, blank=4)] == [0, 3, 0, 3, 2, 0]


@pytest.mark.parametrize(("shape", "batch", "declared", "want"), [
    ((2, 16, 6), 2, None, "NTC"), ((16, 2, 6), 2, None, "TNC"), ((1, 16, 6), 1, None, "NTC"),
    ((16, 1, 6), 1, None, "TNC"), ((3, 3, 6), 3, (16, "N", 6), "TNC"), ((3, 3, 6), 3, ("N", 3, 6), "NTC")])
def test_sequence_layout(shape, batch, declared, want):
    assert ocr.sequence_layout(shape, batch, declared=declared) == want


# ---- the CAM classes (pytorch-grad-cam's calling convention) with sequence targets ------------------------------
@functools.cache
def _crnn_export(batch: int, width: int, dynamic: bool) -> tuple[bytes, np.ndarray]:
    """_crnn's net exported for (batch, 1, HEIGHT, width) inputs, its batch axis symbolic or fixed; an input."""
    model, _, _ = _crnn()
    x = np.random.default_rng(width).normal(size=(batch, 1, HEIGHT, width)).astype(np.float32) * 2
    axes = {"x": {0: "n"}, "y": {1: "n"}} if dynamic else None
    return _export(model, (torch.tensor(x),), ["x"], axes), x


def _sequence_targets(which: str) -> list:
    """A different target per sample, so that a seed put on the wrong sample's scores shows."""
    return {"character": [ocr.CharacterTarget(1), ocr.CharacterTarget(0)], "string": [ocr.StringTarget()] * 2,
            "step": [ocr.TimeStepTarget(5, 2), ocr.TimeStepTarget(9, 4)]}[which]


@pytest.mark.parametrize("which", ["character", "string", "step"])
@pytest.mark.parametrize("batch", ["symbolic", "fixed"])
def test_cam_classes_take_sequence_targets_on_a_tnc_score(which, batch):
    """GradCAM(model)(x, targets=[...]) with CTC targets on the CRNN's (T, N, C) score (its batch axis symbolic,
    or fixed at 2): each sample's target is seeded on its own column of the score (axis 1, not a time step),
    and the gradients and the Grad-CAM maps match float64 torch."""
    model, _, x = _crnn()
    model_bytes = _crnn_export(2, WIDTH, batch == "symbolic")[0]
    scores = _decoded_away_from_ties(model, x)
    targets = _sequence_targets(which)
    cam = onnxcam.GradCAM(model_bytes)
    maps = cam(x, targets=targets)
    want_seed = np.stack([t.seed(scores[:, i]) for i, t in enumerate(targets)], axis=1)
    np.testing.assert_array_equal(cam.result.seed, want_seed)
    a, g = _reference(model, (x,), model.backbone[4], want_seed)
    layer = cam.target_layers[0]
    _close(cam.result.activations[layer], a)
    _close(cam.result.gradients[layer], g)
    _close(cam.raw[layer], (g.mean(axis=(2, 3))[:, :, None, None] * a).sum(axis=1))
    assert maps.shape == (2, HEIGHT, WIDTH) and cam.degenerate_reasons == [None, None]


def test_cam_classes_refuse_a_sequence_score_whose_batch_axis_is_ambiguous():
    """A fixed-batch export whose batch equals its time steps, (4, 4, C): the CAM classes used to cut the (T, N, C)
    score along T as if it were the batch and explain other samples' scores (a silent wrong answer); now one
    line names the shape and the way to give the layout, and that way gives the float64 torch gradient."""
    model, _, _ = _crnn()
    model_bytes, x = _crnn_export(4, 4, False)
    cam = onnxcam.GradCAM(model_bytes)
    with pytest.raises(InputError) as e:
        cam(x, targets=[ocr.TimeStepTarget(1, 2)] * 4)
    assert _one_line(e).startswith("score of shape (4, 4, 6) reads as (N, T, C) and as (T, N, C) for a batch of 4; "
                                   "give layout='NTC' or 'TNC' (to ocr.run_sequence")
    r = ocr.run_sequence(cam.explainer, x, ocr.TimeStepTarget(1, 2), layout="TNC")
    assert cam.maps_for(x, r).shape == (4, HEIGHT, 4)
    seed = np.zeros((4, 4, CLASSES), np.float32)
    seed[1, :, 2] = 1  # step 1, class 2, every sample
    _, g = _reference(model, (x,), model.backbone[4], seed)
    _close(r.gradients[cam.target_layers[0]], g)


def _ablation_reference(model, x: np.ndarray, seeds: np.ndarray) -> np.ndarray:
    """Ablation-CAM's raw maps in float64 torch: w_k = (y - y_k) / y, y = sum(seed * scores) for each sample's
    frozen seed, y_k with channel k of the backbone's output set to the sample's minimum activation - 1e7
    (pytorch-grad-cam's ablation value); map = sum_k w_k A_k."""
    model = model.double()
    xt = torch.tensor(x, dtype=torch.float64)
    weight = torch.tensor(seeds, dtype=torch.float64)  # (T, N, C)
    with torch.no_grad():
        a = model.backbone(xt)
        y = (model(xt) * weight).sum(dim=(0, 2))
        fill = a.flatten(1).min(dim=1).values - 1e7
        drops = []

        def ablate(k, out):
            out = out.clone()
            out[:, k] = fill[:, None, None]
            return out

        for k in range(a.shape[1]):
            handle = model.backbone.register_forward_hook(lambda m, i, o, k=k: ablate(k, o))
            drops.append((y - (model(xt) * weight).sum(dim=(0, 2))) / y)
            handle.remove()
    model.float()
    w = torch.stack(drops, dim=1).numpy()
    return (w[:, :, None, None] * a.numpy()).sum(axis=1)


@pytest.mark.parametrize("which", ["character", "string", "step"])
def test_gradient_free_cams_read_each_sample_of_a_tnc_score(which):
    """Ablation-CAM with CTC targets on the (T, N, C) CRNN matches its float64 torch definition, the targets frozen
    at the input's own decoding (a perturbed copy may decode to fewer characters); Score-CAM gives the maps it
    gives on the same net exported (N, T, C), where the score's rows are the samples."""
    model, model_bytes, x = _crnn()
    scores = _decoded_away_from_ties(model, x)
    targets = _sequence_targets(which)
    ablation = onnxcam.AblationCAM(model_bytes)
    ablation(x, targets=targets)
    seeds = np.stack([t.seed(scores[:, i]) for i, t in enumerate(targets)], axis=1)
    _close(ablation.raw[ablation.target_layers[0]], _ablation_reference(model, x, seeds))
    batch_first = _export(BatchFirst(model), (torch.tensor(x),), ["x"], {"x": {0: "n"}, "y": {0: "n"}})
    maps = [onnxcam.ScoreCAM(b)(x, targets=targets) for b in (model_bytes, batch_first)]
    np.testing.assert_allclose(maps[0], maps[1], atol=1e-5)
    assert np.ptp(maps[0], axis=2).min() > 0.5


class BatchFirst(nn.Module):
    """The same recognizer with its score transposed to (N, T, C)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).permute(1, 0, 2)


def test_shapley_cam_refuses_sequence_targets_in_one_line():
    _, model_bytes, x = _crnn()
    with pytest.raises(InputError) as e:
        onnxcam.ShapleyCAM(model_bytes)(x, targets=[ocr.TimeStepTarget(5, 2)] * 2)
    assert _one_line(e) == ("ShapleyCAM cannot take target TimeStepTarget(step=5, category=2) of a recognizer's "
                            "sequence scores yet; use GradCAM or another gradient method")


# ---- bad input: one line each ----------------------------------------------------------------------------------
def _one_line(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message
    return message


def test_bad_sequence_targets_say_what_is_wrong():
    steps = np.eye(CLASSES)[[0, 1, 1, 0, 2, 0]]
    with pytest.raises(InputError) as e:
        ocr.TimeStepTarget(6, 1).seed(steps)
    assert _one_line(e) == "time step 6 is out of range: the score has 6 time steps (0 to 5)"
    with pytest.raises(InputError) as e:
        ocr.TimeStepTarget(2, CLASSES).seed(steps)
    assert _one_line(e) == f"class {CLASSES} is out of range: the score has {CLASSES} classes (0 to {CLASSES - 1})"
    with pytest.raises(InputError) as e:
        ocr.CharacterTarget(2).seed(steps)
    assert _one_line(e) == "character 2 is out of range: the decoded string has 2 characters (0 to 1)"
    with pytest.raises(InputError) as e:
        ocr.StringTarget().seed(np.eye(CLASSES)[[0, 0, 0]])
    assert "decode to no characters" in _one_line(e)
    with pytest.raises(InputError) as e:
        ocr.sequence_seed(np.zeros((2, 2, CLASSES)), [ocr.StringTarget()] * 2)
    assert _one_line(e) == ("score of shape (2, 2, 6) reads as (N, T, C) and as (T, N, C) for a batch of 2; give "
                            "layout='NTC' or 'TNC' (to ocr.run_sequence; a CAM class then makes the maps with "
                            "maps_for)")


def test_crnn_out_of_range_character_through_the_explainer():
    _, model_bytes, x = _crnn()
    with pytest.raises(InputError) as e:
        ocr.run_sequence(onnxcam.Explainer(model_bytes), x, ocr.CharacterTarget(WIDTH))
    assert _one_line(e).startswith(f"character {WIDTH} is out of range: the decoded string has ")


# ---- a DBNet-style text detector ---------------------------------------------------------------------------------
class TinyDB(nn.Module):
    """Stride-4 backbone, an upsampling neck back to full size, a sigmoid probability map (N, 1, H, W)."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), nn.Tanh(), nn.Conv2d(8, 12, 3, 2, 1), nn.Tanh())
        self.up = nn.Upsample(scale_factor=4, mode="bilinear", align_corners=False)
        self.head = nn.Sequential(nn.Conv2d(12, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 1, 1), nn.Sigmoid())

    def forward(self, x):
        return self.head(self.up(self.backbone(x)))


def test_dbnet_text_region_matches_float64_torch():
    torch.manual_seed(2)
    model = TinyDB().eval()
    with torch.no_grad():  # a spread of probabilities around 0.3: some pixels above, some below
        model.head[2].weight.mul_(10)
        model.head[2].bias.fill_(-0.85)
    x = np.random.default_rng(2).normal(size=(1, 3, 32, 32)).astype(np.float32)
    model_bytes = _export(model, (torch.tensor(x),), ["x"])
    ex = onnxcam.Explainer(model_bytes)
    layer = ex.layers[0]
    assert layer == _producer(model_bytes, "Tanh")[1]  # the backbone's last map, not the map or the neck
    with torch.no_grad():
        prob = model.double()(torch.tensor(x, dtype=torch.float64)).numpy()
    model.float()
    assert np.abs(prob - 0.3).min() > 1e-4 and 0 < (prob > 0.3).mean() < 1
    target = ocr.text_region_target()
    logits = ex.run(x, seed=np.zeros_like(prob, np.float32)).logits
    seed = target.seed(logits[0])[None]
    np.testing.assert_array_equal(seed, np.float32(prob > 0.3))
    r = ex.run(x, seed=seed)
    a, g = _reference(model, (x,), model.backbone[3], seed)
    _close(r.activations[layer], a)
    _close(r.gradients[layer], g)
    maps = onnxcam.GradCAM(ex)(x, targets=[target])  # the CAM classes take it as a segmentation target
    assert maps.shape == (1, 32, 32) and maps.max() > 0


# ---- a model with a side input -----------------------------------------------------------------------------------
class Gated(nn.Module):
    """forward(side, image): the side vector gates the image features' channels and shifts the scores."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.Tanh(), nn.Conv2d(8, 8, 3, 2, 1), nn.Tanh())
        self.gate, self.shift = nn.Linear(4, 8), nn.Linear(4, 5)
        self.fc = nn.Linear(8, 5)

    def forward(self, side, image):
        f = self.features(image) * torch.sigmoid(self.gate(side))[:, :, None, None]
        return self.fc(f.mean((2, 3))) + self.shift(side)


@functools.cache
def _gated() -> tuple[Gated, bytes]:
    torch.manual_seed(2)
    model = Gated().eval()
    args = (torch.zeros(1, 4), torch.zeros(1, 3, 16, 16))
    return model, _export(model, args, ["side", "image"], {"side": {0: "n"}, "image": {0: "n"}, "y": {0: "n"}})


def test_side_input_gradient_matches_float64_torch():
    model, model_bytes = _gated()
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
    sides = [rng.normal(size=(2, 4)).astype(np.float32) * 2 for _ in range(2)]
    layer = _producer(model_bytes, "Tanh")[1]  # before the gate: its gradient depends on the side input
    ex = onnxcam.Explainer(model_bytes, layer, input_name="image")
    assert ex.input_name == "image"
    seed = np.zeros((2, 5), np.float32)
    seed[:, 3] = 1
    grads = []
    for side in sides:
        r = ex.run(x, targets=3, extra_inputs={"side": side})
        a, g = _reference(model, (side, x), model.features[3], seed)
        _close(r.activations[layer], a)
        _close(r.gradients[layer], g)
        grads.append(r.gradients[layer])
    assert np.abs(grads[0] - grads[1]).max() > 0.1 * np.abs(grads[0]).max()  # the side input changes the gradient


def test_side_input_gradient_at_the_image_itself():
    model, model_bytes = _gated()
    rng = np.random.default_rng(5)
    x, side = rng.normal(size=(2, 3, 16, 16)).astype(np.float32), rng.normal(size=(2, 4)).astype(np.float32)
    r = onnxcam.Explainer(model_bytes, "image", input_name="image").run(x, targets=[0, 4],
                                                                         extra_inputs={"side": side})
    image = torch.tensor(x, dtype=torch.float64, requires_grad=True)
    y = model.double()(torch.tensor(side, dtype=torch.float64), image)
    (y[0, 0] + y[1, 4]).backward()
    model.float()
    _close(r.gradients["image"], image.grad.numpy())


def test_side_input_through_the_cam_classes_and_missing_one():
    model, model_bytes = _gated()
    rng = np.random.default_rng(4)
    x = rng.normal(size=(2, 3, 16, 16)).astype(np.float32)
    side = rng.normal(size=(1, 4)).astype(np.float32)  # batch 1: repeated over the batch (its batch axis is free)
    layer = _producer(model_bytes, "Tanh")[1]
    cam = onnxcam.GradCAM(model_bytes, layer, input_name="image", extra_inputs={"side": side})
    maps = cam(x, targets=[ClassifierOutputTarget(1)] * 2)
    _, g = _reference(model, (np.repeat(side, 2, axis=0), x), model.features[3], np.eye(5, dtype=np.float32)[[1, 1]])
    _close(cam.result.gradients[layer], g)
    assert maps.shape == (2, 16, 16) and maps.max() > 0
    with pytest.raises(InputError) as e:
        onnxcam.Explainer(model_bytes, input_name="image").run(x)
    assert _one_line(e) == "the model's input 'side' (shape (?, 4)) is missing: give it in extra_inputs={'side': ...}"
    with pytest.raises(InputError) as e:
        onnxcam.Explainer(model_bytes, input_name="picture")
    assert _one_line(e) == "the model has no input named 'picture'; its inputs are 'side', 'image'"
