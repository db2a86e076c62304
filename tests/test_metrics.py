"""onnxcam.metrics: pytorch-grad-cam 1.5.7's metrics on the torch model vs onnxcam's on its ONNX export (same
inputs, maps, targets), torchcam 0.5's definitions against values computed by hand on a linear model, the pointing
games on hand-made maps, and the one-line errors."""

from __future__ import annotations

import functools
import math
import os
import threading
import types

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

torch = pytest.importorskip("torch")
pgc_metrics = pytest.importorskip("pytorch_grad_cam.metrics")
from pytorch_grad_cam.metrics import cam_mult_image as torch_cmi
from pytorch_grad_cam.metrics import road as torch_road
from pytorch_grad_cam.utils import model_targets as torch_targets

import onnxcam
from onnxcam import metrics
from onnxcam.errors import InputError
from onnxcam.metrics import perturbation_confidence, road
from onnxcam.utils import model_targets

from .torch_models import export, make_model

TOL = 1e-4
SIZE = 48


@functools.cache
def resnet() -> types.SimpleNamespace:
    """A seeded resnet18, its ONNX export, a batch of 2 and smooth maps (random 8x8 grids upsampled: the removed
    regions of ROAD are then large connected holes, some touching the border)."""
    model = make_model("resnet18")
    x = torch.randn(2, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    rng = np.random.default_rng(3)
    coarse = rng.random((2, 8, 8)).astype(np.float32)
    cams = torch.nn.functional.interpolate(torch.from_numpy(coarse)[:, None], (SIZE, SIZE), mode="bilinear")
    return types.SimpleNamespace(model=model, x=x, onnx=export(model, x, "torchscript"), cams=cams[:, 0].numpy())


def _targets(classes):
    return [torch_targets.ClassifierOutputTarget(c) for c in classes], \
        [model_targets.ClassifierOutputTarget(c) for c in classes]


def _same_noise(monkeypatch, seed: int) -> None:
    """pytorch-grad-cam's imputation draws torch.randn_like from torch's global generator; make it draw the float32
    standard normals numpy's Generator(seed) gives onnxcam, in the same order (one block per imputed image)."""
    gen = np.random.default_rng(seed)
    monkeypatch.setattr(torch_road.torch, "randn_like",
                        lambda t: torch.from_numpy(gen.standard_normal(tuple(t.shape), dtype=np.float32)))


# ---- pytorch-grad-cam's metrics: parity on the same inputs, maps and targets ----------------------------------
@pytest.mark.parametrize("name", ["CamMultImageConfidenceChange", "DropInConfidence", "IncreaseInConfidence"])
def test_cam_mult_image_metrics_match_pytorch_grad_cam(name):
    r = resnet()
    # the most negative logit of each sample rises when the input shrinks towards 0: IncreaseInConfidence sees 1s
    low = np.argsort(r.model(r.x).detach().numpy(), axis=1)
    seen = []
    for classes in ([3, 7], low[:, 0].tolist()):
        theirs_t, ours_t = _targets(classes)
        want = getattr(torch_cmi, name)()(r.x, r.cams, theirs_t, r.model)
        got = getattr(metrics, name)()(r.x.numpy(), r.cams, ours_t, r.onnx)
        np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
        assert got.shape == (2,) and got.dtype == np.float32
        seen.append(want)
    assert np.any(np.concatenate(seen) != 0)


def test_cam_mult_image_visualization_and_raw_scores_match():
    r = resnet()
    theirs_t, ours_t = _targets([3, 7])
    want, want_x = torch_cmi.CamMultImageConfidenceChange()(r.x, r.cams, theirs_t, r.model, return_visualization=True,
                                                             return_diff=False)
    got, got_x = metrics.CamMultImageConfidenceChange()(r.x.numpy(), r.cams, ours_t, r.onnx,
                                                        return_visualization=True, return_diff=False)
    np.testing.assert_array_equal(got_x, want_x.numpy())
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("solver", ["direct", "cg"])
@pytest.mark.parametrize("size, percentile", [(9, 10), (16, 50), (40, 90), (5, 100)])
def test_noisy_linear_imputation_matches_pytorch_grad_cam(size, percentile, solver):
    """Without noise, both solvers' fill equals pytorch-grad-cam's (borders, corners, big holes, one pixel)."""
    rng = np.random.default_rng(size)
    img = rng.standard_normal((3, size, size)).astype(np.float32)
    coarse = rng.random((1, 1, 3, 3)).astype(np.float32)
    cam = torch.nn.functional.interpolate(torch.from_numpy(coarse), (size, size), mode="bilinear")[0, 0].numpy()
    mask = np.float32(cam < np.percentile(cam, percentile))
    want = torch_road.NoisyLinearImputer(noise=0)(torch.from_numpy(img), torch.from_numpy(mask)).numpy()
    got = road.NoisyLinearImputer(noise=0, solver=solver)(img, mask)
    assert np.any(got != img)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name, args, levels", [("ROADMostRelevantFirst", (80,), None),
                                                ("ROADLeastRelevantFirst", (20,), None),
                                                ("ROADMostRelevantFirst", (50,), 4),  # ties at the threshold
                                                ("ROADLeastRelevantFirst", (50,), 4)])
