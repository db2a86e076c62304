"""Benchmark: what explaining a detector or segmenter costs at a given layer, against one plain inference of the
same model.

Builds ultralytics' YOLOv8n from its yaml with seeded weights (no download; ultralytics is not a dependency of
onnxcam: put it on PYTHONPATH; or `--model ssdlite`: torchvision's SSDlite320 as the tests build it), exports it
with torch's TorchScript exporter (opset 17, cached under /tmp), makes the explainable model at each asked layer
(onnxcam.rewrite.build, one dense seed on one class score) and times, on one onnxruntime session per model with the same options (onnxruntime's graph optimizations, `--threads` intra-op
threads, no spinning), interleaved in a new seeded order each repetition, one call after `--idle` seconds of
sleep. It reports the median and fastest call per mode and their ratios to the plain inference. On a shared,
loaded machine these wall times swing by 2x; `--profile` gives the steadier measure: each model under
onnxruntime's profiler for `--profile-runs` runs, each node's fastest kernel time, summed (forward part and
gradient nodes apart), by op type, by the forward op and rule that emitted them, and the costliest gradient nodes.
Identical graphs still differ by about 5% between two such profiles. `--class-score` also seeds the head's class
scores alone (the box branch then carries no gradient) and `--without` leaves passes out.

    PYTHONPATH=/tmp/ulib python tools/bench_tasks.py --size 320 --layers auto,model.4 --reps 30
    # each scale's own layer, differentiated apart (what `onnxcam explain` takes), against the one neck map
    python tools/bench_tasks.py --model yolox --layers auto,scales --anchor 2050 --reps 15
    PYTHONPATH=/tmp/ulib python tools/bench_tasks.py --size 320 --layers model.4 --profile --reps 0
    PYTHONPATH=/tmp/ulib python tools/bench_tasks.py --layers auto --class-score /model.22/Sigmoid_output_0 --profile
    # one anchor per stride at 320 px, each its grid's centre (passes.crop_seed_windows: the windows it reaches)
    for a in 820 1810 2055; do PYTHONPATH=/tmp/ulib python tools/bench_tasks.py --profile --reps 0 --anchor $a; done
    # torchvision's SSDlite320 (seeded): its class Softmax is the score; one anchor per level of the head
    for a in 1200 2700 3075; do python tools/bench_tasks.py --model ssdlite --layers auto --anchor $a --reps 30; done
    # torchvision's LRASPP / DeepLabV3 (MobileNetV3-Large, seeded): one class's map seeded, backbone stages
    python tools/bench_tasks.py --model lraspp --layers auto,net.backbone.12,net.backbone.6 --reps 20
    # A/B against another onnxcam tree (e.g. `git archive HEAD | tar -x -C /tmp/head`): save there, time here
    PYTHONPATH=/tmp/head:/tmp/ulib python tools/bench_tasks.py --layers model.4 --save /tmp/head-m4.onnx --reps 0
    PYTHONPATH=/tmp/ulib python tools/bench_tasks.py --layers model.4 --compare head=/tmp/head-m4.onnx --reps 30
    # five targets of one picture on one forward (n_seeds backward copies) against one target's run
    python tools/bench_tasks.py --model yolox --layers scales,dark3 --seeds 5 --reps 15
    # five items of one picture: the image repeated (today's copies) against one forward shared by the seeds
    python tools/bench_tasks.py --model yolox --free-batch --layers auto,dark3 --shared 5 --reps 15
    # what a picture's first run (a zero seed) and the Python API's own checks add
    python tools/bench_tasks.py --model lraspp --layers auto --zero-seed --api --reps 15
"""

from __future__ import annotations

import argparse
import collections
import glob
import json
import os
import random
import statistics
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.append(ROOT)  # last: a tree given in PYTHONPATH (A/B) wins over this one


def export_yolov8n(size: int) -> bytes:
    """YOLOv8n (80 classes) as ultralytics builds it from yolov8n.yaml, seeded, exported at batch 1."""
    path = os.path.join(tempfile.gettempdir(), f"onnxcam-bench-yolov8n-{size}{_FREE}.onnx")
    if os.path.exists(path):
        with open(path, "rb") as f:
            return f.read()

    import torch
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="onnxcam-yolo-"))
    try:
        from ultralytics.nn.tasks import DetectionModel
    except ImportError:
        sys.exit("ultralytics is not importable: put it on PYTHONPATH (it is not an onnxcam dependency)")
    torch.manual_seed(0)
    model = DetectionModel("yolov8n.yaml", nc=80, verbose=False).eval()
    for module in model.modules():
        if hasattr(module, "export"):
            module.export, module.format = True, "onnx"
    return _export_to(path, model, size, "output0")


