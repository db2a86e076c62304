"""Where onnxruntime runs the gradient nodes: read from a profiled run (runtime.py node_placement), so that on CUDA
a gradient op left on the CPU is named instead of silently costing two copies per run."""

import io
import json

import numpy as np
import onnx
import pytest
import torch

import onnxcam
from onnxcam import rewrite
from onnxcam.runtime import cuda_usable, first_run_placement, gradient_fallbacks, node_placement, session


def _small_cnn() -> bytes:
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, stride=2),
                              torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                              torch.nn.Linear(8, 5)).eval()
    f = io.BytesIO()
    torch.onnx.export(net, (torch.zeros(1, 3, 16, 16),), f, dynamo=False, opset_version=17,
                      input_names=["input"], output_names=["logits"], dynamic_axes={"input": {0: "N"}})
    return f.getvalue()


def _float_gradient_nodes(model: onnx.ModelProto) -> set:
    """Gradient nodes whose outputs are floating point, by ONNX shape inference (independent of any profile)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    types = {v.name: v.type.tensor_type.elem_type for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    return {n.name for n in inferred.graph.node if n.name.startswith("onnxcam_grad")
            and any(types.get(o) == onnx.TensorProto.FLOAT for o in n.output)}


def test_the_profile_names_each_gradient_node_and_where_it_ran(tmp_path):
    ex = onnxcam.Explainer(_small_cnn(), device="cpu")
    model = ex.explainable_model
    sess = session(model.SerializeToString(), "cpu", profile=str(tmp_path / "p"))
    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    sess.run(None, {"input": x, rewrite.CLASSES: np.array([[1], [3]], np.int64), rewrite.RANKED: np.array(False)})
    with open(sess.end_profiling()) as f:
        placed = node_placement(json.load(f))

    grad_nodes = {name for name in placed if name.startswith("onnxcam_grad")}
    assert grad_nodes, "the profile shows no gradient node"
    assert {where for _, where, _ in placed.values()} == {"CPUExecutionProvider"}
    assert gradient_fallbacks(placed, "CPUExecutionProvider") == []
    # Seen from a CUDA session, every float gradient node that ran on the CPU is a fallback; integer and boolean
    # ones (class indices, masks) are not.
    off_device = gradient_fallbacks(placed, "CUDAExecutionProvider")
    expected = _float_gradient_nodes(model) & grad_nodes
    assert expected and {f.rsplit(" (", 1)[0] for f in off_device} == expected
    assert any(not ({"float"} & set(types)) for name, (_, _, types) in placed.items() if name in grad_nodes), \
        "the model has no non-float gradient node: the integer case is not exercised"
    assert all(f.endswith(")") and f" ({placed[f.rsplit(' (', 1)[0]][0]})" in f for f in off_device)


def test_only_cuda_sessions_watch_their_placement():
    ex = onnxcam.Explainer(_small_cnn(), device="cpu")
    sess = session(ex.explainable_model.SerializeToString(), "cpu", watch_placement=True)
    assert first_run_placement(sess) is None
    ex.run(np.zeros((1, 3, 16, 16), np.float32))
    assert ex.cpu_fallbacks is None


@pytest.mark.skipif(not cuda_usable(), reason="needs a CUDA GPU usable by onnxruntime")
def test_cuda_runs_every_gradient_node_on_the_gpu_and_agrees_with_the_cpu():
    model = _small_cnn()
    x = np.random.default_rng(1).standard_normal((4, 3, 16, 16)).astype(np.float32)
    gpu = onnxcam.Explainer(model, device="cuda")
    assert gpu.providers[0] == "CUDAExecutionProvider"
    got = gpu.run(x, top_k=2)
    assert gpu.cpu_fallbacks == []
    want = onnxcam.Explainer(model, device="cpu").run(x, top_k=2)
    np.testing.assert_array_equal(got.targets, want.targets)
    for layer in want.gradients:  # CUDA convolutions may use TF32: compare at that precision
        np.testing.assert_allclose(got.gradients[layer], want.gradients[layer], rtol=1e-2, atol=1e-3)
