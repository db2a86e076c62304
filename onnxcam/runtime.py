"""onnxruntime sessions: picking the execution provider, and noticing when CUDA silently falls back to CPU."""

from __future__ import annotations

import ctypes
import functools
import json
import logging
import os
import shutil
import tempfile
import weakref

import numpy as np
import onnx
import onnxruntime as ort
from google.protobuf.message import DecodeError

from .cache import CACHE
from .errors import DeviceError, InternalError, ModelError, OnnxCamError
from .graph import external

log = logging.getLogger(__name__)
DEVICES = ("auto", "cpu", "cuda")
# Extra onnxruntime session config entries for every session onnxcam creates (e.g. the benchmark turns off
# intra-op spinning so that several sessions on one small machine do not steal each other's cores). Part of the
# key of the sessions onnxcam.cache holds: changing it makes new sessions, it does not reuse those built before.
# Keys starting "onnxcam." are onnxcam's own session options, not passed on: "onnxcam.mem_pattern": "0" turns
# onnxruntime's memory pattern off (SessionOptions.enable_mem_pattern: no block planned for the largest run's
# intermediates, which are then allocated per tensor from the arena); "onnxcam.intra_op_threads": "N" gives each run
# N threads (SessionOptions.intra_op_num_threads; the pipeline runs parts of a batch at once, each on a share of the
# cores).
SESSION_CONFIG: dict[str, str] = {}
# What the command line's pipeline sets (cli.py): its sessions share the cores with decoding and writing threads,
# where spinning onnxruntime threads would burn CPU time those need (measured: 2.5 s CPU less of 14 s on 64 photos;
# wall time within noise), and the memory pattern costs about 35 MB of peak RSS on resnet50 for no measured speed.
PIPELINE_SESSION_CONFIG = {"session.intra_op.allow_spinning": "0", "onnxcam.mem_pattern": "0"}
_OWN = "onnxcam."
INTRA_OP_THREADS = _OWN + "intra_op_threads"


@functools.lru_cache(maxsize=1)
def cuda_usable() -> bool:
    """True when onnxruntime has a CUDA provider and the driver reports at least one GPU."""
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return False
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        count = ctypes.c_int(0)
        return cuda.cuInit(0) == 0 and cuda.cuDeviceGetCount(ctypes.byref(count)) == 0 and count.value > 0
    except OSError:
        return False


def _options() -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.log_severity_level = 4  # onnxruntime's own error lines would duplicate the one-line errors onnxcam raises
    for key, value in SESSION_CONFIG.items():
        if key == _OWN + "mem_pattern":
            opts.enable_mem_pattern = value != "0"
        elif key == INTRA_OP_THREADS:
            opts.intra_op_num_threads = int(value)
        elif key.startswith(_OWN):
            raise InternalError(f"unknown onnxcam session option {key!r} in runtime.SESSION_CONFIG")
        else:
            opts.add_session_config_entry(key, value)
    return opts


def cpu_session(model_bytes: bytes, initializers: dict | None = None, *, lean: bool = False,
                profile: str | None = None) -> ort.InferenceSession:
    """lean: a short-lived session (shape probes) that returns its memory after each run instead of keeping an
    arena sized for the largest run, and runs the nodes as written (no fusions: each node is seen in a profile).
    profile: a file prefix; onnxruntime's profiler then records each node's output shapes."""
    return session(model_bytes, "cpu", initializers, lean=lean, profile=profile)


def session(model_bytes: bytes, device: str = "auto", initializers: dict | None = None, *,
            lean: bool = False, profile: str | None = None, watch_placement: bool = False,
            data_file: str | os.PathLike | None = None) -> ort.InferenceSession:
    """A session on the requested device; 'cuda' fails loudly if onnxruntime would run it on the CPU.

    watch_placement: on CUDA, profile the first run so that first_run_placement() can tell which nodes onnxruntime
    left on the CPU (it does so silently, node by node, for ops or types its CUDA kernels lack).

    initializers: numpy values of the model's placeholder weights (graph/load.py split_weights). onnxruntime
    copies them into the session (tests/test_runtime.py checks it), so the caller may drop them afterwards.
    data_file: the model file that the model's external tensors located at its name refer to (weights onnxruntime
    reads from the original file itself, graph/load.py LoadedModel.file_backed); no other file is read.
    """
    if device not in DEVICES:
        raise DeviceError(f"device must be one of {', '.join(DEVICES)}, not {device!r}")
    want_cuda = device == "cuda" or (device == "auto" and cuda_usable())
    if device == "cuda" and not cuda_usable():
        raise DeviceError("device='cuda' was requested but no CUDA GPU is usable by onnxruntime "
                          f"(providers: {', '.join(ort.get_available_providers())})")
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if want_cuda else ["CPUExecutionProvider"]
    _refuse_external_data(model_bytes, initializers or {}, None if data_file is None else os.path.basename(data_file))
    opts = _options()
    if data_file is not None:
        opts.add_session_config_entry("session.model_external_initializers_file_folder_path",
                                      os.path.dirname(os.path.abspath(data_file)))
    if lean:
        opts.enable_cpu_mem_arena = False
        opts.enable_mem_pattern = False
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    folder = None
    if watch_placement and want_cuda and not profile:
        folder = tempfile.mkdtemp(prefix="onnxcam-placement-")
        profile = os.path.join(folder, "placement")
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    values = [ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v)) for v in (initializers or {}).values()]
    if values:
        opts.add_external_initializers(list(initializers), values)
    try:
        sess = ort.InferenceSession(model_bytes, sess_options=opts, providers=providers)
    except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/... types
        if folder:
            shutil.rmtree(folder, ignore_errors=True)
        raise _load_error(model_bytes, _first_line(exc)) from exc
    if want_cuda and sess.get_providers()[0] != "CUDAExecutionProvider":
        if device == "cuda":
            raise DeviceError("onnxruntime fell back to the CPU although device='cuda' was requested")
        log.warning("CUDA is present but onnxruntime fell back to the CPU")
    if folder:
        CACHE.watch(id(sess))
        weakref.finalize(sess, _forget, id(sess), folder)
    return sess


