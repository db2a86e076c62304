"""pytorch-grad-cam 1.5.7's perturbation metrics: the change of each sample's target score when its input is
perturbed according to its map. All perturbed copies of a call (every percentile of an average, both ROAD orders)
are scored in one batched pass through onnxruntime, after the unperturbed batch."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from ..errors import InputError
from ._scoring import UsesModel, as_cams, as_input, target_list, target_scores

log = logging.getLogger(__name__)

# (one input (C, H, W), its map (H, W)) -> the perturbed input
Perturbation = Callable[[np.ndarray, np.ndarray], np.ndarray]


class PerturbationConfidenceMetric(UsesModel):
    """target(model(perturbed input)) - target(model(input)) per sample (return_diff=False: the first term only).

    model: an onnxcam Explainer, a path, bytes, an onnx.ModelProto or a CAM object; the metric keeps the session
    of the last model it ran. targets: one per sample (onnxcam's or pytorch-grad-cam's target classes), or None for
    each sample's top class."""

    def __init__(self, perturbation: Perturbation):
        self.perturbation = perturbation

    def perturb(self, x: np.ndarray, cams: np.ndarray) -> np.ndarray:
        """Each sample perturbed by its map, in batch order."""
        return np.stack([self.perturbation(x[i], cams[i]) for i in range(len(x))]).astype(np.float32, copy=False)

    def __call__(self, input_tensor, cams, targets, model, return_visualization: bool = False,
                 return_diff: bool = True):
        x = as_input(input_tensor)
        cams = as_cams(cams, x)
        perturbed = self.perturb(x, cams)
        scores, after = confidence_scores(self.scorer_for(model), x, targets, [perturbed])
        result = after[0] - scores if return_diff else after[0]
        return (result, perturbed) if return_visualization else result


def perturb_all(metrics: list[PerturbationConfidenceMetric], x: np.ndarray, cams: np.ndarray) -> list[np.ndarray]:
    """Each metric's perturbed batch, in order. A perturbation made of a costly deterministic part and a cheap random
    one (ROAD's: a sparse solve, then noise) runs the first for every (metric, sample) on a thread pool (SuperLU and
    numpy release the GIL) and draws the noise afterwards in the sequential order: equal to a sequential run."""
    parts = [m.perturbation for m in metrics]
    jobs = [(p, i) for p in parts for i in range(len(x))]
    if len(jobs) < 2 or not all(getattr(p, "staged", False) for p in parts):
        return [m.perturb(x, cams) for m in metrics]
    with ThreadPoolExecutor(min(len(jobs), os.cpu_count() or 1)) as pool:
        # the largest holes first (a solve's cost grows with the pixels removed): the threads end together
        futures = {k: pool.submit(p.prepare, x[i], cams[i])
                   for k, (p, i) in sorted(enumerate(jobs), key=lambda job: -_removed_share(job[1][0]))}
        prepared = [futures[k].result() for k in range(len(jobs))]
    done = iter([p.finish(state) for (p, _), state in zip(jobs, prepared)])  # the noise, in job order
    return [np.stack([next(done) for _ in range(len(x))]).astype(np.float32, copy=False) for _ in metrics]


def _removed_share(perturbation) -> float:
    """The share of pixels a percentile perturbation removes (100 - percentile: it keeps the pixels below the
    percentile), i.e. its solve's size, for scheduling."""
    return 100 - getattr(perturbation, "percentile", 50.0)


def confidence_scores(run, x: np.ndarray, targets, perturbed: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """(scores of x (N,), scores of each perturbed batch (M, N)): one pass over x and every perturbed copy."""
    outputs = run(np.concatenate([x, *perturbed]))
    targets = target_list(targets, outputs[:len(x)])
    scores = target_scores(targets, outputs)
    return scores[:len(x)], scores[len(x):].reshape(len(perturbed), len(x), *scores.shape[1:])


class RemoveMostRelevantFirst:
    """Removes (imputes) the pixels whose map value is at or above the map's `percentile`-th percentile."""

    def __init__(self, percentile: float, imputer: Perturbation):
        self.percentile = check_percentile(percentile)
        self.imputer = imputer

    def __call__(self, input_tensor: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return self.imputer(input_tensor, self.kept(mask))

    def kept(self, mask: np.ndarray) -> np.ndarray:
        """1 where a pixel is kept, 0 where it is removed."""
        return np.float32(mask < np.percentile(mask, self.percentile))

    @property
    def staged(self) -> bool:
        """Whether the imputer splits into prepare (deterministic) and finish (random): see perturb_all."""
        return hasattr(self.imputer, "prepare") and hasattr(self.imputer, "finish")

    def prepare(self, input_tensor: np.ndarray, mask: np.ndarray):
        return self.imputer.prepare(input_tensor, self.kept(mask))

    def finish(self, state) -> np.ndarray:
        return self.imputer.finish(state)


class RemoveLeastRelevantFirst(RemoveMostRelevantFirst):
    """Removes the pixels whose map value is at or below the map's (100 - percentile)-th percentile."""

    def kept(self, mask: np.ndarray) -> np.ndarray:
        return super().kept(1 - mask)


class AveragerAcrossThresholds(UsesModel):
    """The mean over percentiles of metric(percentile) (a class taking the percentile), scored in one pass."""

    def __init__(self, imputer: Callable[[float], PerturbationConfidenceMetric],
                 percentiles: Sequence[float] = (10, 20, 30, 40, 50, 60, 70, 80, 90)):
        self.imputer = imputer
        self.percentiles = check_percentiles(percentiles)

    def metrics(self) -> list[PerturbationConfidenceMetric]:
        return [self.imputer(p) for p in self.percentiles]

    def __call__(self, input_tensor, cams, targets, model) -> np.ndarray:
        x = as_input(input_tensor)
        cams = as_cams(cams, x)
        scores, after = confidence_scores(self.scorer_for(model), x, targets,
                                          perturb_all(self.metrics(), x, cams))
        return np.mean(np.float32(after - scores), axis=0)


def check_percentile(p) -> float:
    if isinstance(p, (str, bool)) or not np.isscalar(p) or not 0 <= float(p) <= 100:
        raise InputError(f"a percentile must be a number in [0, 100], not {p!r} (Otsu's 'auto' threshold is not "
                         "supported)")
    return float(p)


def check_percentiles(percentiles) -> list[float]:
    percentiles = [check_percentile(p) for p in percentiles]
    if not percentiles:
        raise InputError("percentiles is empty: give at least one percentile to perturb at")
    return percentiles