def test_road_matches_pytorch_grad_cam(monkeypatch, name, args, levels):
    r = resnet()
    cams = r.cams if levels is None else np.round(r.cams * levels) / np.float32(levels)
    if levels:
        assert np.percentile(cams, 50) in cams  # the threshold is a map value: < and <= would differ
    theirs_t, ours_t = _targets([3, 7])
    _same_noise(monkeypatch, 11)
    want = getattr(torch_road, name)(*args)(r.x, cams, theirs_t, r.model)
    got = getattr(road, name)(*args, rng=11)(r.x.numpy(), cams, ours_t, r.onnx)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)
    assert np.all(want != 0)


@pytest.mark.parametrize("name", ["ROADMostRelevantFirstAverage", "ROADLeastRelevantFirstAverage", "ROADCombined"])
def test_road_averages_match_pytorch_grad_cam(monkeypatch, name):
    """Noise drawn percentile by percentile, sample by sample, LeRF before MoRF: the same draws on both sides
    (and the numpy-only solver; the single-percentile tests use scipy's, as pytorch-grad-cam)."""
    r = resnet()
    theirs_t, ours_t = _targets([5, 1])
    percentiles = [30, 90]
    _same_noise(monkeypatch, 2)
    want = getattr(torch_road, name)(percentiles)(r.x, r.cams, theirs_t, r.model)
    explainer = onnxcam.Explainer(r.onnx)  # the model may also be given as an Explainer
    got = getattr(road, name)(percentiles, rng=2, solver="cg")(r.x.numpy(), r.cams, ours_t, explainer)
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_imputing_every_pixel_fills_zeros(solver):
    """A constant map removes every pixel at any MoRF percentile: nothing to interpolate from, so 0 (+ noise), where
    pytorch-grad-cam's singular solve gives NaN."""
    img = np.ones((3, 4, 5), np.float32)
    got = road.NoisyLinearImputer(noise=0, solver=solver)(img, np.zeros((4, 5), np.float32))
    np.testing.assert_array_equal(got, 0)
    got = road.ROADMostRelevantFirst(50, solver=solver)(resnet().x.numpy(), np.zeros((2, SIZE, SIZE), np.float32),
                                                        None, resnet().onnx)
    assert np.all(np.isfinite(got))


def test_arcc_matches_pytorch_grad_cam(monkeypatch):
    """Complexity, coherency (the method rerun on input x map) and ROAD, on Grad-CAM maps of both models."""
    import pytorch_grad_cam
    from pytorch_grad_cam.metrics import arcc as torch_arcc

    r = resnet()
    theirs_t, ours_t = _targets([3, 7])
    torch_cam = pytorch_grad_cam.GradCAM(r.model, [r.model.layer4])
    maps = torch_cam(r.x, theirs_t)
    _same_noise(monkeypatch, 4)
    want = torch_arcc.ARCC(torch_cam, [30, 70])(r.x, maps, theirs_t, r.model)
    got = metrics.ARCC(onnxcam.GradCAM(r.onnx, ["layer4"]), [30, 70], rng=4)(r.x.numpy(), maps, ours_t, r.onnx)
    assert want.max() > 0.5  # a value away from the 1e-8 floors
    np.testing.assert_allclose(got, want, atol=TOL, rtol=0)


