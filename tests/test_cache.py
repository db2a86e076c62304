"""onnxcam.cache: one bounded cache object with documented keys, that users clear and size, safe under threads."""

from __future__ import annotations

import gc
import threading
import weakref

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import onnxcam
from onnxcam import cache, explainer, runtime
from onnxcam.errors import InputError

RNG = np.random.default_rng(11)


def model(spatial=6) -> bytes:
    """Conv -> Relu -> GlobalAveragePool -> Flatten -> Gemm; spatial None: a dynamic size. The conv weights are
    large enough (1200 values) to be held apart from the graph (graph/load.py split_weights)."""
    dims = ["N", 3, spatial, spatial] if spatial else ["N", 3, "H", "W"]
    nodes = [helper.make_node("Conv", ["x", "w"], ["conv"], pads=[2, 2, 2, 2]),
             helper.make_node("Relu", ["conv"], ["relu"]),
             helper.make_node("GlobalAveragePool", ["relu"], ["pool"]),
             helper.make_node("Flatten", ["pool"], ["flat"]),
             helper.make_node("Gemm", ["flat", "fc"], ["logits"], transB=1)]
    graph = helper.make_graph(nodes, "cached", [helper.make_tensor_value_info("x", TensorProto.FLOAT, dims)],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["N", 5])],
                              [numpy_helper.from_array(RNG.standard_normal((16, 3, 5, 5)).astype(np.float32), "w"),
                               numpy_helper.from_array(RNG.standard_normal((5, 16)).astype(np.float32), "fc")])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m.SerializeToString()


STATIC, DYNAMIC = model(), model(None)


@pytest.fixture(autouse=True)
def fresh_cache():
    cache.clear()
    yield
    cache.configure(**{f"max_{t}": size for t, size in cache.DEFAULT_SIZES.items()})
    cache.clear()


@pytest.fixture
def builds(monkeypatch):
    """The number of sessions the Explainer built."""
    made = []
    real = explainer.session

    def counted(*args, **kwargs):
        made.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(explainer, "session", counted)
    return made


def test_the_cache_is_exported_and_sized_by_the_user():
    assert onnxcam.cache is cache
    cache.configure(max_sessions=3)
    assert cache.info()["max_sessions"] == 3
    with pytest.raises(InputError, match="max_sessions must be an int >= 0"):
        cache.configure(max_sessions=-1)
    with pytest.raises(InputError, match="no cache table 'nope'"):
        cache.clear("nope")


def test_the_next_build_past_the_size_evicts_the_oldest(builds):
    cache.configure(max_sessions=2)
    for layer in ("conv", "relu", "pool"):
        onnxcam.Explainer(STATIC, layers=[layer], device="cpu")
    assert len(builds) == 3 and cache.info()["sessions"] == 2
    onnxcam.Explainer(STATIC, layers=["pool"], device="cpu")  # the newest: still held
    onnxcam.Explainer(STATIC, layers=["relu"], device="cpu")
    assert len(builds) == 3
    onnxcam.Explainer(STATIC, layers=["conv"], device="cpu")  # the oldest: evicted, built again
    assert len(builds) == 4


def test_clear_frees_the_sessions(builds):
    ex = onnxcam.Explainer(STATIC, device="cpu")
    held = weakref.ref(ex.compiled().session)
    onnxcam.Explainer(STATIC, device="cpu")
    assert len(builds) == 1
    cache.clear()
    assert cache.info()["sessions"] == cache.info()["analyses"] == 0
    del ex
    gc.collect()
    assert held() is None, "a cleared session is still alive"
    onnxcam.Explainer(STATIC, device="cpu")
    assert len(builds) == 2


def test_keys_tell_session_config_device_shape_and_layers_apart(builds, monkeypatch):
    x = RNG.standard_normal((2, 3, 6, 6)).astype(np.float32)
    onnxcam.Explainer(STATIC, device="cpu").run(x)
    onnxcam.Explainer(STATIC, device="cpu").run(x)
    assert len(builds) == 1
    monkeypatch.setitem(runtime.SESSION_CONFIG, "session.intra_op.allow_spinning", "0")
    onnxcam.Explainer(STATIC, device="cpu")
    assert len(builds) == 2, "a session built with other onnxruntime options was reused"
    monkeypatch.delitem(runtime.SESSION_CONFIG, "session.intra_op.allow_spinning")
    onnxcam.Explainer(STATIC, device="auto")
    assert len(builds) == 3, "a session of another device request was reused"
    onnxcam.Explainer(STATIC, layers=["conv"], device="cpu")
    assert len(builds) == 4
    dynamic = onnxcam.Explainer(DYNAMIC, layers=["relu"], device="cpu")
    dynamic.run(RNG.standard_normal((1, 3, 6, 6)).astype(np.float32))
    dynamic.run(RNG.standard_normal((1, 3, 8, 8)).astype(np.float32))
    dynamic.run(RNG.standard_normal((2, 3, 8, 8)).astype(np.float32))  # the batch is no part of the key
    assert len(builds) == 6


def test_threads_asking_for_one_missing_entry_build_it_once():
    c = cache.Cache()
    started, release = threading.Event(), threading.Event()
    calls, got = [], []

    def build():
        calls.append(1)
        started.set()
        release.wait(10)
        return object()

    threads = [threading.Thread(target=lambda: got.append(c.get_or_build("sessions", "k", build))) for _ in range(8)]
    for t in threads:
        t.start()
    started.wait(10)
    release.set()
    for t in threads:
        t.join(10)
    assert len(calls) == 1 and len(got) == 8 and len({id(v) for v in got}) == 1


