"""Reading models without copying their weights (issue 6, memory): the wire-level split gives what parsing gives,
and shapes that inference misses are measured without holding every activation at once."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcam
from onnxcam.graph import load, shapes
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
    profiled, types = shapes._profiled_shapes(proto, {}, "x", ("N", 3, 6, 6), set(names))
    measured, measured_types = shapes._probe_chunk(proto, {}, "x", ("N", 3, 6, 6), names)
    assert profiled == measured == {"r": ((1, 3, 6, 6), (2, 3, 6, 6)), "c": ((1, 4, 6, 6), (2, 4, 6, 6)),
                                     "y": ((1, 4, 6, 6), (2, 4, 6, 6))}
    if dtype == np.float16:  # onnxruntime runs fp16 Conv/Relu in float32 on the CPU: the profile's type would lie
        assert not types
    else:
        assert types == measured_types
    mg = graph_model.ModelGraph(proto, (1, 3, 6, 6))
    assert mg.shape(mg.tensor("y")) == ("N", 4, 6, 6)
    assert np.dtype(mg.tensor("y").dtype) == np.dtype(dtype)


def padded_flatten_model() -> onnx.ModelProto:
    """Pads computed in a constant subgraph (as efficientnet_pytorch's static_padding exports), then Conv -> GAP ->
    a Reshape to (batch, -1) whose target comes from Shape: ONNX inference alone knows none of the shapes after
    the Pad, nor the Reshape's."""
    nodes = [helper.make_node("Constant", [], ["p"], value=numpy_helper.from_array(
                 np.array([[1, 2], [0, 1], [0, 0], [0, 0]], np.int64), "pv")),  # (begin, end) per axis, last axis first
             helper.make_node("Constant", [], ["rows"], value=numpy_helper.from_array(np.array([-1], np.int64), "rv")),
             helper.make_node("Transpose", ["p"], ["pt"], perm=[1, 0]),
             helper.make_node("Slice", ["pt", "minus", "nbig", "one", "minus"], ["rev"]),  # W,H,C,N -> N,C,H,W
             helper.make_node("Reshape", ["rev", "rows"], ["flat"]),
             helper.make_node("Cast", ["flat"], ["pads"], to=TensorProto.INT64),
             helper.make_node("Pad", ["x", "pads"], ["padded"]),
             helper.make_node("Conv", ["padded", "w"], ["c"]),
             helper.make_node("Relu", ["c"], ["a"]),
             helper.make_node("GlobalAveragePool", ["a"], ["g"]),
             helper.make_node("Shape", ["g"], ["gs"]),
             helper.make_node("Gather", ["gs", "first"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "zero"], ["n1"]),
             helper.make_node("Concat", ["n1", "rows"], ["target"], axis=0),
             helper.make_node("Reshape", ["g", "target"], ["f"]),
             helper.make_node("Gemm", ["f", "fc", "fb"], ["logits"], transB=1)]
    inits = [numpy_helper.from_array(RNG.standard_normal((6, 3, 3, 3)).astype(np.float32), "w"),
             numpy_helper.from_array(RNG.standard_normal((5, 6)).astype(np.float32), "fc"),
             numpy_helper.from_array(np.zeros(5, np.float32), "fb"),
             numpy_helper.from_array(np.array([0], np.int64), "zero"),
             numpy_helper.from_array(np.array(0, np.int64), "first"),
             numpy_helper.from_array(np.array([-2 ** 62], np.int64), "nbig"),
             numpy_helper.from_array(np.array([1], np.int64), "one"),
             numpy_helper.from_array(np.array([-1], np.int64), "minus")]
    graph = helper.make_graph(nodes, "padded_flatten", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                      ["N", 3, 9, 9])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_constant_pads_and_a_flatten_are_resolved_without_running_the_model(monkeypatch):
    """The constant subgraph is folded for inference and the flatten's Reshape is measured in numpy on its few
    nodes: no onnxruntime probe runs (each one costs more memory than the model's inference adds)."""
    proto = padded_flatten_model()
    names = ["padded", "c", "a", "g", "f", "logits"]
    measured, _ = shapes._probe_chunk(proto, {}, "x", ("N", 3, 9, 9), names)  # onnxruntime, the whole model
    assert measured["padded"] == ((1, 3, 10, 12), (2, 3, 10, 12))  # the pads are not symmetric: a wrong fold shows

    def no_runtime(*args, **kwargs):
        raise AssertionError("an onnxruntime probe ran")
    monkeypatch.setattr(shapes, "_profiled_shapes", no_runtime)
    monkeypatch.setattr(shapes, "_probe_chunk", no_runtime)
    mg = graph_model.ModelGraph(proto, ("N", 3, 9, 9))
    for name in names:
        one, two = measured[name]
        assert mg.shape(mg.tensor(name)) == ("N",) + one[1:] and two[1:] == one[1:], name
    assert [n.op for n in mg.graph.nodes].count("Constant") == 2, "the forward graph itself must not change"


def test_the_flatten_probe_starts_from_the_known_activation():
    proto = shapes.infer(padded_flatten_model(), {}, "x", ("N", 3, 9, 9))
    known = {vi.name: vi for vi in proto.graph.value_info}
    part = shapes._part_computing(proto, ["f"], known)
    assert {i.name for i in part.graph.input} == {"g"}
    assert sorted(n.op_type for n in part.graph.node) == ["Concat", "Constant", "Gather", "Reshape", "Shape",
                                                          "Unsqueeze"]


def test_a_large_models_digest_computed_in_a_thread_is_the_same_and_cached(tmp_path, monkeypatch):
    """Model files above _HASH_IN_THREAD_BYTES are hashed in a thread (this one: every file): the digest is the one
    of the whole model, and once known it lets a second LoadedModel of the unchanged file skip reading it."""
    from onnxcam.cache import CACHE

    monkeypatch.setattr(load, "_HASH_IN_THREAD_BYTES", 0)
    path = tmp_path / "weighty.onnx"
    onnx.save(weighty_model(), str(path))
    CACHE.clear()
    loaded = load.LoadedModel(str(path))
    assert isinstance(loaded._digest, load._Hashing)  # computing: not asked for yet
    assert loaded.digest == load.model_digest(load.load_model(str(path))) == load.load_detached(str(path))[2]
    again = load.LoadedModel(str(path))
    assert again.digest == loaded.digest and again._skeleton is None, "the unchanged file was read again"
    assert load.LoadedModel.of(str(path)) is load.LoadedModel.of(str(path))