def test_road_solves_on_threads_and_draws_the_noise_in_order(monkeypatch):
    """perturb_all: the sparse solves of every (percentile, order, sample) on a thread pool, the noise drawn after
    them in the sequential order: the imputed copies equal a one-by-one run's bit for bit."""
    r = resnet()
    x, cams = r.x.numpy(), r.cams
    threads, real = set(), road.NoisyLinearImputer.solve

    def solve(self, img, removed):
        threads.add(threading.get_ident())
        return real(self, img, removed)

    monkeypatch.setattr(road.NoisyLinearImputer, "solve", solve)

    def copies(combined):
        return combined.lerf_averager.metrics() + combined.morf_averager.metrics()

    got = perturbation_confidence.perturb_all(copies(metrics.ROADCombined([20, 60], rng=5)), x, cams)
    want = [m.perturb(x, cams) for m in copies(metrics.ROADCombined([20, 60], rng=5))]
    assert len(got) == len(want) == 4
    for g, w in zip(got, want):
        np.testing.assert_array_equal(g, w)
    assert not np.array_equal(got[0], x)  # pixels were imputed
    if (os.cpu_count() or 1) > 1:
        assert len(threads) > 2  # the pool's workers and the sequential run's caller all solved


def test_road_combined_scores_every_copy_in_batched_runs():
    """ROADCombined over 3 percentiles on 2 images: 2 originals + 12 imputed copies in ceil(14 / 8) = 2 runs."""
    r = resnet()
    scorer = metrics.ModelScorer(r.onnx, batch_size=8)
    runs = []
    real = scorer._session

    class Counting:
        def run(self, names, feeds):
            runs.append(len(next(iter(feeds.values()))))
            return real.run(names, feeds)

    scorer._session = Counting()
    metrics.ROADCombined([20, 50, 90], rng=0)(r.x.numpy(), r.cams, None, scorer)
    assert runs == [8, 6]


def test_metrics_take_pytorch_grad_cams_target_objects():
    """Code that kept its pytorch_grad_cam.utils.model_targets import: targets are converted by class name."""
    r = resnet()
    theirs = [torch_targets.ClassifierOutputReST(3), torch_targets.FinerWeightedTarget(7, [1, 2], 0.5)]
    ours = [model_targets.ClassifierOutputReST(3), model_targets.FinerWeightedTarget(7, [1, 2], 0.5)]
    want = torch_cmi.CamMultImageConfidenceChange()(r.x, r.cams, theirs, r.model)
    np.testing.assert_allclose(metrics.CamMultImageConfidenceChange()(r.x.numpy(), r.cams, theirs, r.onnx), want,
                               atol=TOL, rtol=0)
    np.testing.assert_allclose(metrics.CamMultImageConfidenceChange()(r.x.numpy(), r.cams, ours, r.onnx), want,
                               atol=TOL, rtol=0)


def test_metrics_default_to_the_top_class():
    r = resnet()
    top = r.model(r.x).argmax(1).tolist()
    _, ours_t = _targets(top)
    want = metrics.DropInConfidence()(r.x.numpy(), r.cams, ours_t, r.onnx)
    np.testing.assert_array_equal(metrics.DropInConfidence()(r.x.numpy(), r.cams, None, r.onnx), want)


# ---- torchcam's definitions, by hand on a linear model ---------------------------------------------------------
W = np.array([[1.0, 2.0, 3.0, 4.0], [-1.0, -2.0, -3.0, -4.0]], np.float32)  # 2 classes over 4 input pixels


@functools.cache
def linear_model() -> bytes:
    """logits = W @ flatten(x) for x (N, 1, 2, 2)."""
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["x"], ["flat"]), helper.make_node("Gemm", ["flat", "W"], ["logits"], transB=1)],
        "linear", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, 2, 2])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])],
        [helper.make_tensor("W", TensorProto.FLOAT, W.shape, W.ravel())])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8).SerializeToString()


X = np.array([[1, 1, 1, 1], [1, -1, 1, -1]], np.float32).reshape(2, 1, 2, 2)
CAMS = np.array([[0.9, 0.1, 0.5, 0.3], [0.0, 1.0, 0.0, 1.0]], np.float32).reshape(2, 2, 2)


