"""The Explainer's public face (issue 2): targets, top_k, seeds, input checks, caching, errors that name things."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcam
from onnxcam.errors import InputError, LayerError, ModelError, UnsupportedOpError

RNG = np.random.default_rng(0)
W_CONV = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)
W_FC = RNG.standard_normal((5, 4)).astype(np.float32)


def tiny(softmax: bool = True, batch="N", extra_op: str | None = None) -> onnx.ModelProto:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm [-> Softmax]: d logit_k / d relu = W[k, c] / (h*w)."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1], name="conv"),
             helper.make_node("Relu", ["conv"], ["relu"], name="relu"),
             helper.make_node("GlobalAveragePool", ["relu"], ["pool"], name="pool"),
             helper.make_node("Flatten", ["pool"], ["flat"], name="flat")]
    feat = "flat"
    if extra_op:
        nodes.append(helper.make_node(extra_op, ["flat"], ["odd"], name="odd_node"))
        feat = "odd"
    nodes.append(helper.make_node("Gemm", [feat, "fc"], ["logits"], transB=1, name="fc"))
    out = "logits"
    if softmax:
        nodes.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=1, name="softmax"))
        out = "probs"
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 6, 6])],
                              [helper.make_tensor_value_info(out, TensorProto.FLOAT, [batch, 5])],
                              [numpy_helper.from_array(W_CONV, "w"), numpy_helper.from_array(W_FC, "fc")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


X = RNG.standard_normal((3, 3, 6, 6)).astype(np.float32)


def expected_gradient(classes) -> np.ndarray:
    """Closed form: the gradient at the Relu output is W_fc[class] / 36 at every position."""
    return np.stack([np.broadcast_to(W_FC[c][:, None, None] / 36.0, (4, 6, 6)) for c in classes])


def test_defaults_score_is_the_softmax_input_and_layer_the_last_map():
    ex = onnxcam.Explainer(tiny(), device="cpu")
    assert ex.score_name == "logits" and ex.layers == ["relu"]
    assert ex.score_shape() == ("N", 5)
    r = ex.run(X)
    np.testing.assert_array_equal(r.targets, np.argmax(r.logits, axis=1))
    np.testing.assert_allclose(r.gradients["relu"], expected_gradient(r.targets), rtol=1e-6)
    assert set(r.outputs) == {"probs"} and r.activations["relu"].shape == (3, 4, 6, 6)


@pytest.mark.parametrize("targets,classes", [(2, [2, 2, 2]), ([4, 0, 1], [4, 0, 1]), (np.array([3, 3, 1]), [3, 3, 1])])
def test_explicit_targets(targets, classes):
    r = onnxcam.Explainer(tiny(), device="cpu").run(X, targets=targets)
    np.testing.assert_array_equal(r.targets, classes)
    np.testing.assert_allclose(r.gradients["relu"], expected_gradient(classes), rtol=1e-6)


def test_top_k_and_per_sample_target_lists_share_one_forward():
    ex = onnxcam.Explainer(tiny(), device="cpu")
    r = ex.run(X, top_k=3)
    order = np.argsort(-r.logits, axis=1)[:, :3]
    np.testing.assert_array_equal(r.targets, order)
    assert r.gradients["relu"].shape == (3, 3, 4, 6, 6)
    for s in range(3):
        np.testing.assert_allclose(r.gradients["relu"][:, s], expected_gradient(order[:, s]), rtol=1e-6)
    two = ex.run(X, targets=np.array([[0, 1], [2, 3], [4, 0]]))
    np.testing.assert_allclose(two.gradients["relu"][:, 1], expected_gradient([1, 3, 0]), rtol=1e-6)


def test_a_seed_weights_the_classes():
    seed = RNG.standard_normal((3, 5)).astype(np.float32)
    r = onnxcam.Explainer(tiny(), device="cpu").run(X, seed=seed)
    want = np.einsum("nk,kc->nc", seed, W_FC)[:, :, None, None] / 36.0 * np.ones((1, 1, 6, 6))
    np.testing.assert_allclose(r.gradients["relu"], want, rtol=1e-5)


@pytest.mark.parametrize("kwargs,message", [
    ({"targets": [1, 2]}, "got 2 targets for a batch of 3 samples"),
    ({"targets": 7}, "target class 7 is out of range: the score has 5 classes"),
    ({"targets": [0.5, 1, 2]}, "targets must be None, an int"),
    ({"top_k": 0}, "top_k must be a positive int"),
    ({"targets": 1, "top_k": 2}, "give only one of targets, top_k and seed"),
    ({"seed": np.zeros((3, 4))}, r"seed must have the score's shape \(3, 5\)"),
])
def test_bad_targets_are_value_errors_naming_the_problem(kwargs, message):
    with pytest.raises(ValueError, match=message):
        onnxcam.Explainer(tiny(), device="cpu").run(X, **kwargs)


def test_bad_input_shape_and_type():
    ex = onnxcam.Explainer(tiny(), device="cpu")
    with pytest.raises(InputError, match=r"input 'x' expects shape \(\?, 3, 6, 6\); got \(3, 3, 5, 6\)"):
        ex.run(np.zeros((3, 3, 5, 6), np.float32))
    with pytest.raises(InputError, match="x must be a numpy array"):
        ex.run([[1.0]])
    r = ex.run(X.astype(np.float64), targets=1)  # cast to the model's float type
    np.testing.assert_allclose(r.gradients["relu"], expected_gradient([1, 1, 1]), rtol=1e-6)


def test_layer_and_score_errors_list_close_matches():
    with pytest.raises(LayerError, match=r"no tensor, node or module named 'rel'.*close matches: tensors: \['relu'\]"):
        onnxcam.Explainer(tiny(), layers=["rel"], device="cpu")
    with pytest.raises(LayerError, match="layer 'probs' does not reach the score tensor 'logits'"):
        onnxcam.Explainer(tiny(), layers=["probs"], device="cpu")


def test_an_op_without_rule_is_named_before_anything_runs():
    with pytest.raises(UnsupportedOpError, match=r"no gradient rule .* Hardmax \(node 'odd_node', domain ai.onnx\)"):
        onnxcam.Explainer(tiny(softmax=False, extra_op="Hardmax"), device="cpu")


def test_models_from_path_bytes_proto_and_explainer_agree(tmp_path):
    path = tmp_path / "tiny.onnx"
    onnx.save(tiny(), str(path))
    results = [onnxcam.Explainer(m, device="cpu").run(X, targets=2).gradients["relu"]
               for m in (str(path), path.read_bytes(), tiny())]
    base = onnxcam.Explainer(str(path), device="cpu")
    results.append(onnxcam.Explainer(base, layers=["conv"], device="cpu").run(X, targets=2).activations["conv"])
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])
    assert results[3].shape == (3, 4, 6, 6)
    assert onnxcam.Explainer(str(path), device="cpu").digest == base.digest == onnxcam.Explainer(tiny()).digest
    with pytest.raises(ModelError, match="model file not found"):
        onnxcam.Explainer(str(tmp_path / "missing.onnx"))


def test_the_explainable_model_is_a_valid_self_contained_onnx_model():
    model = onnxcam.Explainer(tiny(), device="cpu").explainable_model
    onnx.checker.check_model(model)
    ops = {n.op_type for n in model.graph.node}
    assert not {"Gradient", "ReluGrad", "ConvGrad"} & ops
    assert {"onnxcam_classes", "onnxcam_ranked"} <= {i.name for i in model.graph.input}


def test_batch_1_models_explain_larger_batches():
    """Freed (graph/free_batch.py) into one run, or one sample at a time: the same gradients."""
    r = onnxcam.Explainer(tiny(batch=1), device="cpu").run(X, targets=[0, 1, 2])
    np.testing.assert_allclose(r.gradients["relu"], expected_gradient([0, 1, 2]), rtol=1e-6)


def test_two_layers_with_one_gradient_tensor_both_get_it():
    """An Identity between two target layers hands both the same gradient tensor; each still gets an output."""
    model = tiny(softmax=False)
    relu = next(n for n in model.graph.node if n.name == "relu")
    relu.output[0] = "relu_pre"
    model.graph.node.insert(2, helper.make_node("Identity", ["relu_pre"], ["relu"], name="copy"))
    r = onnxcam.Explainer(model, layers=["relu_pre", "relu"], device="cpu").run(X, targets=[0, 2, 4])
    for layer in ("relu_pre", "relu"):
        np.testing.assert_allclose(r.gradients[layer], expected_gradient([0, 2, 4]), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("batch", ["N", 1])
def test_forward_is_the_plain_models_outputs_and_score(batch):
    """Explainer.forward: what a caller reads before it seeds a run (a detector's detections), from the model alone;
    the same outputs and score as a run, for a free batch and a batch-1 export alike."""
    ex = onnxcam.Explainer(tiny(batch=batch), device="cpu", build=False)
    x = RNG.standard_normal((3, 3, 6, 6)).astype(np.float32)
    got = ex.forward(x)
    r = ex.run(x)
    np.testing.assert_allclose(got[ex.score_name], r.logits, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(got["probs"], r.outputs["probs"], rtol=1e-6, atol=1e-6)
    assert got[ex.score_name].shape == (3, 5)
    bad = tiny(batch=batch)
    bad.graph.initializer[1].CopyFrom(numpy_helper.from_array(np.full_like(W_FC, np.inf), "fc"))
    with pytest.raises(onnxcam.errors.NumericalError, match="the score 'logits' holds"):
        onnxcam.Explainer(bad, device="cpu", build=False).forward(x[:1])