_FREE = ""  # "-free" with --free-batch: exports whose batch axis is free (their own cache files)


def _export_to(path: str, model, size: int, output: str) -> bytes:
    """The model's TorchScript export at opset 17, batch 1 (input "images"; a free batch with --free-batch), also
    written to path (the cache)."""
    import io

    import torch
    f = io.BytesIO()
    axes = {"images": {0: "N"}, output: {0: "N"}} if _FREE else None
    torch.onnx.export(model, (torch.zeros(1, 3, size, size),), f, dynamo=False, opset_version=17,
                      input_names=["images"], output_names=[output], dynamic_axes=axes)
    with open(path, "wb") as out:
        out.write(f.getvalue())
    return f.getvalue()


def export_ssdlite(size: int) -> bytes:
    """torchvision's SSDlite320 (MobileNetV3 backbone, background + 3 classes) exported whole with its
    post-processing, seeded as the tests build it (tests/test_tasks_torchvision.py; its input is 320 px)."""
    if size != 320:
        sys.exit("SSDlite320's input is 320 px: --size 320")
    from tests.test_tasks_torchvision import build_ssdlite
    return build_ssdlite()[1]


def export_yolox(size: int) -> bytes:
    """A YOLOX-tiny-style detector (depth 0.33, width 0.375, 80 classes), seeded, built here in torch (no yolox
    package): a CSP backbone with SPP (a stride-2 conv for YOLOX's Focus), the PAFPN neck, per-scale decoupled
    heads whose regression, objectness and class outputs are concatenated to (N, A, 5 + C) as YOLOX exports them
    (its box decoding, elementwise on the box columns, left out)."""
    path = os.path.join(tempfile.gettempdir(), f"onnxcam-bench-yolox-{size}{_FREE}.onnx")
    if os.path.exists(path):
        with open(path, "rb") as f:
            return f.read()

    import torch
    from torch import nn

    def conv(ci, co, k=1, s=1):
        return nn.Sequential(nn.Conv2d(ci, co, k, s, k // 2, bias=False), nn.BatchNorm2d(co), nn.SiLU())

    class Bottleneck(nn.Module):
        def __init__(self, c, shortcut=True):
            super().__init__()
            self.a, self.b, self.add = conv(c, c), conv(c, c, 3), shortcut

        def forward(self, x):
            y = self.b(self.a(x))
            return x + y if self.add else y

    class CSP(nn.Module):
        def __init__(self, ci, co, n, shortcut=True):
            super().__init__()
            h = co // 2
            self.c1, self.c2, self.c3 = conv(ci, h), conv(ci, h), conv(2 * h, co)
            self.m = nn.Sequential(*[Bottleneck(h, shortcut) for _ in range(n)])

        def forward(self, x):
            return self.c3(torch.cat([self.m(self.c1(x)), self.c2(x)], 1))

    class SPP(nn.Module):
        def __init__(self, ci, co):
            super().__init__()
            self.c1, self.c2 = conv(ci, ci // 2), conv(2 * ci, co)
            self.pools = nn.ModuleList(nn.MaxPool2d(k, 1, k // 2) for k in (5, 9, 13))

        def forward(self, x):
            x = self.c1(x)
            return self.c2(torch.cat([x] + [p(x) for p in self.pools], 1))

    class YoloX(nn.Module):
        def __init__(self, w=(24, 48, 96, 192, 384), classes=80):
            super().__init__()
            self.stem = conv(3, w[0], 3, 2)
            self.dark2 = nn.Sequential(conv(w[0], w[1], 3, 2), CSP(w[1], w[1], 1))
            self.dark3 = nn.Sequential(conv(w[1], w[2], 3, 2), CSP(w[2], w[2], 3))
            self.dark4 = nn.Sequential(conv(w[2], w[3], 3, 2), CSP(w[3], w[3], 3))
            self.dark5 = nn.Sequential(conv(w[3], w[4], 3, 2), SPP(w[4], w[4]), CSP(w[4], w[4], 1, False))
            self.lateral, self.p4 = conv(w[4], w[3]), CSP(2 * w[3], w[3], 1, False)
            self.reduce, self.p3 = conv(w[3], w[2]), CSP(2 * w[2], w[2], 1, False)
            self.down3, self.n3 = conv(w[2], w[2], 3, 2), CSP(2 * w[2], w[3], 1, False)
            self.down4, self.n4 = conv(w[3], w[3], 3, 2), CSP(2 * w[3], w[4], 1, False)
            hid = w[2]
            self.stems = nn.ModuleList(conv(c, hid) for c in w[2:])
            self.cls = nn.ModuleList(nn.Sequential(conv(hid, hid, 3), conv(hid, hid, 3)) for _ in range(3))
            self.reg = nn.ModuleList(nn.Sequential(conv(hid, hid, 3), conv(hid, hid, 3)) for _ in range(3))
            self.cls_pred = nn.ModuleList(nn.Conv2d(hid, classes, 1) for _ in range(3))
            self.reg_pred = nn.ModuleList(nn.Conv2d(hid, 4, 1) for _ in range(3))
            self.obj_pred = nn.ModuleList(nn.Conv2d(hid, 1, 1) for _ in range(3))
            self.up = nn.Upsample(scale_factor=2, mode="nearest")

        def forward(self, x):
            d3 = self.dark3(self.dark2(self.stem(x)))
            d4 = self.dark4(d3)
            d5 = self.dark5(d4)
            f0 = self.lateral(d5)
            f1 = self.reduce(self.p4(torch.cat([self.up(f0), d4], 1)))
            p3 = self.p3(torch.cat([self.up(f1), d3], 1))
            n3 = self.n3(torch.cat([self.down3(p3), f1], 1))
            n4 = self.n4(torch.cat([self.down4(n3), f0], 1))
            outs = []
            for i, f in enumerate((p3, n3, n4)):
                h = self.stems[i](f)
                r = self.reg[i](h)
                outs.append(torch.cat([self.reg_pred[i](r), self.obj_pred[i](r).sigmoid(),
                                       self.cls_pred[i](self.cls[i](h)).sigmoid()], 1).flatten(2))
            return torch.cat(outs, 2).permute(0, 2, 1)

    torch.manual_seed(0)
    model = YoloX().eval()
    return _export_to(path, model, size, "output")


def export_segmenter(name: str):
    """torchvision's `name` segmenter (MobileNetV3-Large backbone, 21 classes), seeded, no weights downloaded,
    exported at batch 1 with its "out" map (N, 21, H, W) alone."""
    def export(size: int) -> bytes:
        path = os.path.join(tempfile.gettempdir(), f"onnxcam-bench-{name}-{size}{_FREE}.onnx")
        if os.path.exists(path):
            with open(path, "rb") as f:
                return f.read()
        import torch
        import torchvision

        class Out(torch.nn.Module):  # the dict output's "out" map, as deployed segmenters return it
            def __init__(self, net):
                super().__init__()
                self.net = net

            def forward(self, x):
                return self.net(x)["out"]
        torch.manual_seed(0)
        build = getattr(torchvision.models.segmentation, name)
        extra = {"aux_loss": False} if name.startswith("deeplab") else {}
        net = build(weights=None, weights_backbone=None, num_classes=21, **extra).eval()
        return _export_to(path, Out(net), size, "out")
    return export


MODELS = {"yolov8n": export_yolov8n, "ssdlite": export_ssdlite, "yolox": export_yolox,
          "lraspp": export_segmenter("lraspp_mobilenet_v3_large"),
          "deeplabv3": export_segmenter("deeplabv3_mobilenet_v3_large")}


def explainable(model: bytes, size: int, layer: str, without: tuple = (), score: str | None = None,
                anchor: int | None = None, n_seeds: int = 1, shared: int = 0):
    """(onnx bytes with weights inside, the layer's tensor name, the dense seed) for one class score at `layer`;
    `without`: passes of onnxcam/autodiff/passes.py left out; `score`: a tensor to seed in place of the model's
    output (e.g. the class scores alone, before the head's Concat with the boxes); `anchor`: the seeded anchor
    (default a third of the way, in the stride-8 scale); n_seeds: that many seeds on one image (rewrite.build's
    backward copies sharing one forward), the k-th on class k + 1 of a segmenter or on an anchor k / n_seeds of the
    way along a detector's anchors (the first the chosen anchor); shared: the model sharing one forward between
    the seeds of one image (rewrite.build shared=), with that many seeds in the seed's batch."""
    import onnx

    from onnxcam.autodiff import builder
    from onnxcam.graph.model import ModelGraph
    every = builder.PASSES
    builder.PASSES = tuple(p for p in every if p not in without)
    try:
        return _explainable(ModelGraph(onnx.load_from_string(model), (1, 3, size, size)), layer, score, anchor,
                            n_seeds, shared)
    finally:
        builder.PASSES = every


def _explainable(mg, layer: str, score: str | None, anchor: int | None = None, n_seeds: int = 1, shared: int = 0):
    import onnx

    from onnxcam.rewrite import build, resolve_layers
    from onnxcam.tasks.choose import scale_layers
    apart = layer == "scales"  # each scale's own layer, differentiated apart (what `onnxcam explain` takes)
    if apart:
        found = scale_layers(mg, mg.default_score())
        if found is None:
            sys.exit("--layers scales: the model's head is not a multi-scale one (tasks/choose.py scale_layers)")
    score = score or mg.default_score()
    layers = list(found.names) if apart else resolve_layers(mg, None if layer == "auto" else layer.split("+"),
                                                            score)
    rw = build(mg, layers, score, apart=apart, n_seeds=n_seeds, shared=bool(shared))
    proto = rw.model
    for init in proto.graph.initializer:  # the placeholders take their values: one self-contained model file
        if init.name in rw.weights:
            init.CopyFrom(onnx.numpy_helper.from_array(np.ascontiguousarray(rw.weights[init.name]), init.name))
    softmax = mg.producer(mg.tensor(score)).op == "Softmax"
    if shared:  # the seeds are the batch: (S, 1, ...)
        seed = np.zeros((shared, 1, *rw.score_shape[1:]), np.float32)
        for k in range(shared):
            _seed_one(seed[k, 0], rw.score_shape, softmax, anchor, k / shared, k)
        return proto.SerializeToString(), layers[0], seed
    seed = np.zeros((1, n_seeds, *rw.score_shape[1:]), np.float32)
    for k in range(n_seeds):
        _seed_one(seed[0, k], rw.score_shape, softmax, anchor, k / n_seeds, k)
    return proto.SerializeToString(), layers[0], seed


def _seed_one(seed: np.ndarray, score_shape: tuple, softmax: bool, anchor: int | None, along: float, k: int) -> None:
    """One class score of one anchor (a detector), or one class's whole map (a segmenter), set to 1 in `seed`."""
    if len(score_shape) == 4:  # a segmenter's (N, K, H, W): one class's mask; every pixel, the costliest mask
        seed[(1 + k) % seed.shape[0]] = 1.0
        return
    anchors = seed.shape[0] if softmax or score_shape[1] > score_shape[2] else seed.shape[-1]
    first = anchors // 3 if anchor is None else anchor
    at = (first + int(along * anchors)) % anchors
    if softmax:  # SSD's (N, anchors, classes): class 1 of one anchor
        seed[at, 1] = 1.0
    elif score_shape[1] > score_shape[2]:  # YOLOX/YOLOv5's (N, anchors, 5 + classes): class 7 of one anchor
        seed[at, 5 + 7] = 1.0
    else:  # the class scores alone, or after the 4 box rows
        seed[7 if score_shape[1] == 80 else 4 + 7, at] = 1.0


class _ApiRun:
    """onnxcam.Explainer.run on the plain model at one layer, with the bench's seed, behind a session's run()."""

    def __init__(self, plain: bytes, layer: str, image: np.ndarray, seed: np.ndarray, threads: int):
        import onnxcam
        from onnxcam import runtime
        runtime.SESSION_CONFIG.update({"onnxcam.intra_op_threads": str(threads),
                                       "session.intra_op.allow_spinning": "0"})
        self.explainer = onnxcam.Explainer(plain, layers=[layer], device="cpu")
        self.image, self.seed = image, seed

    def run(self, _names, _feeds):
        return self.explainer.run(self.image, seed=self.seed)


class _EachAlone:
    """A batch-1 model's session behind a session's run(): the samples of the feeds' batch one run each (how a
    batch-1 export's items ran before graph/free_batch.py)."""

    def __init__(self, session, feeds: dict):
        self.session, self.feeds = session, feeds

    def run(self, names, _feeds):
        n = len(self.feeds["images"])
        return [self.session.run(names, {k: v[i:i + 1] if np.ndim(v) and len(v) == n else v
                                         for k, v in self.feeds.items()}) for i in range(n)]


def freed(plain: bytes, size: int) -> bytes:
    """The batch-1 export `plain` with its batch freed and checked (graph/free_batch.py), weights inside."""
    import onnx

    from onnxcam.graph.free_batch import check_freed, freed_batch
    from onnxcam.graph.load import detach_weights, with_weights
    skeleton, weights = detach_weights(onnx.load_from_string(plain), owned=False)
    name, shape = skeleton.graph.input[0].name, (1, 3, size, size)
    model = freed_batch(skeleton, weights, name, shape)
    check_freed(skeleton, model, weights, name, shape, np.float32)
    return with_weights(model, weights).SerializeToString()


def tail_mode(plain: bytes, tensor: str, image: np.ndarray, threads: int, output: str | None = None) -> tuple:
    """(session, feeds) of the plain model's part after `tensor` up to `output` (default: its first output;
    graph/cut.py's tail; the tensors it reads from before the layer fed from one plain run)."""
    import onnx

    from onnxcam.graph.cut import tail_model, tail_nodes
    proto = onnx.load_from_string(plain)
    output = output or proto.graph.output[0].name
    _, fed = tail_nodes(proto, tensor, output)
    given = {"images": image}
    computed = [name for name in fed if name not in given]  # a skip connection may read the input itself
    typed = {v.name: v for v in onnx.shape_inference.infer_shapes(proto).graph.value_info}
    probe = onnx.load_from_string(plain)
    probe.graph.output.extend(typed[name] for name in computed)
    values = {**given, **dict(zip(computed, make_session(probe.SerializeToString(), threads).run(computed, given)))}
    tail, names = tail_model(proto, tensor, output, values)
    s = make_session(tail.SerializeToString(), threads)
    return s, {name: values[name] for name in names}


def cpu_kind() -> str:
    """The CPU's model name and widest vector extension: onnxruntime's convolution kernels (MLAS, blocked NCHWc)
    run about twice as fast with AVX-512 as with AVX2 while the gradient's elementwise, pooling-position and
    ConvTranspose kernels gain less, so the same graph's ratio to a plain inference differs by machine
    (docs/benchmarks.md: 1.60x on one, 1.87x on the other for the same middle layer)."""
    try:
        with open("/proc/cpuinfo") as f:
            info = f.read()
    except OSError:
        return "unknown"
    name = next((line.split(":", 1)[1].strip() for line in info.splitlines() if line.startswith("model name")), "?")
    flags = set(next((line.split(":", 1)[1].split() for line in info.splitlines() if line.startswith("flags")), []))
    widest = next((f for f in ("avx512f", "avx2", "avx") if f in flags), "no AVX")
    return f"{name}, {widest.upper()}"


def make_session(model: bytes, threads: int, profile: str | None = None):
    import onnxruntime as ort
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.log_severity_level = 3
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    return ort.InferenceSession(model, sess_options=opts, providers=["CPUExecutionProvider"])


def feeds_for(sess, image: np.ndarray, seed: np.ndarray | None) -> dict:
    feeds = {}
    for i in sess.get_inputs():
        if i.name == "images":
            feeds[i.name] = image
        elif i.type == "tensor(bool)":
            feeds[i.name] = np.asarray(False)
        else:
            feeds[i.name] = seed
    return feeds


def time_modes(modes: dict, reps: int, idle: float) -> tuple[dict, dict]:
    """({mode: [wall seconds per call]}, {mode: [CPU seconds of the calling thread per call]}): one call per mode
    per repetition, modes in a seeded new order each time. With one intra-op thread onnxruntime runs every node
    on the calling thread, whose CPU time leaves out the time other processes held the core: the steadier measure
    on a loaded machine (it still counts their cache misses)."""
    wall, cpu = {m: [] for m in modes}, {m: [] for m in modes}
    order = list(modes)
    rng = random.Random(0)
    for _ in range(reps):
        rng.shuffle(order)
        for m in order:
            sess, feeds = modes[m]
            time.sleep(idle)
            t0, c0 = time.perf_counter(), time.thread_time()
            sess.run(None, feeds)
            wall[m].append(time.perf_counter() - t0)
            cpu[m].append(time.thread_time() - c0)
    return wall, cpu


def node_times(model: bytes, feeds: dict, threads: int, runs: int) -> tuple[dict, dict]:
    """({node: fastest kernel ms over `runs` profiled runs}, {node: op type}) after one warm-up run.

    The sum of the per-node fastest times is the measure that the machine's other load disturbs least: a preempted
    node is slow in one run, rarely in all of them."""
    folder = tempfile.mkdtemp(prefix="onnxcam-prof-")
    sess = make_session(model, threads, os.path.join(folder, "p"))
    for _ in range(runs + 1):
        time.sleep(0.05)
        sess.run(None, feeds)
    path = sess.end_profiling()
    with open(path) as f:
        events = json.load(f)
    for p in glob.glob(os.path.join(folder, "*")):
        os.remove(p)
    os.rmdir(folder)
    starts = sorted(e["ts"] for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    per_run = collections.defaultdict(list)
    op_of = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time") and e["ts"] >= starts[1]:
            name = e["name"][: -len("_kernel_time")]
            per_run[name].append(e["dur"] / 1000.0)
            op_of[name] = e["args"].get("op_name", "?")
    return _without_branches(model, {n: min(v) for n, v in per_run.items()}), op_of


def _without_branches(model: bytes, times: dict) -> dict:
    """An If's kernel time spans the nodes of the branch it ran, which the profile lists too: keep its own part
    only (what is left of it once they are taken out), so that every node is counted once."""
    import onnx
    for n in onnx.load_from_string(model).graph.node:
        if n.op_type == "If" and n.name in times:
            inner = sum(times.get(m.name, 0.0) for a in n.attribute if a.type == onnx.AttributeProto.GRAPH
                        for m in a.g.node)
            times[n.name] = max(0.0, times[n.name] - inner)
    return times


def origins(model: bytes) -> dict:
    """{gradient node name: 'forward op / rule'} from the doc_strings onnxcam writes (rewrite._sign)."""
    import onnx
    out = {}
    for n in onnx.load_from_string(model).graph.node:
        if n.doc_string.startswith("{"):
            o = next(iter(json.loads(n.doc_string).values()))
            out[n.name] = f"{o.get('op', '?')} / {o.get('rule', '?')}"
    return out


def report_profile(name: str, times: dict, op_of: dict, origin: dict, plain_ms: float, top: int) -> None:
    """Kernel time of the forward part and of the gradient nodes (onnxcam_grad/...), by op type, by emitting
    forward op and rule, and the costliest gradient nodes."""
    grad = {n: v for n, v in times.items() if "onnxcam_grad" in n}
    fwd = {n: v for n, v in times.items() if n not in grad}
    total = sum(times.values())
    print(f"{name}: kernel ms {total:.1f} = {total / plain_ms:.2f}x plain; forward part {sum(fwd.values()):.1f}, "
          f"gradient {sum(grad.values()):.1f} ({len(grad)} nodes)")
    for label, part in (("forward", fwd), ("gradient", grad)):
        by_op = collections.Counter()
        for n, v in part.items():
            by_op[op_of[n]] += v
        print(f"  {label} by op type: " + ", ".join(f"{k} {v:.1f}" for k, v in by_op.most_common(14)))
    by_origin = collections.Counter()
    for n, v in grad.items():
        base = next((o for o in origin if n.startswith(o)), None)
        by_origin[origin.get(base, "(fused by onnxruntime)")] += v
    print("  gradient by forward op / rule: " + ", ".join(f"{k} {v:.1f}" for k, v in by_origin.most_common(12)))
    for n, v in sorted(grad.items(), key=lambda kv: -kv[1])[:top]:
        print(f"    {v:6.2f}  {op_of[n]:<16} {n}")


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", choices=list(MODELS), default="yolov8n",
                    help="yolov8n (ultralytics on PYTHONPATH), yolox (a YOLOX-tiny-style net built here; anchors as "
                    "YOLOv8's) or ssdlite (torchvision; anchors 0-2399 are stride 16, 2400-2999 stride 32, then 64, "
                    "107, 160, 320); lraspp, deeplabv3 (torchvision's MobileNetV3-Large segmenters, seeded; one class's whole "
                    "map seeded)")
    ap.add_argument("--size", type=int, default=320)
    ap.add_argument("--layers", default="auto,model.4",
                    help="comma-separated: auto, scales (each scale's own layer, differentiated apart: what `onnxcam "
                    "explain` takes for a multi-scale head), or module paths / tensor names (several target layers "
                    "of one model joined by +)")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--idle", type=float, default=0.3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--anchor", type=int, help="the seeded anchor (default: a third of the way, in the stride-8 "
                    "scale; at 320 px anchors 1600-1999 are stride 16, 2000-2099 stride 32)")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--profile-runs", type=int, default=10)
    ap.add_argument("--top", type=int, default=15)
    ap.add_argument("--without", default="", help="comma-separated passes (autodiff/passes.py) to leave out; "
                    "each layer is then also timed as LAYER-without (and LAYER-classes-without)")
    ap.add_argument("--class-score", help="also time each layer seeding this tensor (the head's class scores, "
                    "e.g. /model.22/Sigmoid_output_0) in place of the output, as LAYER-classes")
    ap.add_argument("--seeds", type=int, default=0, help="also time each layer with this many seeds on one image "
                    "(one forward, that many backward copies) as LAYER-seedsN, and print what building it took")
    ap.add_argument("--free-batch", action="store_true", help="export the models with a free batch axis (cached "
                    "apart); --shared needs it")
    ap.add_argument("--shared", type=int, default=0, help="also time each layer with this many targets of one "
                    "image as `onnxcam explain` runs a picture's items: LAYER-copiesN (the image repeated, one seed "
                    "each) and LAYER-sharedN (one forward, rewrite.build shared=); without --free-batch the copies "
                    "run one at a time and the shared model is built on the export with its batch freed "
                    "(graph/free_batch.py), as `onnxcam explain` now runs a batch-1 export")
    ap.add_argument("--zero-seed", action="store_true", help="also time each layer's model with a zero seed as "
                    "LAYER-zero (what `onnxcam explain`'s first run of a picture, which reads its outputs, costs)")
    ap.add_argument("--api", action="store_true", help="also time each layer through onnxcam.Explainer.run (the "
                    "Python API: its input and seed checks, its outputs' NaN checks) as LAYER-api")
    ap.add_argument("--tail", action="store_true", help="also time the plain model's part after each layer (cut "
                    "there, graph/cut.py) as LAYER-tail: 1 + its ratio is what the explanation would cost with a "
                    "gradient as fast as that part's forward (an upper estimate of that floor: the tail computes "
                    "every output, where a detection's gradient crosses its own scale's branch only: --tail-to)")
    ap.add_argument("--tail-to", help="end the tails at this tensor (e.g. the seeded scale's head output: YOLOX-style "
                    "stride 32 '/Reshape_2_output_0', YOLOv8n's stride-32 class scores '/model.22/Reshape_5_output_0')")
    ap.add_argument("--save", help="write the (first) explainable model to this file and stop unless --reps")
    ap.add_argument("--compare", action="append", default=[], help="NAME=FILE: an explainable model saved by --save "
                    "(by another onnxcam tree) timed alongside")
    args = ap.parse_args(argv)
    import onnxcam
    print(f"onnxcam from {os.path.dirname(onnxcam.__file__)}; size {args.size}; threads {args.threads}; "
          f"CPU {cpu_kind()}")
    global _FREE
    _FREE = "-free" if args.free_batch else ""
    plain = MODELS[args.model](args.size)
    image = np.random.default_rng(1).random((1, 3, args.size, args.size), dtype=np.float32)
    sess = make_session(plain, args.threads)
    modes = {"plain": (sess, feeds_for(sess, image, None))}
    models = {"plain": plain}
    for layer in [s for s in args.layers.split(",") if s]:
        t0 = time.perf_counter()
        model, tensor, seed = explainable(plain, args.size, layer, anchor=args.anchor)
        print(f"layer {layer} = {tensor!r}: built in {time.perf_counter() - t0:.1f} s")
        if args.save:
            with open(args.save, "wb") as f:
                f.write(model)
            np.save(args.save + ".seed.npy", seed)
            args.save = None
        s = make_session(model, args.threads)
        modes[layer] = (s, feeds_for(s, image, seed))
        models[layer] = model
        if args.zero_seed:
            modes[f"{layer}-zero"] = (s, feeds_for(s, image, np.zeros_like(seed)))
        if args.api and layer != "scales":
            modes[f"{layer}-api"] = (_ApiRun(plain, tensor, image, seed[:, 0], args.threads), {})
        if args.shared > 1:
            n = args.shared
            free = plain if args.free_batch else freed(plain, args.size)  # a batch-1 export: freed first
            model, _, sseed = explainable(free, args.size, layer, anchor=args.anchor, shared=n)
            s = make_session(model, args.threads)
            modes[f"{layer}-shared{n}"] = (s, feeds_for(s, image, sseed))
            models[f"{layer}-shared{n}"] = model
            copies = make_session(models[layer], args.threads)
            feeds = feeds_for(copies, np.repeat(image, n, axis=0), sseed)
            modes[f"{layer}-copies{n}"] = (copies, feeds) if args.free_batch else (_EachAlone(copies, feeds), {})
        if args.tail and "+" not in tensor and layer != "scales":
            modes[f"{layer}-tail"] = tail_mode(plain, tensor, image, args.threads, args.tail_to)
        if args.class_score:
            model, _, cseed = explainable(plain, args.size, layer, score=args.class_score, anchor=args.anchor)
            s = make_session(model, args.threads)
            modes[f"{layer}-classes"] = (s, feeds_for(s, image, cseed))
            models[f"{layer}-classes"] = model
        if args.seeds > 1:
            t0 = time.perf_counter()
            model, _, nseed = explainable(plain, args.size, layer, anchor=args.anchor, n_seeds=args.seeds)
            s = make_session(model, args.threads)
            print(f"layer {layer} with {args.seeds} seeds: built with its session in {time.perf_counter() - t0:.1f} s")
            modes[f"{layer}-seeds{args.seeds}"] = (s, feeds_for(s, image, nseed))
            models[f"{layer}-seeds{args.seeds}"] = model
        if args.without:
            left_out = tuple(args.without.split(","))
            model, _, _ = explainable(plain, args.size, layer, left_out, anchor=args.anchor)
            s = make_session(model, args.threads)
            modes[f"{layer}-without"] = (s, feeds_for(s, image, seed))
            models[f"{layer}-without"] = model
            if args.class_score:
                model, _, _ = explainable(plain, args.size, layer, left_out, args.class_score, args.anchor)
                s = make_session(model, args.threads)
                modes[f"{layer}-classes-without"] = (s, feeds_for(s, image, cseed))
                models[f"{layer}-classes-without"] = model
    for spec in args.compare:
        name, path = spec.split("=", 1)
        with open(path, "rb") as f:
            models[name] = f.read()
        s = make_session(models[name], args.threads)
        modes[name] = (s, feeds_for(s, image, np.load(path + ".seed.npy")))
    if args.profile:
        plain_ms = None
        for name, model in models.items():
            times, op_of = node_times(model, modes[name][1], args.threads, args.profile_runs)
            plain_ms = plain_ms or sum(times.values())
            report_profile(name, times, op_of, origins(model), plain_ms, args.top)
    if args.reps <= 0:
        return
    for s, feeds in modes.values():
        s.run(None, feeds)  # warm-up
    wall, cpu = time_modes(modes, args.reps, args.idle)
    width = max(14, *(len(m) for m in modes))
    for label, times in (("wall", wall), ("thread CPU" + (" (one thread: steadier)" if args.threads == 1 else ""),
                                          cpu)):
        med0, min0 = statistics.median(times["plain"]), min(times["plain"])
        print(f"{label}:\n{'mode':<{width}} {'median ms':>10} {'fastest ms':>11} {'x median':>9} {'x fastest':>10}")
        for m, t in times.items():
            med, lo = statistics.median(t), min(t)
            print(f"{m:<{width}} {med * 1e3:10.1f} {lo * 1e3:11.1f} {med / med0:9.2f} {lo / min0:10.2f}")
    for m, t in cpu.items():
        if m.endswith("-tail"):
            med0, min0 = statistics.median(cpu["plain"]), min(cpu["plain"])
            print(f"{m[:-5]}: with a gradient at the forward's speed after the layer, "
                  f"{1 + statistics.median(t) / med0:.2f}x / {1 + min(t) / min0:.2f}x plain (thread CPU)")

if __name__ == "__main__":
    main()