def test_classification_metric_by_hand():
    """Sample 0: top class 0, y = 10, y' = 0.9 + 0.2 + 1.5 + 1.2 = 3.8, drop 0.62. Sample 1: top class 1, y = 2,
    y' = 2 + 4 = 6: an increase, no drop."""
    m = metrics.ClassificationMetric(linear_model())
    m.update(X, CAMS)
    got = m.summary()
    assert got["avg_drop"] == pytest.approx((6.2 / (10 + 1e-7) + 0) / 2, abs=1e-6)
    assert got["conf_increase"] == 0.5
    m.update(X[:1], CAMS[:1], class_idx=1)  # y = -10, y' = -3.8: an increase, and no drop (max(0, -6.2) = 0)
    assert m.summary() == pytest.approx({"avg_drop": 0.62 / 3, "conf_increase": 2 / 3}, abs=1e-6)


def test_classification_metric_softmax_by_hand():
    m = metrics.ClassificationMetric(linear_model(), "softmax")
    m.update(X[:1], CAMS[:1])
    p, p_masked = 1 / (1 + math.exp(-20)), 1 / (1 + math.exp(-7.6))  # softmax of (z, -z) is sigmoid(2z)
    assert m.summary()["avg_drop"] == pytest.approx((p - p_masked) / (p + 1e-7), abs=1e-6)


@pytest.mark.parametrize("steps, fractions, deletion, insertion", [
    # ranks by the map 0.9, 0.1, 0.5, 0.3: pixels 0, 2, 3, 1; class 0 weights 1, 2, 3, 4 on an all-ones image
    (2, [0, 0.5, 1], [10, 6, 0], [0, 4, 10]),
    (3, [0, 0.5, 1], [10, 6, 0], [0, 4, 10]),  # ceil(4 / 3) = 2 pixels per step
    (4, [0, 0.25, 0.5, 0.75, 1], [10, 9, 6, 2, 0], [0, 1, 4, 8, 10]),
    (20, [0, 0.25, 0.5, 0.75, 1], [10, 9, 6, 2, 0], [0, 1, 4, 8, 10]),  # at most one step per position
])
def test_deletion_insertion_by_hand(steps, fractions, deletion, insertion):
    m = metrics.DeletionInsertionMetric(linear_model(), steps=steps)
    m.update(X[:1], CAMS[:1])
    np.testing.assert_allclose(m.fractions, fractions)
    np.testing.assert_allclose(m.deletion_curves, [deletion])
    np.testing.assert_allclose(m.insertion_curves, [insertion])
    trapezoid = lambda y: sum((a + b) / 2 * (f1 - f0) for a, b, f0, f1 in
                              zip(y, y[1:], fractions, fractions[1:]))
    assert m.summary() == pytest.approx({"deletion_auc": trapezoid(deletion), "insertion_auc": trapezoid(insertion)})


def test_deletion_insertion_baseline_and_ties():
    """Equal map values keep pixel order (a stable ranking); a baseline of 1 makes the all-deleted score 10."""
    m = metrics.DeletionInsertionMetric(linear_model(), steps=4, baseline=np.ones((1, 1, 2, 2), np.float32) * 2)
    m.update(X[:1] * 0, np.zeros((1, 2, 2), np.float32), class_idx=0)
    np.testing.assert_allclose(m.deletion_curves, [[0, 2, 6, 12, 20]])


def test_metrics_with_a_cam_object_compute_the_maps():
    r = resnet()
    cam = onnxcam.GradCAM(r.onnx, ["layer4"])
    m = metrics.ClassificationMetric(cam)
    m.update(r.x.numpy())
    top = r.model(r.x).argmax(1).tolist()
    maps = cam(r.x.numpy(), [model_targets.ClassifierOutputTarget(c) for c in top])
    ref = metrics.ClassificationMetric(r.onnx)
    ref.update(r.x.numpy(), maps)
    assert m.summary() == ref.summary()


# ---- pointing games ----------------------------------------------------------------------------------------------
def _peaked(h=20, w=30, at=(5, 25)):
    cam = np.zeros((1, h, w), np.float32)
    cam[0, 10:15, 0:4] = 0.5
    cam[0, at[0], at[1]] = 1.0
    return cam


