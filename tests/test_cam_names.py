"""Layer names as users know them: torch module paths (TorchScript scopes in node names, dynamo name_scopes
metadata), Keras layer names kept by tf2onnx, plain tensor and node names, and the errors for names that miss."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcam
from onnxcam.graph import names

torch = pytest.importorskip("torch")

KERAS = Path(__file__).parent / "fixtures" / "keras" / "custom_cnn.onnx"


class Block(torch.nn.Module):
    def __init__(self, c):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(c, c, 3, padding=1)
        self.relu = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.relu(self.conv2(self.relu(self.conv1(x))) + x)  # one ReLU module, called twice


class Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.layers = torch.nn.Sequential(Block(8), Block(8))
        self.fc = torch.nn.Linear(8, 4)

    def forward(self, x):
        x = self.layers(self.stem(x))
        return self.fc(torch.flatten(torch.nn.functional.adaptive_avg_pool2d(x, 1), 1))


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return Net().eval()


@pytest.fixture(scope="module")
def x():
    return torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def torchscript(net, x):
    import io

    f = io.BytesIO()
    torch.onnx.export(net, x, f, dynamo=False, opset_version=17, input_names=["input"], output_names=["logits"],
                      dynamic_axes={"input": {0: "N"}, "logits": {0: "N"}})
    return onnx.load_from_string(f.getvalue())


@pytest.fixture(scope="module")
def dynamo(net, x, tmp_path_factory):
    path = tmp_path_factory.mktemp("dynamo") / "net.onnx"
    torch.onnx.export(net, (x,), str(path), dynamo=True, input_names=["input"], output_names=["logits"])
    return onnx.load(str(path))


def module_outputs(net, x) -> dict[str, list[np.ndarray]]:
    """Each module's outputs, one per call, from forward hooks."""
    seen: dict[str, list] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.setdefault(n, []).append(o.detach().numpy()))
             for n, m in net.named_modules() if n]
    with torch.no_grad():
        net(x)
    for h in hooks:
        h.remove()
    return seen


def resolve(proto, name):
    tensors = {o for n in proto.graph.node for o in n.output} | {i.name for i in proto.graph.input}
    return names.resolve(proto, name, tensors)


def activation(proto, tensor, x) -> np.ndarray:
    r = onnxcam.Explainer(proto, [tensor], device="cpu").run(x.numpy(), 0)
    return r.activations[tensor]


PATHS = [  # (what the user writes, the module whose first call it names)
    ("stem", "stem"), ("layers", "layers"), ("layers.0", "layers.0"), ("layers[-1]", "layers.1"),
    ("model.layers[0]", "layers.0"), ("layers.1.conv2", "layers.1.conv2"), ("layers.0.relu", "layers.0.relu"),
]


@pytest.mark.parametrize("exporter", ["torchscript", "dynamo"])
def test_module_paths_name_the_module_output(exporter, request, net, x):
    proto = request.getfixturevalue(exporter)
    want = module_outputs(net, x)
    for path, module in PATHS:
        got = activation(proto, resolve(proto, path), x)
        np.testing.assert_allclose(got, want[module][0], rtol=1e-5, atol=1e-5, err_msg=f"{exporter}: {path}")


def test_torchscript_second_call_of_a_module(torchscript, net, x):
    """TorchScript scopes a module's second call as '<name>_1'; that name picks it."""
    want = module_outputs(net, x)["layers.0.relu"][1]
    got = activation(torchscript, resolve(torchscript, "layers.0.relu_1"), x)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_tensor_and_node_names_pass_through(torchscript):
    node = next(n for n in torchscript.graph.node if n.op_type == "Relu")
    assert resolve(torchscript, node.output[0]) == node.output[0]
    assert resolve(torchscript, node.name) == node.output[0]
    assert resolve(torchscript, "input") == "input"


