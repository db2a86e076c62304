"""Reading models without copying their weights (issue 6, memory): the wire-level split gives what parsing gives,
and shapes that inference misses are measured without holding every activation at once."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcam
from onnxcam.graph import load
from onnxcam.graph import model as graph_model

RNG = np.random.default_rng(3)


def weighty_model(dtype=np.float32) -> onnx.ModelProto:
    """Conv (raw weights) -> Mul by a float_data tensor (no raw bytes) -> Add of a small inline constant, with a
    doc string and metadata on the big initializer, and a local function: every form split_weights meets."""
    tensor_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    w = numpy_helper.from_array(RNG.standard_normal((16, 3, 5, 5)).astype(dtype), "w")
    w.doc_string = "conv weights"
    scale = helper.make_tensor("scale", tensor_type, [1, 16, 8, 8], RNG.standard_normal(16 * 64).astype(dtype))
    small = numpy_helper.from_array(np.ones((1, 16, 1, 1), dtype), "small")
    func = helper.make_function("local", "AddSmall", ["a", "b"], ["c"], [helper.make_node("Add", ["a", "b"], ["c"])],
                                [helper.make_opsetid("", 17)])
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[2, 2, 2, 2]),
             helper.make_node("Mul", ["conv", "scale"], ["scaled"]),
             helper.make_node("AddSmall", ["scaled", "small"], ["y"], domain="local")]
    graph = helper.make_graph(nodes, "weighty", [helper.make_tensor_value_info("x", tensor_type, ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("y", tensor_type, ["N", 16, 8, 8])], [w, scale, small])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("local", 1)],
                              functions=[func])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_serialized_models_split_like_parsed_ones_and_share_the_callers_bytes(dtype):
    data = weighty_model(dtype).SerializeToString()
    skeleton, weights, digest = load.load_detached(data)
    parsed = load.load_model(data)
    want_skeleton, want_weights = load.detach_weights(parsed, owned=True)
    assert digest == load.model_digest(parsed)
    assert skeleton.SerializeToString(deterministic=True) == want_skeleton.SerializeToString(deterministic=True)
    assert list(weights) == list(want_weights) == ["w", "scale"]
    for name, value in weights.items():
        np.testing.assert_array_equal(value, want_weights[name])
        assert value.dtype == want_weights[name].dtype and value.shape == want_weights[name].shape
    assert np.shares_memory(weights["w"], np.frombuffer(data, np.uint8)), "raw weights are copied"
    assert not skeleton.functions and {n.op_type for n in skeleton.graph.node} == {"Conv", "Mul", "Add"}


def test_paths_bytes_and_protos_give_one_digest_and_one_explanation(tmp_path):
    model = weighty_model()
    path = tmp_path / "weighty.onnx"
    onnx.save(model, str(path))
    x = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)
    seeds = RNG.standard_normal((2, 16, 8, 8)).astype(np.float32)
    runs = [onnxcam.Explainer(m, layers=["conv"], score="y", device="cpu") for m in (str(path), path.read_bytes(),
                                                                                       model)]
    assert len({ex.digest for ex in runs}) == 1
    grads = [ex.run(x, seed=seeds).gradients["conv"] for ex in runs]
    # y = (conv * scale) + 1: d sum(seed * y) / d conv = seed * scale
    scale = numpy_helper.to_array(model.graph.initializer[1])
    for g in grads:
        np.testing.assert_allclose(g, seeds * scale, rtol=1e-6)


def test_models_with_external_data_are_parsed_and_read_with_their_data(tmp_path):
    path = tmp_path / "external.onnx"
    model = weighty_model()
    want = numpy_helper.to_array(model.graph.initializer[0])
    onnx.external_data_helper.convert_model_to_external_data(model, all_tensors_to_one_file=True,
                                                             location="external.bin", size_threshold=0)
    onnx.save(model, str(path))
    assert load._split_serialized(path.read_bytes()) is None  # the wire split leaves these to the parser
    _, weights, digest = load.load_detached(str(path))
    assert digest == load.model_digest(load.load_model(str(path)))
    np.testing.assert_array_equal(weights["w"], want)


def test_malformed_bytes_are_a_clear_error():
    with pytest.raises(onnxcam.errors.ModelError, match="not a valid ONNX model"):
        load.load_detached(b"\x0a\xff\xff\xff")


def runtime_shaped_model(dtype=np.float32) -> onnx.ModelProto:
    """Reshape to a shape computed from data-dependent arithmetic (inference cannot follow it) -> Conv -> Relu."""
    tensor_type = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    nodes = [helper.make_node("Shape", ["x"], ["s"]),
             helper.make_node("Cast", ["s"], ["sf"], to=TensorProto.FLOAT),
             helper.make_node("Sqrt", ["sf"], ["root"]),  # shape arithmetic in floats: data propagation stops
             helper.make_node("Mul", ["root", "root"], ["back"]),
             helper.make_node("Round", ["back"], ["rounded"]),
             helper.make_node("Cast", ["rounded"], ["dims"], to=TensorProto.INT64),
             helper.make_node("Reshape", ["x", "dims"], ["r"]),
             helper.make_node("Conv", ["r", "w"], ["c"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c"], ["y"])]
    w = numpy_helper.from_array(RNG.standard_normal((4, 3, 3, 3)).astype(dtype), "w")
    graph = helper.make_graph(nodes, "runtime_shaped", [helper.make_tensor_value_info("x", tensor_type,
                                                                                      ["N", 3, 6, 6])],
                              [helper.make_tensor_value_info("y", tensor_type, None)], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_profiled_shapes_match_shapes_measured_as_outputs(dtype):
    proto = runtime_shaped_model(dtype)
    names = ["r", "c", "y"]
    profiled, types = graph_model._profiled_shapes(proto, {}, "x", ("N", 3, 6, 6), set(names))
    measured, measured_types = graph_model._probe_chunk(proto, {}, "x", ("N", 3, 6, 6), names)
    assert profiled == measured == {"r": ((1, 3, 6, 6), (2, 3, 6, 6)), "c": ((1, 4, 6, 6), (2, 4, 6, 6)),
                                     "y": ((1, 4, 6, 6), (2, 4, 6, 6))}
    if dtype == np.float16:  # onnxruntime runs fp16 Conv/Relu in float32 on the CPU: the profile's type would lie
        assert not types
    else:
        assert types == measured_types
    mg = graph_model.ModelGraph(proto, (1, 3, 6, 6))
    assert mg.shape(mg.tensor("y")) == ("N", 4, 6, 6)
    assert np.dtype(mg.tensor("y").dtype) == np.dtype(dtype)