def test_concurrent_explainers_on_one_model_build_one_session(builds):
    x = RNG.standard_normal((1, 3, 6, 6)).astype(np.float32)
    barrier = threading.Barrier(6)
    results, errors = [], []

    def explain():
        try:
            barrier.wait(10)
            results.append(onnxcam.Explainer(STATIC, layers=["relu"], device="cpu").run(x, 2).gradients["relu"])
        except Exception as exc:  # noqa: BLE001 - the main thread asserts there were none
            errors.append(exc)

    threads = [threading.Thread(target=explain) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors and len(results) == 6
    assert len(builds) == 1
    for g in results[1:]:
        np.testing.assert_array_equal(g, results[0])


def test_a_failed_build_reaches_every_waiter_and_is_not_cached():
    c = cache.Cache()

    def fail():
        raise InputError("broken")

    with pytest.raises(InputError, match="broken"):
        c.get_or_build("sessions", "k", fail)
    assert c.get_or_build("sessions", "k", lambda: 7) == 7


def test_weights_released_after_the_build_are_read_again_only_when_needed(tmp_path, caplog):
    path = tmp_path / "m.onnx"
    path.write_bytes(STATIC)
    ex = onnxcam.Explainer(str(path), device="cpu")
    assert not ex.loaded.holds_weights, "the weights outlive the build"
    with caplog.at_level("INFO", logger="onnxcam.graph.load"):
        full = ex.explainable_model  # needs the values: read again, and said so
    assert "read" in caplog.text and "again" in caplog.text
    assert {t.name for t in full.graph.initializer} >= {"w", "fc"}
    onnx.checker.check_model(full)


def test_no_module_changes_the_process_umask():
    import pathlib

    root = pathlib.Path(onnxcam.__file__).parent
    offenders = [str(p) for p in root.rglob("*.py") if "os.umask(" in p.read_text()]
    assert not offenders


# ---- one loading path ------------------------------------------------------------------------------------------
@pytest.fixture
def reads(monkeypatch):
    """The sources read (graph/load.py _source is where a path, bytes or ModelProto is first touched)."""
    from onnxcam.graph import load

    seen = []
    real = load._source

    def counted(model, base_dir):
        seen.append(model)
        return real(model, base_dir)

    monkeypatch.setattr(load, "_source", counted)
    return seen


@pytest.mark.parametrize("make", ["cam", "runner"])
def test_a_cam_class_and_the_cli_runner_read_a_model_file_once_and_keep_no_weights(tmp_path, reads, make):
    from onnxcam.pipeline import Runner

    path = tmp_path / "m.onnx"
    path.write_bytes(STATIC)
    if make == "cam":
        ex = onnxcam.GradCAM(str(path), device="cpu").explainer
    else:
        ex = Runner(str(path), device="cpu", out=tmp_path / "out").explainer
    assert len(reads) == 1, f"read {len(reads)} times"
    assert ex.loaded.source == str(path), "the Explainer was handed a parsed model, not the path"
    assert not ex.loaded.holds_weights, "the weights outlive the build"
    assert onnxcam.graph.load.LoadedModel.of(str(path)) is ex.loaded  # the next reader of the file shares it


def test_gradient_free_methods_build_no_gradient_graph(builds):
    onnxcam.ScoreCAM(STATIC, device="cpu")
    onnxcam.AblationCAM(STATIC, device="cpu")
    assert not builds
    onnxcam.GradCAM(STATIC, device="cpu")
    assert len(builds) == 1


def _spy_sessions(monkeypatch, fail_from_file=False):
    calls = []
    real = explainer.session

    def spy(model_bytes, device, initializers, **kwargs):
        calls.append((set(initializers), kwargs.get("data_file")))
        if fail_from_file and kwargs.get("data_file"):
            raise onnxcam.ModelError("no external data folder in this onnxruntime")
        return real(model_bytes, device, initializers, **kwargs)

    monkeypatch.setattr(explainer, "session", spy)
    return calls


@pytest.mark.parametrize("fail_from_file", [False, True])
def test_onnxruntime_reads_inline_weights_from_the_model_file_itself(tmp_path, monkeypatch, fail_from_file):
    """The weights of a model file are never in memory twice while its session is made: onnxruntime reads them
    from the file (or, where it cannot, gets them passed after all); either way the gradients are the same."""
    path = tmp_path / "m.onnx"
    path.write_bytes(STATIC)
    x = RNG.standard_normal((2, 3, 6, 6)).astype(np.float32)
    want = onnxcam.Explainer(STATIC, layers=["relu"], device="cpu").run(x, [1, 3]).gradients["relu"]
    cache.clear()
    calls = _spy_sessions(monkeypatch, fail_from_file)
    got = onnxcam.Explainer(str(path), layers=["relu"], device="cpu").run(x, [1, 3]).gradients["relu"]
    assert calls[0] == (set(), str(path)), "the weights were passed although the file holds them"
    if fail_from_file:
        assert calls[1] == ({"w"}, None)  # fc has 20 values: small initializers stay inline
    np.testing.assert_array_equal(got, want)


def test_a_model_file_changed_after_loading_is_not_read_by_offset(tmp_path, monkeypatch):
    path = tmp_path / "m.onnx"
    path.write_bytes(STATIC)
    loaded = onnxcam.graph.load.LoadedModel(str(path))
    path.write_bytes(model())  # other weights, same size: offsets into it would be silently wrong
    calls = _spy_sessions(monkeypatch)
    ex = onnxcam.Explainer(loaded, layers=["relu"], device="cpu")
    assert calls == [({"w"}, None)]
    x = RNG.standard_normal((1, 3, 6, 6)).astype(np.float32)
    want = onnxcam.Explainer(STATIC, layers=["relu"], device="cpu").run(x, 2).gradients["relu"]
    np.testing.assert_array_equal(ex.run(x, 2).gradients["relu"], want)
