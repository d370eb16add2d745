"""Fine-tuning at a new resolution (paper Sec. 3.2): position embeddings resampled on their 2-D grid.

The patch size stays, so a larger image gives a longer sequence; learned position embeddings
are 2-D interpolated "according to their location in the original image" and the class-token
slot is kept. "linear" is the official method (scipy.ndimage.zoom(order=1), corners aligned);
"bilinear", "bicubic" (half-pixel centres, torch's F.interpolate with align_corners=False),
"nearest" (half-pixel centres: torch's "nearest-exact", not its legacy "nearest", which
samples floor(i * n_in / n_out)) and "bicubic_antialias" (torch's bicubic with antialias=True, what timm >= 1.0's
resample_abs_pos_embed does: the default for timm checkpoints) are offered too. Every
pos_embedding kind resizes: "learned" (the grid), "learned_2d" (rows and columns), "relative"
(the (2gh-1) x (2gw-1) table of offsets; its prefix slot is kept), "sincos2d" and "none"
(nothing learned: rebuilt for the new grid).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np

METHODS = ("linear", "bilinear", "bicubic", "nearest", "bicubic_antialias")


def check_method(method: str) -> str:
    """`method` if it is one of METHODS, else ValueError naming the allowed ones."""
    if method not in METHODS:
        raise ValueError(f"interpolation method {method!r} is not supported; allowed: {', '.join(METHODS)}")
    return method


def _cubic(t: np.ndarray, a: float = -0.75) -> np.ndarray:
    t = np.abs(t)
    return np.where(t <= 1, ((a + 2) * t - (a + 3)) * t * t + 1,
                    np.where(t < 2, ((a * t - 5 * a) * t + 8 * a) * t - 4 * a, 0.0))


def _antialiased_cubic(n_in: int, n_out: int) -> np.ndarray:
    """torch's separable antialiased bicubic (PIL's): the cubic with a = -0.5, centred at
    s * (i + 0.5) (s = n_in / n_out), stretched by max(s, 1), on the input samples only, each row
    renormalised to sum 1. Dense: the cubic is zero outside torch's support, so no bounds are needed."""
    scale = n_in / n_out
    stretch = max(scale, 1.0)
    centre = scale * (np.arange(n_out, dtype=np.float64) + 0.5)
    w = _cubic((np.arange(n_in, dtype=np.float64)[None, :] + 0.5 - centre[:, None]) / stretch, a=-0.5)
    return w / w.sum(axis=1, keepdims=True)


def interpolation_matrix(n_in: int, n_out: int, method: str = "linear") -> np.ndarray:
    """(n_out, n_in) matrix W so that W @ x resamples x along its first axis from n_in to n_out."""
    check_method(method)
    w = np.zeros((n_out, n_in), np.float64)
    i = np.arange(n_out, dtype=np.float64)
    if method == "linear":  # scipy.ndimage.zoom(order=1): first and last samples aligned
        src = i * (n_in - 1) / (n_out - 1) if n_out > 1 else np.zeros(1)
    else:  # half-pixel centres
        src = (i + 0.5) * n_in / n_out - 0.5
    if method == "bicubic_antialias":
        return _antialiased_cubic(n_in, n_out)
    if method == "nearest":
        idx = np.clip(np.floor(src + 0.5), 0, n_in - 1).astype(int)
        w[np.arange(n_out), idx] = 1.0
        return w
    if method == "bicubic":
        base = np.floor(src)
        for off in (-1, 0, 1, 2):
            tap = base + off
            np.add.at(w, (np.arange(n_out), np.clip(tap, 0, n_in - 1).astype(int)), _cubic(src - tap))
        return w
    src = np.clip(src, 0, n_in - 1)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, n_in - 1)
    frac = src - lo
    np.add.at(w, (np.arange(n_out), lo), 1.0 - frac)
    np.add.at(w, (np.arange(n_out), hi), frac)
    return w


def resample_grid(grid: np.ndarray, new_size: Sequence[int], method: str = "linear") -> np.ndarray:
    """Resample a (gh, gw, ...) array to (new_h, new_w, ...) separably along its first two axes."""
    grid = np.asarray(grid)
    gh, gw = grid.shape[:2]
    nh, nw = (int(s) for s in new_size)
    if (gh, gw) == (nh, nw):
        return grid
    flat = grid.reshape(gh, gw, -1).astype(np.float64)
    out = np.einsum("ai,bj,ijd->abd", interpolation_matrix(gh, nh, method),
                    interpolation_matrix(gw, nw, method), flat)
    return out.reshape((nh, nw) + grid.shape[2:]).astype(grid.dtype)