def test_pointing_game_by_hand():
    cam = _peaked()
    assert metrics.pointing_game(cam, boxes=[[24, 4, 27, 7]], tolerance=0).tolist() == [True]
    assert metrics.pointing_game(cam, boxes=[[0, 10, 4, 15]], tolerance=0).tolist() == [False]
    assert metrics.pointing_game(cam, boxes=[[0, 0, 23, 20]], tolerance=2).tolist() == [False]  # column 22: 3 px away
    assert metrics.pointing_game(cam, boxes=[[0, 0, 23, 20]], tolerance=3).tolist() == [True]
    mask = np.zeros((1, 20, 30), bool)
    mask[0, 5, 25] = True
    assert metrics.pointing_game(cam, masks=mask, tolerance=0).tolist() == [True]
    two = [np.array([[0, 0, 1, 1], [25, 5, 26, 6]])]  # the union of a sample's boxes
    assert metrics.pointing_game(cam, boxes=two, tolerance=0).tolist() == [True]


def test_energy_pointing_game_by_hand():
    cam = _peaked()  # total 1 + 20 * 0.5 = 11
    got = metrics.energy_pointing_game(cam, boxes=[[0, 10, 2, 15]])  # 10 of the 0.5 pixels
    np.testing.assert_allclose(got, [5 / 11])
    mask = np.zeros((1, 20, 30))
    mask[0, 5, 25] = 1
    np.testing.assert_allclose(metrics.energy_pointing_game(cam, masks=mask), [1 / 11])


# ---- bad input: one line each ----------------------------------------------------------------------------------
def _one_line(exc_info) -> str:
    text = str(exc_info.value)
    assert "\n" not in text
    return text


def test_pointing_game_without_objects_is_one_line():
    with pytest.raises(InputError) as e:
        metrics.pointing_game(_peaked())
    assert "boxes" in _one_line(e) and "masks" in _one_line(e)
    with pytest.raises(InputError) as e:
        metrics.energy_pointing_game(_peaked())
    assert "boxes" in _one_line(e)


@pytest.mark.parametrize("make", [lambda: metrics.DeletionInsertionMetric(linear_model(), steps=0),
                                  lambda: metrics.ROADCombined(percentiles=[]),
                                  lambda: metrics.ROADMostRelevantFirstAverage([]),
                                  lambda: metrics.ModelScorer(linear_model(), batch_size=0)])
def test_zero_perturbations_are_one_line(make):
    with pytest.raises(InputError) as e:
        make()
    assert any(word in _one_line(e) for word in ("steps", "percentiles", "batch_size"))


def test_bad_maps_and_targets_are_one_line():
    r = resnet()
    with pytest.raises(InputError) as e:
        metrics.DropInConfidence()(r.x.numpy(), r.cams[:, :10], None, r.onnx)
    assert "cams" in _one_line(e)
    with pytest.raises(InputError) as e:
        metrics.DropInConfidence()(r.x.numpy(), r.cams, [model_targets.ClassifierOutputTarget(1)], r.onnx)
    assert "1 targets for a batch of 2" in _one_line(e)
    with pytest.raises(InputError) as e:
        metrics.ROADMostRelevantFirst("auto")
    assert "percentile" in _one_line(e)
    with pytest.raises(InputError) as e:
        metrics.ClassificationMetric(linear_model()).update(X, CAMS, class_idx=5)
    assert "class_idx" in _one_line(e)


def test_metrics_read_any_tensor_of_the_model():
    """output= names an inner tensor: it is exposed for the metric without touching the caller's model."""
    proto = onnx.load_from_string(linear_model())
    scorer = metrics.ModelScorer(proto, output="flat")
    np.testing.assert_array_equal(scorer(X), X.reshape(2, 4))
    assert [o.name for o in proto.graph.output] == ["logits"]
    with pytest.raises(InputError) as e:
        metrics.ModelScorer(proto, output="nope")
    assert "nope" in _one_line(e)


