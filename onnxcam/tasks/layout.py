"""Token layouts of vision transformers turned into (N, C, h, w) maps.

Recognised: (N, P + h*w, C) with P prefix tokens (a class token, a class and a distillation token: ViT, DeiT)
and sequence-first (P + h*w, N, C) tensors (exporters' attention inputs). The grid is the input's size divided by
one patch size; the prefix tokens are dropped (pytorch-grad-cam's vit reshape_transform does the same). (N, H, W, C)
blocks (Swin, MaxViT) are 4-D and already handled as channels-last maps by the CAM classes.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..errors import InputError

log = logging.getLogger(__name__)

MAX_PREFIX = 2  # class token, distillation token


@dataclass(frozen=True)
class TokenGrid:
    """How a token axis of length prefix + h * w lays out on the input: the patch grid (h, w) and its stride."""

    prefix: int
    h: int
    w: int
    patch: int


def token_grid(tokens: int, input_hw: tuple[int, int], patch: int | None = None) -> TokenGrid | None:
    """The grid whose h*w plus 0-2 prefix tokens make `tokens`, with h = H / patch and w = W / patch exactly;
    None when no patch size fits. The fewest prefix tokens win (a grid is never read into a class token)."""
    height, width = input_hw
    sizes = [patch] if patch else range(2, max(height, width) + 1)
    for prefix in range(MAX_PREFIX + 1):
        for p in sizes:
            if height % p == 0 and width % p == 0 and (height // p) * (width // p) == tokens - prefix:
                return TokenGrid(prefix, height // p, width // p, p)
    return None


def tokens_to_maps(a: np.ndarray, g: np.ndarray, input_hw: tuple[int, int], batch: int,
                   patch: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Activations and gradients of a 3-D token tensor as (N, C, h, w) maps.

    (N, T, C) when the first axis is the batch, else (T, N, C) sequence-first; T = prefix + h * w tokens on the
    input's (H, W) grid. Raises InputError naming the shape when no grid fits (give a reshape_transform)."""
    if a.ndim != 3:
        raise InputError(f"a token layout is 3-D (N, tokens, C) or (tokens, N, C); this activation is {a.shape}")
    if a.shape[0] == batch and token_grid(a.shape[1], input_hw, patch):
        tokens_first = False
    elif a.shape[1] == batch and token_grid(a.shape[0], input_hw, patch):
        tokens_first = True
    else:
        raise InputError(f"activation of shape {a.shape} is no token layout of a {input_hw[0]}x{input_hw[1]} input "
                         f"(batch {batch}): neither (N, tokens, C) nor (tokens, N, C) with up to {MAX_PREFIX} prefix "
                         "tokens and a square patch grid; give a reshape_transform")
    if tokens_first:
        a, g = a.transpose(1, 0, 2), g.transpose(1, 0, 2)
    grid = token_grid(a.shape[1], input_hw, patch)
    log.debug("token layout %s: %d prefix tokens, %dx%d grid of %d px patches%s", a.shape, grid.prefix, grid.h,
              grid.w, grid.patch, " (sequence-first)" if tokens_first else "")
    return _grid(a, grid), _grid(g, grid)


def _grid(t: np.ndarray, grid: TokenGrid) -> np.ndarray:
    n, _, c = t.shape
    return t[:, grid.prefix:].reshape(n, grid.h, grid.w, c).transpose(0, 3, 1, 2)
