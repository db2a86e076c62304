"""Convolutions and pooling. The input gradient of a convolution is a ConvTranspose with the same weights;
pooling gradients reuse that transposition (AveragePool) or scatter to the argmax (MaxPool, through its
Indices output). All need static spatial sizes, which the model graph provides.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from . import rule


def _geometry(b, n, x, y, kernel):
    """strides, dilations, (begin pads, end pads) with auto_pad resolved, from static sizes."""
    nd = len(kernel)
    strides = list(n.attrs.get("strides", [1] * nd))
    dilations = list(n.attrs.get("dilations", [1] * nd))
    in_sz = b.static_dims(x, range(2, 2 + nd))
    out_sz = b.static_dims(y, range(2, 2 + nd))
    auto = n.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(nd):
            total = max((out_sz[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - in_sz[i], 0)
            small, big = total // 2, total - total // 2
            begin.append(small if auto == "SAME_UPPER" else big)
            end.append(big if auto == "SAME_UPPER" else small)
    elif auto == "VALID":
        begin, end = [0] * nd, [0] * nd
    else:
        pads = list(n.attrs.get("pads", [0] * (2 * nd)))
        begin, end = pads[:nd], pads[nd:]
    return strides, dilations, begin, end, in_sz, out_sz


def transposed_conv(b, g, weight, *, group, strides, dilations, begin, in_sz, out_sz, kernel):
    """The adjoint of a convolution with these parameters, applied to g: an input-shaped gradient.

    ConvTranspose scatters every output position back over its window (its full size is
    (out - 1) * stride + (k - 1) * dilation + 1); input position i sits at full position i + begin pad. With
    symmetric pads and a small remainder ConvTranspose's own pads/output_padding do the crop; otherwise crop with
    Slice and fill the input's uncovered tail with Pad (asymmetric ConvTranspose pads are unreliable in onnxruntime).
    """
    nd = len(kernel)
    full = [(out_sz[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 for i in range(nd)]
    extra = [in_sz[i] + 2 * begin[i] - full[i] for i in range(nd)]
    if all(0 <= extra[i] < strides[i] for i in range(nd)):
        return b.op("ConvTranspose", g, weight, group=group, strides=strides, dilations=dilations,
                    pads=list(begin) * 2, output_padding=extra if any(extra) else None)
    g = b.op("ConvTranspose", g, weight, group=group, strides=strides, dilations=dilations)
    stop = [min(full[i], begin[i] + in_sz[i]) for i in range(nd)]
    g = b.slice(g, begin, stop, list(range(2, 2 + nd)))
    tail = [begin[i] + in_sz[i] - stop[i] for i in range(nd)]
    if any(tail):
        g = b.pad(g, [0, 0] + [0] * nd + [0, 0] + tail)
    return g


@rule("Conv")
def _conv(b, n, gy):
    x, w = n.inputs[0], n.inputs[1]
    kernel = list(n.attrs.get("kernel_shape", b.static_dims(w)[2:]))
    strides, dilations, begin, _, in_sz, out_sz = _geometry(b, n, x, n.outputs[0], kernel)

    def d_x():
        return transposed_conv(b, gy[0], w, group=int(n.attrs.get("group", 1)), strides=strides,
                               dilations=dilations, begin=begin, in_sz=in_sz, out_sz=out_sz, kernel=kernel)
    return (d_x, None, None)


@rule("ConvTranspose")
def _conv_transpose(b, n, gy):
    """The adjoint of ConvTranspose is Conv with the same weights over gy padded back to the full size."""
    x, w, y = n.inputs[0], n.inputs[1], n.outputs[0]
    nd = len(b.shape(x)) - 2
    kernel = list(n.attrs.get("kernel_shape", b.static_dims(w)[2:]))
    strides = list(n.attrs.get("strides", [1] * nd))
    dilations = list(n.attrs.get("dilations", [1] * nd))
    in_sz, out_sz = b.static_dims(x, range(2, 2 + nd)), b.static_dims(y, range(2, 2 + nd))
    out_pad = list(n.attrs.get("output_padding", [0] * nd))
    full = [(in_sz[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 + out_pad[i] for i in range(nd)]
    auto = n.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if "pads" in n.attrs and auto in ("NOTSET", ""):
        pads = list(n.attrs["pads"])
        begin, end = pads[:nd], pads[nd:]
    else:
        total = [full[i] - out_sz[i] for i in range(nd)]
        if auto == "SAME_LOWER":
            begin = [t - t // 2 for t in total]
        elif auto == "SAME_UPPER" or "output_shape" in n.attrs:
            begin = [t // 2 for t in total]
        else:
            begin = [0] * nd
        end = [t - s for t, s in zip(total, begin)]

    def d_x():
        g = gy[0]
        if any(p < 0 for p in begin + end):
            raise b.error("has negative pads; not supported")
        # Conv output size: floor((full - ((k-1)d + 1)) / s) + 1 = in_sz (out_pad < stride)
        return b.op("Conv", g, w, group=int(n.attrs.get("group", 1)), strides=strides, dilations=dilations,
                    pads=list(begin) + list(end))
    return (d_x, None, None)


@rule("GlobalAveragePool")
def _global_average_pool(b, n, gy):
    x = n.inputs[0]
    area = int(np.prod(b.static_dims(x, range(2, len(b.shape(x))))))
    return (lambda: b.op("Expand", b.op("Mul", gy[0], 1.0 / area), b.shape_of(x)),)


@rule("GlobalMaxPool")
def _global_max_pool(b, n, gy):
    """To the maximal element(s), split evenly on ties."""
    x, y = n.inputs[0], n.outputs[0]

    def grad():
        hit = b.mask(b.op("Equal", x, y))
        ties = b.reduce("ReduceSum", hit, list(range(2, len(b.shape(x)))), keepdims=True)
        return b.op("Mul", hit, b.op("Div", gy[0], ties))
    return (grad,)


@rule("MaxPool")
def _max_pool(b, n, gy):
    """Scatter-add gy to the argmax positions that the forward MaxPool reports in its Indices output."""
    x = n.inputs[0]
    if b.opset < 16:
        raise b.error("needs ScatterElements with reduction='add' (opset 16+) for its gradient")
    if int(n.attrs.get("storage_order", 0)) != 0:
        raise b.error("uses storage_order=1; not supported")

    def grad():
        if len(n.outputs) < 2 or not n.outputs[1].name:
            # Ask the forward node for its argmax: same values, one more output.
            idx = gs.Variable(f"{n.outputs[0].name}__onnxcam_argmax", dtype=np.int64)
            if len(n.outputs) < 2:
                n.outputs.append(idx)
            else:
                n.outputs[1] = idx
        flat = b.ints([-1])
        zeros = b.op("Reshape", b.zeros_like(x), flat)
        g = b.op("ScatterElements", zeros, b.op("Reshape", n.outputs[1], flat), b.op("Reshape", gy[0], flat),
                 axis=0, reduction="add")
        return b.reshape_like(g, x)
    return (grad,)


@rule("AveragePool")
def _average_pool(b, n, gy):
    """y = S(x) * f, S the window sum over real (unpadded) elements and f = AveragePool(ones) / count(real).

    f is measured from the op itself at build time, so count_include_pad and ceil_mode follow the runtime
    exactly; the gradient is the transposed window sum of gy * f, a depthwise ConvTranspose with ones.
    """
    x, y = n.inputs[0], n.outputs[0]
    kernel = list(n.attrs["kernel_shape"])
    strides, dilations, begin, end, in_sz, out_sz = _geometry(b, n, x, y, kernel)
    channels = b.static_dims(x, [1])[0]

    def grad():
        ones = np.ones((1, 1) + tuple(in_sz), np.float32)
        averaged = run_single_node(n, [ones], b.opset)[0]
        count = np.ones((1, 1) + tuple(out_sz), np.float64)
        for i in range(len(kernel)):
            o = np.arange(out_sz[i])[:, None] * strides[i] - begin[i] + np.arange(kernel[i])[None, :] * dilations[i]
            real = ((o >= 0) & (o < in_sz[i])).sum(axis=1).astype(np.float64)
            shape = [1] * (2 + len(kernel))
            shape[2 + i] = out_sz[i]
            count = count * real.reshape(shape)
        factor = np.where(count > 0, averaged / np.maximum(count, 1), 0.0)
        weight = b.const(np.ones((channels, 1) + tuple(kernel), b.dtype))
        return transposed_conv(b, b.op("Mul", gy[0], b.const(factor.astype(b.dtype))), weight, group=channels,
                               strides=strides, dilations=dilations, begin=begin, in_sz=in_sz, out_sz=out_sz,
                               kernel=kernel)
    return (grad,)


def run_single_node(node: gs.Node, inputs: list[np.ndarray], opset: int) -> list[np.ndarray]:
    """Run one copy of a forward node with onnxruntime on CPU: measures an op's exact runtime semantics."""
    import onnx
    from ...runtime import cpu_session

    names = [f"in{i}" for i in range(len(inputs))]
    attrs = {k: (onnx.numpy_helper.from_array(np.asarray(v.values)) if isinstance(v, gs.Constant) else v)
             for k, v in node.attrs.items()}
    proto_node = onnx.helper.make_node(node.op, names, ["out"], **attrs)
    dtype = onnx.helper.np_dtype_to_tensor_dtype(inputs[0].dtype)
    graph = onnx.helper.make_graph(
        [proto_node], "measure",
        [onnx.helper.make_tensor_value_info(nm, onnx.helper.np_dtype_to_tensor_dtype(v.dtype), v.shape)
         for nm, v in zip(names, inputs)],
        [onnx.helper.make_tensor_value_info("out", dtype, None)])
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
    model.ir_version = 8
    return cpu_session(model.SerializeToString()).run(None, dict(zip(names, inputs)))