def test_explainer_and_cam_classes_take_module_paths(torchscript, x):
    ex = onnxcam.Explainer(torchscript, ["layers[-1]", "stem"], device="cpu")
    assert ex.layers == [resolve(torchscript, "layers.1"), resolve(torchscript, "stem")]
    cam = onnxcam.GradCAM(torchscript, "layers", device="cpu")
    assert cam(x)[0].shape == (16, 16)


def test_misses_raise_layer_error_with_close_matches(torchscript):
    with pytest.raises(onnxcam.LayerError, match=r"close matches.*layers\.0\.conv1"):
        resolve(torchscript, "layers.0.conv")
    with pytest.raises(onnxcam.LayerError, match="folded into the Conv"):
        resolve(torchscript, "layers.0.bn1")
    with pytest.raises(onnxcam.LayerError, match="children"):
        resolve(torchscript, "layers[5]")
    with pytest.raises(onnxcam.LayerError):
        onnxcam.Explainer(torchscript, ["nothing_like_it"], device="cpu")


def test_module_paths_listed(torchscript):
    paths = names.module_paths(torchscript)
    assert {"stem", "layers", "layers.0", "layers.0.conv1", "layers.0.relu", "layers.0.relu_1", "fc"} <= set(paths)


# ---- Keras layer names (tf2onnx) ------------------------------------------------------------------------------------
def keras_like() -> onnx.ModelProto:
    """The naming tf2onnx gives a Keras model: '<model>_1/<layer>_1/<op>' nodes, '<node>:0' tensors, NHWC input."""
    rng = np.random.default_rng(0)
    init = [numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32), "w"),
            numpy_helper.from_array(rng.standard_normal((4, 2)).astype(np.float32), "fc")]
    nodes = [
        helper.make_node("Transpose", ["x"], ["net_1/c1_1/Conv__5:0"], name="net_1/c1_1/Conv__5", perm=[0, 3, 1, 2]),
        helper.make_node("Conv", ["net_1/c1_1/Conv__5:0", "w"], ["net_1/c1_1/BiasAdd:0"], name="net_1/c1_1/BiasAdd",
                         pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["net_1/c1_1/BiasAdd:0"], ["net_1/c1_1/Relu:0"], name="net_1/c1_1/Relu"),
        helper.make_node("GlobalAveragePool", ["net_1/c1_1/Relu:0"], ["net_1/gap_1/Mean:0"], name="net_1/gap_1/Mean"),
        helper.make_node("Flatten", ["net_1/gap_1/Mean:0"], ["net_1/gap_1/Squeeze:0"], name="net_1/gap_1/Squeeze"),
        helper.make_node("MatMul", ["net_1/gap_1/Squeeze:0", "fc"], ["logits"], name="net_1/dense_1/MatMul"),
    ]
    graph = helper.make_graph(nodes, "keras", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8, 3])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 2])], init)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_keras_layer_names():
    proto = keras_like()
    assert resolve(proto, "c1") == "net_1/c1_1/Relu:0"
    assert resolve(proto, "c1_1") == "net_1/c1_1/Relu:0"
    assert resolve(proto, "gap") == "net_1/gap_1/Squeeze:0"
    cam = onnxcam.HiResCAM(proto, ["c1"], device="cpu")
    x = np.random.default_rng(1).standard_normal((2, 8, 8, 3)).astype(np.float32)
    assert cam(x).shape == (2, 8, 8)  # an NHWC input: maps at its (H, W)


@pytest.mark.skipif(not KERAS.exists(), reason="the tf2onnx fixture is not in this checkout")
def test_keras_layer_names_on_a_tf2onnx_export():
    proto = onnx.load(str(KERAS))
    assert resolve(proto, "c4") == "custom_cnn_1/c4_1/Relu:0"
    assert resolve(proto, "r2") == "custom_cnn_1/r2_1/Relu:0"
    cam = onnxcam.GradCAM(proto, ["c4", "r2"], device="cpu")
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    maps = cam(x)
    assert maps.shape == (2, 32, 32) and 0 <= maps.min() and maps.max() <= 1
