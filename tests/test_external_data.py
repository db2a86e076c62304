"""External data is read from the model's own folder, never the working directory, and a model that cannot be read
safely is one ModelError line naming the file, tensor or function (issue "Trust", points 6 and 7)."""

from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from click.testing import CliRunner
from onnx import TensorProto, helper, numpy_helper

import onnxcam
from onnxcam.cli import DEMO_SAMPLES, main
from onnxcam.errors import InputError, ModelError
from onnxcam.graph import load
from onnxcam.runtime import session

RNG = np.random.default_rng(11)
W = RNG.standard_normal((4, 3, 3, 3)).astype(np.float32)  # the Conv weight, the tensor stored externally
FC = RNG.standard_normal((3, 4)).astype(np.float32)
OTHER = RNG.standard_normal(W.shape).astype(np.float32)  # what a weights.bin elsewhere holds
X = RNG.standard_normal((2, 3, 8, 8)).astype(np.float32)


def external(name: str, location: str, offset: int | None = None, length: int | None = None) -> TensorProto:
    """A float tensor shaped like W whose bytes live in `location`."""
    t = TensorProto(name=name, data_type=TensorProto.FLOAT, dims=W.shape, data_location=TensorProto.EXTERNAL)
    for key, value in (("location", location), ("offset", offset), ("length", length)):
        if value is not None:
            entry = t.external_data.add()
            entry.key, entry.value = key, str(value)
    return t


def classifier(w: TensorProto, where: str = "initializer") -> onnx.ModelProto:
    """Conv(x, w) -> Relu -> GlobalAveragePool -> Flatten -> Gemm(fc): w an initializer or a Constant node's value."""
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["conv"], ["relu"]),
             helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    inits = [numpy_helper.from_array(FC, "fc")]
    if where == "constant":
        nodes.insert(0, helper.make_node("Constant", [], ["w"], value=w))
    else:
        inits.insert(0, w)
    graph = helper.make_graph(nodes, "external", [helper.make_tensor_value_info("x", TensorProto.FLOAT,
                                                                                ["N", 3, 8, 8])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 3])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def reference_logits() -> np.ndarray:
    """onnxruntime on the same model with W inline: nothing to resolve."""
    inline = classifier(numpy_helper.from_array(W, "w")).SerializeToString()
    return ort.InferenceSession(inline, providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]


def saved(folder: Path, model: onnx.ModelProto, data: bytes | None = W.tobytes(), name="weights.bin") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    if data is not None:
        (folder / name).write_bytes(data)
    path = folder / "model.onnx"
    path.write_bytes(model.SerializeToString())
    return path


@pytest.fixture
def elsewhere(tmp_path, monkeypatch) -> Path:
    """The working directory: another folder with another weights.bin of the same size."""
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    (cwd / "weights.bin").write_bytes(OTHER.tobytes())
    monkeypatch.chdir(cwd)
    return cwd


# ---- read from the model's folder ---------------------------------------------------------------------------------
def test_constant_external_data_is_read_from_the_models_folder_not_the_working_directory(tmp_path, elsewhere):
    path = saved(tmp_path / "model", classifier(external("w", "weights.bin"), "constant"))
    ex = onnxcam.Explainer(str(path), layers=["relu"], device="cpu")
    np.testing.assert_allclose(ex.run(X).logits, reference_logits(), rtol=1e-5, atol=1e-6)
    assert not any(t.data_location == TensorProto.EXTERNAL and t.name == "w"
                   for t in [*ex.proto.graph.initializer, *(a.t for n in ex.proto.graph.node for a in n.attribute)])


def _if_and_sparse_model() -> onnx.ModelProto:
    """An If whose branches hold Constant values in weights.bin, and a sparse initializer whose values are there."""
    def branch(name):
        return helper.make_graph([helper.make_node("Constant", [], [f"{name}_w"], value=external(f"{name}_v",
                                                                                                 "weights.bin"))],
                                 name, [], [helper.make_tensor_value_info(f"{name}_w", TensorProto.FLOAT, W.shape)])
    values = TensorProto(name="sparse", data_type=TensorProto.FLOAT, dims=[W.size],
                         data_location=TensorProto.EXTERNAL)
    for key, value in (("location", "weights.bin"), ("length", str(W.nbytes))):
        entry = values.external_data.add()
        entry.key, entry.value = key, value
    indices = numpy_helper.from_array(np.arange(W.size, dtype=np.int64), "sparse_indices")
    sparse = helper.make_sparse_tensor(values, indices, [W.size])
    nodes = [helper.make_node("If", ["cond"], ["w"], then_branch=branch("then"), else_branch=branch("else")),
             helper.make_node("Add", ["x", "w"], ["y"])]
    graph = helper.make_graph(nodes, "subgraphs", [helper.make_tensor_value_info("cond", TensorProto.BOOL, []),
                                                   helper.make_tensor_value_info("x", TensorProto.FLOAT, W.shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, W.shape)],
                              sparse_initializer=[sparse])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model