def _dense_imputation(img: np.ndarray, removed: np.ndarray, skip: frozenset = frozenset()) -> np.ndarray:
    """float64 reference fill, one equation per removed pixel written out from the definition and solved densely:
    sum_j w_j (x_j - x_i) = 0 over its in-image neighbours j (kept ones are known). `skip` drops the couplings
    between the given pairs of removed pixels (to show the test below can see one go missing)."""
    h, w = removed.shape
    pixels = list(zip(*np.nonzero(removed)))
    index = {p: k for k, p in enumerate(pixels)}
    a, b = np.zeros((len(pixels), len(pixels))), np.zeros((len(pixels), img.shape[0]))
    for k, (i, j) in enumerate(pixels):
        for (di, dj), weight in road.NEIGHBOR_WEIGHTS.items():
            q = (i + di, j + dj)
            if not (0 <= q[0] < h and 0 <= q[1] < w):
                continue
            a[k, k] += weight
            if q not in index:
                b[k] += weight * img[:, q[0], q[1]]
            elif frozenset({(i, j), q}) not in skip:
                a[k, index[q]] -= weight
    return np.linalg.solve(a, b).T


@pytest.mark.parametrize("solver", ["direct", "cg"])
def test_imputation_solves_every_hole_and_their_couplings(solver):
    """Holes of several shapes (two blobs joined only by one diagonal step, one on the border and corner, one pixel,
    a thin line): the fill equals the dense solve of the equations within 1e-6, and dropping the one diagonal
    coupling between the two blobs moves the dense answer by far more than that (so a solver that splits the holes
    4-connected, or loses a coupling, fails here)."""
    rng = np.random.default_rng(5)
    img = rng.standard_normal((3, 14, 16))
    removed = np.zeros((14, 16), bool)
    removed[2:5, 2:6] = removed[5:8, 6:9] = True  # touch only where (4, 5) meets (5, 6)
    removed[10:14, 12:16] = removed[0, 15] = removed[11, 2:9] = True
    removed[8, 0] = True
    want = _dense_imputation(img, removed)
    got = road.NoisyLinearImputer(noise=0, solver=solver).solve(img, removed)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=0)
    decoupled = _dense_imputation(img, removed, skip=frozenset({frozenset({(4, 5), (5, 6)})}))
    assert np.abs(decoupled - want).max() > 1e-3


def test_the_float32_factorization_refined_gives_the_float64_answer(monkeypatch):
    """The direct solver factorizes in float32 and refines with float64 residuals: on a 224 x 224 image with a hole of
    80% of the pixels (the worst conditioned system ROAD solves) its fill equals a float64 factorization's within
    1e-10, where the float32 solve alone is off by more than 1e-8; with no refinement step allowed it falls back to
    the float64 factorization."""
    from scipy.sparse.linalg import splu

    rng = np.random.default_rng(0)
    coarse = rng.random((1, 1, 7, 7)).astype(np.float32)
    cam = torch.nn.functional.interpolate(torch.from_numpy(coarse), (224, 224), mode="bilinear")[0, 0].numpy()
    img = rng.standard_normal((3, 224, 224)).astype(np.float32)
    removed = cam >= np.percentile(cam, 20)

    def solve():
        return road.NoisyLinearImputer(noise=0, solver="direct").solve(img, removed)

    got = solve()
    monkeypatch.setattr(road, "_REFINE_STEPS", 0)
    factored = []
    monkeypatch.setattr("scipy.sparse.linalg.splu", lambda a, **k: factored.append(a.dtype) or splu(a, **k))
    want = solve()
    assert factored == [np.float32, np.float64]  # the float32 try, then the float64 factorization
    np.testing.assert_allclose(got, want, atol=1e-10, rtol=0)
    monkeypatch.setattr(road, "_REFINED", np.inf)  # the float32 solve as it comes
    assert np.abs(solve() - want).max() > 1e-8


def test_the_dissection_order_numbers_each_separator_after_both_its_sides():
    """The imputation's unknowns are ordered by road._dissection_rank: a permutation of the grid's pixels where
    the middle line of the grid comes after every pixel of the two sides it parts (what makes the factorization
    cheap), recursively."""
    h, w = 9, 13
    rank = road._dissection_rank(h, w).reshape(h, w)
    assert sorted(rank.ravel()) == list(range(h * w))
    mid = w // 2  # the wider side is cut first: column 6
    assert rank[:, mid].min() > max(rank[:, :mid].max(), rank[:, mid + 1:].max())
    assert rank[:, :mid].max() < rank[:, mid + 1:].min()  # the left side, then the right
