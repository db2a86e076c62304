"""onnxcam/runtime.py: device choice and the onnxruntime behaviour the Explainer's memory use relies on."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from onnxcam.errors import DeviceError
from onnxcam.graph.load import PLACEHOLDER_LOCATION
from onnxcam.runtime import cuda_usable, session


def _matmul_with_placeholder_weight():
    w = TensorProto(name="W", data_type=TensorProto.FLOAT, dims=[3, 4])
    w.data_location = TensorProto.EXTERNAL
    entry = w.external_data.add()
    entry.key, entry.value = "location", PLACEHOLDER_LOCATION
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=[w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    return model.SerializeToString()


def test_onnxruntime_copies_weights_given_as_external_initializers():
    """The Explainer drops its numpy weights once a session exists (explainer.py _compiled): safe only because
    onnxruntime copies them. If a release stops copying, this fails before anything reads freed memory."""
    w = np.arange(12, dtype=np.float32).reshape(3, 4)
    sess = session(_matmul_with_placeholder_weight(), "cpu", {"W": w})
    x = np.ones((2, 3), np.float32)
    before = sess.run(None, {"x": x})[0]
    np.testing.assert_array_equal(before, x @ w)
    w[:] = 0
    np.testing.assert_array_equal(sess.run(None, {"x": x})[0], before)


def test_cuda_request_without_a_gpu_is_a_clear_error():
    if cuda_usable():
        pytest.skip("a CUDA GPU is usable here")
    with pytest.raises(DeviceError, match="device='cuda' was requested but no CUDA GPU is usable"):
        session(_matmul_with_placeholder_weight(), "cuda", {"W": np.zeros((3, 4), np.float32)})


def test_auto_runs_on_the_cpu_without_a_gpu_and_bad_device_names_fail():
    sess = session(_matmul_with_placeholder_weight(), "auto", {"W": np.zeros((3, 4), np.float32)})
    assert sess.get_providers()[0] == ("CUDAExecutionProvider" if cuda_usable() else "CPUExecutionProvider")
    with pytest.raises(DeviceError, match="device must be one of auto, cpu, cuda, not 'gpu'"):
        session(_matmul_with_placeholder_weight(), "gpu")


def test_onnxcams_own_session_options_are_applied_not_passed_on(monkeypatch):
    """SESSION_CONFIG's "onnxcam.mem_pattern" switches onnxruntime's memory pattern (the command line turns it off:
    pipeline.configure_process); an unknown "onnxcam." key is an internal error, not an onnxruntime entry."""
    from onnxcam import runtime
    from onnxcam.errors import InternalError

    assert runtime._options().enable_mem_pattern
    monkeypatch.setitem(runtime.SESSION_CONFIG, "onnxcam.mem_pattern", "0")
    assert not runtime._options().enable_mem_pattern
    with pytest.raises(RuntimeError, match="onnxcam.mem_pattern"):  # not handed to onnxruntime as an entry
        runtime._options().get_session_config_entry("onnxcam.mem_pattern")
    monkeypatch.setitem(runtime.SESSION_CONFIG, "onnxcam.nonsense", "1")
    with pytest.raises(InternalError, match="onnxcam.nonsense"):
        runtime._options()