def resample_1d(x: np.ndarray, new_len: int, method: str = "linear") -> np.ndarray:
    """Resample (n, ...) to (new_len, ...) along the first axis (learned_2d rows / columns)."""
    x = np.asarray(x)
    if x.shape[0] == new_len:
        return x
    out = interpolation_matrix(x.shape[0], new_len, method) @ x.reshape(x.shape[0], -1).astype(np.float64)
    return out.reshape((new_len,) + x.shape[1:]).astype(x.dtype)


def infer_grid(num_tokens: int, like: Sequence[int] = (1, 1)) -> Tuple[int, int]:
    """(gh, gw) with gh * gw = num_tokens, square when possible, else the aspect ratio closest to `like`."""
    r = math.isqrt(num_tokens)
    if r * r == num_tokens:
        return r, r
    target = like[0] / like[1]
    pairs = [(h, num_tokens // h) for h in range(1, num_tokens + 1) if num_tokens % h == 0]
    return min(pairs, key=lambda p: abs(math.log(p[0] / p[1] / target)))


def resample_position_embeddings(posemb: np.ndarray, new_grid: Sequence[int], num_prefix_tokens: int = 1,
                                 old_grid: Optional[Sequence[int]] = None, method: str = "linear") -> np.ndarray:
    """Resample learned 1-D position embeddings (1, prefix + gh*gw, D) to a new (gh', gw') grid.

    The first `num_prefix_tokens` slots (the class token's) are kept as they are; the rest is
    reshaped to its 2-D grid (`old_grid`, inferred when omitted) and interpolated.
    """
    check_method(method)
    posemb = np.asarray(posemb)
    squeeze = posemb.ndim == 2
    pe = posemb[None] if squeeze else posemb
    if pe.ndim != 3 or pe.shape[0] != 1:
        raise ValueError(f"position embeddings must have shape (1, tokens, D), got {posemb.shape}")
    n = pe.shape[1] - num_prefix_tokens
    if n < 1:
        raise ValueError(f"position embeddings with {pe.shape[1]} tokens have no grid after {num_prefix_tokens} prefix token(s)")
    gh, gw = tuple(old_grid) if old_grid is not None else infer_grid(n, new_grid)
    if gh * gw != n:
        raise ValueError(f"old_grid {gh}x{gw} does not match the {n} grid tokens of the position embeddings")
    grid = resample_grid(pe[0, num_prefix_tokens:].reshape(gh, gw, -1), new_grid, method)
    out = np.concatenate([pe[:, :num_prefix_tokens], grid.reshape(1, -1, pe.shape[-1])], axis=1)
    return out[0] if squeeze else out


def relative_table_grid(num_offsets: int, like: Sequence[int] = (1, 1)) -> Tuple[int, int]:
    """The patch grid (gh, gw) whose relative-offset table has (2gh-1)(2gw-1) = num_offsets entries."""
    th, tw = infer_grid(num_offsets, (2 * like[0] - 1, 2 * like[1] - 1))
    if th % 2 == 0 or tw % 2 == 0:
        odd = [(h, num_offsets // h) for h in range(1, num_offsets + 1, 2)
               if num_offsets % h == 0 and (num_offsets // h) % 2]
        if not odd:
            raise ValueError(f"{num_offsets} relative offsets is not (2gh-1)*(2gw-1) for any grid")
        target = (2 * like[0] - 1) / (2 * like[1] - 1)
        th, tw = min(odd, key=lambda p: abs(math.log(p[0] / p[1] / target)))
    return (th + 1) // 2, (tw + 1) // 2


def resample_relative_embedding(table: np.ndarray, new_grid: Sequence[int], num_prefix_tokens: int = 1,
                                old_grid: Optional[Sequence[int]] = None, method: str = "linear") -> np.ndarray:
    """Resample a relative-position table ((2gh-1)(2gw-1) + prefix slot, heads, head_dim) to a
    new patch grid; the offsets form a (2gh-1, 2gw-1) grid, the trailing prefix slot is kept."""
    table = np.asarray(table)
    extra = 1 if num_prefix_tokens else 0
    n = table.shape[0] - extra
    gh, gw = tuple(old_grid) if old_grid is not None else relative_table_grid(n, new_grid)
    if (2 * gh - 1) * (2 * gw - 1) != n:
        raise ValueError(f"relative table of {table.shape[0]} rows does not fit grid {gh}x{gw}")
    nh, nw = (int(g) for g in new_grid)
    grid = table[:n].reshape((2 * gh - 1, 2 * gw - 1) + table.shape[1:])
    grid = resample_grid(grid, (2 * nh - 1, 2 * nw - 1), method)
    return np.concatenate([grid.reshape((-1,) + table.shape[1:]), table[n:]], axis=0)


__all__ = ["METHODS", "interpolation_matrix", "resample_grid", "resample_1d", "infer_grid",
           "resample_position_embeddings", "resample_relative_embedding", "relative_table_grid"]
