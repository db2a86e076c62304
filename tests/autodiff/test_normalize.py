"""Numerical checks of onnxcam/autodiff/rules/normalize.py, with respect to the data and the parameters."""

import numpy as np
import pytest

from onnxcam.errors import UnsupportedOpError

from . import gradcheck
from .gradcheck import Case, check_case, onnxcam_gradients

rng = np.random.default_rng(5)
X4 = rng.standard_normal((2, 3, 4, 5))
X3 = rng.standard_normal((2, 3, 5))
X2 = rng.standard_normal((4, 3))
C = 3


def _bn_params(c=C):
    return {"scale": rng.uniform(0.5, 1.5, c), "B": rng.standard_normal(c), "mean": rng.standard_normal(c),
            "var": rng.uniform(0.5, 2.0, c)}


BN_ALL = ["x", "scale", "B", "mean", "var"]
LN_X = rng.standard_normal((2, 3, 4))

CASES = [
    Case("BatchNormalization", {"x": X4, **_bn_params()}, BN_ALL, {"epsilon": 1e-3}, opset=15, id="BN-4d-15-all"),
    Case("BatchNormalization", {"x": X2, **_bn_params()}, BN_ALL, opset=9, id="BN-2d-9-all-numpy"),
    Case("BatchNormalization", {"x": X3, **_bn_params()}, BN_ALL, opset=7, id="BN-3d-7-numpy"),
    Case("BatchNormalization", {"x": X4, **_bn_params()}, ["x", "mean"], {"training_mode": 0}, opset=14,
         id="BN-4d-14-x-mean"),
    Case("InstanceNormalization", {"x": X4, "scale": rng.uniform(0.5, 1.5, C), "B": rng.standard_normal(C)},
         ["x", "scale", "B"], {"epsilon": 1e-3}, opset=9, id="IN-4d-9-all"),
    Case("InstanceNormalization", {"x": X3, "scale": rng.uniform(0.5, 1.5, C), "B": rng.standard_normal(C)},
         ["x"], opset=17, id="IN-3d-x"),
    Case("LayerNormalization", {"x": LN_X, "scale": rng.uniform(0.5, 1.5, 4), "B": rng.standard_normal(4)},
         ["x", "scale", "B"], id="LN-last-axis-all"),
    Case("LayerNormalization", {"x": LN_X, "scale": rng.uniform(0.5, 1.5, (3, 4)), "B": rng.standard_normal((3, 4))},
         ["x", "scale", "B"], {"axis": 1, "epsilon": 1e-2}, id="LN-axis1-all"),
    Case("LayerNormalization", {"x": LN_X, "scale": rng.uniform(0.5, 1.5, (3, 4))}, ["x", "scale"], {"axis": -2},
         opset=18, id="LN-neg-axis-no-bias"),
    Case("LayerNormalization", {"x": LN_X, "scale": rng.uniform(0.5, 1.5, (1, 4)), "B": rng.standard_normal(4)},
         ["x", "scale", "B"], {"axis": -2}, opset=17, id="LN-broadcast-params"),
    Case("LayerNormalization", {"x": LN_X, "scale": rng.uniform(0.5, 1.5, (2, 3, 4))}, ["x"], {"axis": 0},
         n_outputs=3, id="LN-axis0-three-outputs"),
]


def _bn_numpy(case, feeds):
    """Inference BatchNormalization in float64. onnx's reference evaluator (1.23) computes batch statistics for
    opsets 7-13 (it reads the is_test/momentum defaults as training), while the spec and onnxruntime do not."""
    f = {**{k: np.asarray(v, np.float64) for k, v in case.inputs.items()}, **feeds}
    per_channel = (-1,) + (1,) * (f["x"].ndim - 2)
    mean, var, scale, bias = (f[k].reshape(per_channel) for k in ("mean", "var", "scale", "B"))
    return scale * (f["x"] - mean) / np.sqrt(var + case.attrs.get("epsilon", 1e-5)) + bias


@pytest.mark.parametrize("case", CASES, ids=str)
def test_rule(case, monkeypatch):
    if case.id.endswith("-numpy"):
        monkeypatch.setattr(gradcheck, "_reference", _bn_numpy)
    check_case(case)


@pytest.mark.parametrize("case, message", [
    (Case("LayerNormalization", {"x": LN_X, "scale": np.ones(4)}, ["x"], n_outputs=3, score_output=2), "InvStdDev"),
    (Case("BatchNormalization", {"x": X4, **_bn_params()}, ["x"], {"training_mode": 1}, opset=15, n_outputs=3),
     "training mode"),
], ids=str)
def test_refused(case, message):
    with pytest.raises(UnsupportedOpError, match=message):
        onnxcam_gradients(case, np.ones((2, 1, 1)))