def _refuse_external_data(model_bytes: bytes, initializers: dict, data_file: str | None = None) -> None:
    """Given a model as bytes, onnxruntime reads external data relative to the working directory. onnxcam reads
    external data itself when it loads a model (graph/load.py), so the only external tensors a session may meet
    are the placeholders of the weights passed in `initializers`, and those located at data_file (a name in the
    folder set for the session)."""
    if b"location" not in model_bytes:  # the key of every external-data entry: without it, nothing to look at
        return
    try:
        proto = onnx.ModelProto.FromString(model_bytes)
    except DecodeError:
        return  # onnxruntime reports the malformed model
    for t, place in external.tensors(proto):
        location = next((e.value for e in t.external_data if e.key == "location"), "")
        if external.is_external(t) and not (external.is_placeholder(t) and t.name in initializers) and not (
                data_file is not None and location == data_file):
            raise ModelError(f"{external.describe(place)} refers to external data {location!r} that was not read when the model was "
                             "loaded; onnxruntime would look for it in the working directory")


# ---- node placement ------------------------------------------------------------------------------------------------
_FLOATS = {"float", "float16", "bfloat16", "double"}


def _forget(key: int, folder: str) -> None:
    CACHE.take_watched(key)  # the session is gone before its first run: nothing to read
    shutil.rmtree(folder, ignore_errors=True)


def first_run_placement(sess: ort.InferenceSession) -> dict | None:
    """After the first run of a session made with watch_placement: {node name: (op type, provider, output types)},
    read from the run's profile (which then stops). None for sessions that are not watched, or already read."""
    if not CACHE.take_watched(id(sess)):  # of two threads finishing a first run, one reads the profile
        return None
    path = sess.end_profiling()
    try:
        with open(path) as f:
            return node_placement(json.load(f))
    finally:
        os.remove(path)


def node_placement(events: list) -> dict:
    """{node name: (op type, provider, output element types)} from an onnxruntime profile's node events."""
    placed = {}
    for e in events:
        args = e.get("args", {})
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time") or "provider" not in args:
            continue
        types = [kind for entry in args.get("output_type_shape", []) for kind in entry]
        placed[e["name"][:-len("_kernel_time")]] = (args.get("op_name", "?"), args["provider"], types)
    return placed


def gradient_fallbacks(placed: dict, provider: str = "CUDAExecutionProvider", prefix: str = "onnxcam_grad") -> list:
    """'name (OpType)' of the gradient nodes that computed floating-point tensors somewhere else than `provider`.

    onnxruntime puts small integer shape computations on the CPU on purpose (they feed CPU-side shape arguments);
    a node that computes float tensors away from the GPU is a fallback that costs two copies per run."""
    return sorted(f"{name} ({op})" for name, (op, where, types) in placed.items()
                  if name.startswith(prefix) and where != provider and _FLOATS.intersection(types))


def _load_error(model_bytes: bytes, message: str) -> OnnxCamError:
    """onnxruntime's refusal of a model: onnxcam's InternalError when it names a node that onnxcam emitted (its
    doc_string names the forward node and rule, rewrite.py), else the model's ModelError."""
    if "onnxcam_grad/" in message and isinstance(model_bytes, bytes):
        try:
            nodes = onnx.ModelProto.FromString(model_bytes).graph.node
        except DecodeError:
            nodes = []
        named = [n for n in nodes if n.name and n.name in message and "onnxcam_origin" in n.doc_string]
        if named:
            node = max(named, key=lambda n: len(n.name))  # names can be prefixes of others
            return InternalError(f"onnxruntime rejects node {node.name!r}: {message}",
                                 **json.loads(node.doc_string)["onnxcam_origin"])
        return InternalError(f"onnxruntime rejects a node onnxcam emitted: {message}")
    return ModelError(f"onnxruntime cannot load the model: {message}")


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