def test_subgraph_constants_and_sparse_initializers_are_read_from_the_models_folder(tmp_path, elsewhere):
    path = saved(tmp_path / "model", _if_and_sparse_model())
    skeleton, _, _ = load.load_detached(str(path))
    branches = {a.name: a.g for a in skeleton.graph.node[0].attribute}
    for name in ("then_branch", "else_branch"):
        value = branches[name].node[0].attribute[0].t
        assert value.data_location != TensorProto.EXTERNAL
        np.testing.assert_array_equal(numpy_helper.to_array(value), W)
    sparse = skeleton.graph.sparse_initializer[0].values
    assert sparse.data_location != TensorProto.EXTERNAL
    np.testing.assert_array_equal(numpy_helper.to_array(sparse), W.ravel())
    # onnxruntime, given what was loaded, computes with W
    sess = session(skeleton.SerializeToString(), "cpu")
    np.testing.assert_array_equal(sess.run(None, {"cond": np.array(True), "x": np.zeros_like(W)})[0], W)


def test_onnxruntime_is_never_left_to_resolve_external_data(tmp_path, elsewhere):
    """A model that still names a file reaches no session: onnxruntime would read it from the working directory."""
    model = classifier(external("w", "weights.bin"), "constant")
    with pytest.raises(ModelError, match=r"attribute 'value' of the Constant node making 'w' refers to external data "
                                         r"'weights.bin'.*working directory"):
        session(model.SerializeToString(), "cpu")


@pytest.mark.parametrize("as_proto", [False, True], ids=["bytes", "ModelProto"])
@pytest.mark.parametrize("where", ["constant", "initializer"])
def test_bytes_and_protos_with_external_data_need_base_dir(tmp_path, elsewhere, where, as_proto):
    model = classifier(external("w", "weights.bin"), where)
    folder = saved(tmp_path / "model", model).parent
    given = model if as_proto else model.SerializeToString()
    with pytest.raises(ModelError, match=r"'w'.* is stored as external data in 'weights.bin'; give base_dir"):
        onnxcam.Explainer(given, device="cpu")
    with pytest.raises(ModelError, match="give base_dir"):
        onnxcam.GradCAM(given, device="cpu")
    ex = onnxcam.Explainer(given, layers=["relu"], device="cpu", base_dir=folder)
    np.testing.assert_allclose(ex.run(X).logits, reference_logits(), rtol=1e-5, atol=1e-6)
    assert onnxcam.GradCAM(given, ["relu"], device="cpu", base_dir=str(folder))(X).shape == (2, 8, 8)
    if as_proto:  # the caller's proto is left as given
        assert onnx.external_data_helper.uses_external_data(
            model.graph.node[0].attribute[0].t if where == "constant" else model.graph.initializer[0])
    with pytest.raises(InputError, match="base_dir is for models given as bytes"):
        load.load_model(str(folder / "model.onnx"), base_dir=folder)


def test_a_skeleton_with_placeholders_is_refused_with_a_hint(tmp_path):
    skeleton, _ = load.split_weights(classifier(numpy_helper.from_array(W, "w")), min_elements=1)
    with pytest.raises(ModelError, match=r"initializer 'w' is a placeholder .* pass the Explainer itself"):
        onnxcam.Explainer(skeleton, device="cpu")


# ---- models that cannot be read safely: one designed error ----------------------------------------------------------
def _escaping(folder: Path) -> Path:
    (folder.parent / "weights.bin").write_bytes(W.tobytes())
    return saved(folder, classifier(external("w", "../weights.bin")), data=None)


def _absolute(folder: Path) -> Path:
    target = folder.parent / "absolute" / "weights.bin"
    target.parent.mkdir(parents=True)
    target.write_bytes(W.tobytes())
    return saved(folder, classifier(external("w", str(target)), "constant"), data=None)


def _symlinked_folder(folder: Path) -> Path:
    real = folder.parent / "real"
    real.mkdir()
    (real / "weights.bin").write_bytes(W.tobytes())
    folder.mkdir()
    os.symlink(real, folder / "linked")
    return saved(folder, classifier(external("w", "linked/weights.bin")), data=None)


def _offset_past_the_end(folder: Path) -> Path:
    return saved(folder, classifier(external("w", "weights.bin", offset=W.nbytes + 8)))


def _length_past_the_end(folder: Path) -> Path:
    return saved(folder, classifier(external("w", "weights.bin", offset=4, length=W.nbytes)))


def _length_not_the_tensors(folder: Path) -> Path:
    return saved(folder, classifier(external("w", "weights.bin"), "constant"), data=W.tobytes() + b"\0" * 8)


def _wrong_raw_length(folder: Path) -> Path:
    model = classifier(numpy_helper.from_array(W, "w"))
    model.graph.initializer[1].raw_data = model.graph.initializer[1].raw_data[:-4]  # fc: 11 floats for (3, 4)
    return saved(folder, model, data=None)


def _model_metadata_not_utf8(folder: Path) -> Path:
    model = classifier(numpy_helper.from_array(W, "w"))
    helper.set_model_props(model, {"layout": "MARKER"})
    data = model.SerializeToString().replace(b"MARKER", b"nc\xff\xfehw")  # protobuf would not write invalid UTF-8
    return _raw_saved(folder, data)


def _node_metadata_not_utf8(folder: Path) -> Path:
    model = classifier(numpy_helper.from_array(W, "w"))
    model.ir_version = 10
    entry = model.graph.node[0].metadata_props.add()
    entry.key, entry.value = "pkg.torch.onnx.name_scopes", "MARKER"
    return _raw_saved(folder, model.SerializeToString().replace(b"MARKER", b"\xc3(conv"))


def _raw_saved(folder: Path, data: bytes) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "model.onnx").write_bytes(data)
    return folder / "model.onnx"


def _recursive_functions(folder: Path) -> Path:
    """Relu goes through local function A, which calls B, which calls A."""
    opsets = [helper.make_opsetid("", 17), helper.make_opsetid("local", 1)]
    a = helper.make_function("local", "A", ["i"], ["o"], [helper.make_node("B", ["i"], ["o"], domain="local")], opsets)
    b = helper.make_function("local", "B", ["i"], ["o"], [helper.make_node("A", ["i"], ["o"], domain="local")], opsets)
    model = classifier(numpy_helper.from_array(W, "w"))
    model.graph.node[1].op_type, model.graph.node[1].domain = "A", "local"
    model.functions.extend([a, b])
    model.opset_import.append(helper.make_opsetid("local", 1))
    return saved(folder, model, data=None)


# (how the model is made, what the error says: one line naming the tensor, file or function)
BAD = {
    "dotdot": (_escaping, r"initializer 'w' is stored as external data at '\.\./weights\.bin', which leaves the"),
    "absolute": (_absolute, r"Constant node making 'w' is stored as external data at the absolute path"),
    "symlink": (_symlinked_folder, r"'w': external data location 'linked/weights\.bin' passes through the symlink"),
    "offset": (_offset_past_the_end, r"'w': external data at offset 440, length 0 runs past the end of weights\.bin"),
    "length": (_length_past_the_end, r"'w': external data at offset 4, length 432 runs past the end of weights\.bin"),
    "size": (_length_not_the_tensors, r"weights\.bin has 440 bytes, but shape \(4, 3, 3, 3\) of FLOAT takes 432"),
    "raw": (_wrong_raw_length, r"initializer 'fc' has 44 bytes of raw data, but shape \(3, 4\) of FLOAT takes 48"),
    "metadata": (_model_metadata_not_utf8, r"metadata 'layout' of the model is not UTF-8 text"),
    "node-metadata": (_node_metadata_not_utf8, r"metadata '[\w.]+name_scopes' of the Conv node making 'conv' is not"),
    "recursive": (_recursive_functions, r"local function local::A calls itself \(local::A -> local::B -> local::A\)"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_unsafe_or_malformed_models_are_one_clear_error(tmp_path, elsewhere, case):
    build, message = BAD[case]
    path = build(tmp_path / "model")
    with pytest.raises(ModelError, match=message) as raised:
        onnxcam.Explainer(str(path), device="cpu")
    assert str(path) in str(raised.value)  # the message names the file
    with pytest.raises(ModelError, match=message):
        onnxcam.GradCAM(path.read_bytes() if case in ("raw", "metadata", "recursive") else str(path), device="cpu")
    for args in (["info", path], ["explain", path, DEMO_SAMPLES / "chelsea.png", "--out", tmp_path / "out"]):
        result = CliRunner().invoke(main, [str(a) for a in args])
        assert result.exit_code == 1, (args[0], result.output, result.stderr)
        assert "Traceback" not in result.output + result.stderr
        lines = result.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("Error: "), (args[0], result.stderr)
        assert re.search(message, lines[0]), (args[0], lines[0])


@pytest.mark.parametrize("where", ["initializer", "constant"])
def test_changed_external_data_is_read_again(tmp_path, where):
    """The digest cache must notice a changed data file beside an unchanged .onnx (it is keyed on file stats)."""
    path = saved(tmp_path / "m", classifier(external("w", "weights.bin"), where))
    first = onnxcam.Explainer(str(path), device="cpu").run(X).logits
    np.testing.assert_allclose(first, reference_logits(), rtol=1e-5, atol=1e-5)
    (tmp_path / "m" / "weights.bin").write_bytes(OTHER.tobytes())
    os.utime(tmp_path / "m" / "weights.bin", ns=(1, 1))  # a different mtime even on a coarse clock
    second = onnxcam.Explainer(str(path), device="cpu").run(X).logits
    inline = classifier(numpy_helper.from_array(OTHER, "w")).SerializeToString()
    want = ort.InferenceSession(inline, providers=["CPUExecutionProvider"]).run(None, {"x": X})[0]
    np.testing.assert_allclose(second, want, rtol=1e-5, atol=1e-5)
