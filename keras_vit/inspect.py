"""Inspecting a ViT (paper Section 4.5, Figure 7): what the model learned, as arrays and figures.

- `attention_maps`: per layer, per head attention probabilities (any variant, hybrid,
  classifier, image size);
- `attention_rollout`: Abnar & Zuidema (2020) rollout with the residual term, a map over the
  image of what the output token attends to;
- `mean_attention_distance`: per layer and head, the attention-weighted query-key distance in
  pixels (Fig. 7 right);
- `position_embedding_similarity`: cosine similarity of every patch's position embedding with
  all others (Fig. 7 centre);
- `embedding_filters`: top principal components of the patch-embedding filters (Fig. 7 left).

The `plot_*` writers turn each into a PNG (matplotlib, Agg backend). Model code uses
keras.ops only; the analysis of the returned arrays is numpy.
"""
from __future__ import annotations

import os
from typing import Any, Dict, List, Optional, Sequence, Tuple

import keras
import numpy as np

from keras_vit.files import atomic_path
from keras_vit.model import get_config
from keras_vit.plots import pyplot, save_figure

__all__ = [
    "attention_maps", "attention_rollout", "rollout_from_attention", "mean_attention_distance",
    "attention_distance_from_probs", "patch_distances", "position_embedding_similarity",
    "embedding_filters", "upsample_map", "plot_attention_rollout", "plot_attention_maps",
    "plot_attention_distance", "plot_position_embedding_similarity", "plot_embedding_filters",
]


# --- model geometry ------------------------------------------------------------------------
def _num_prefix_tokens(model) -> int:
    """Tokens before the patches in the sequence (class, distillation, registers)."""
    return get_config(model).num_prefix_tokens


def _reads_class_token(model) -> bool:
    """Whether the output is read from the class token (token 0), else from all patch tokens."""
    return get_config(model).classifier == "token"


def _check_images(model, images) -> np.ndarray:
    """(B, H, W, C) float32 images the model takes: its input size, or for a dynamic-size model
    any H x W divisible by its input stride (any H >= sh, W >= sw with patch_remainder='drop'); a
    single (H, W, C) image is batched."""
    cfg = get_config(model)
    x = np.asarray(images, dtype=np.float32)
    if x.ndim == 3:
        x = x[None]
    if x.ndim == 4 and len(x) == 0:
        raise ValueError(f"no images (shape {x.shape}): give at least one")
    if cfg.dynamic_size:
        sh, sw = cfg.input_stride
        exact = cfg.patch_remainder != "drop"
        if (x.ndim != 4 or x.shape[-1] != cfg.channels or (exact and (x.shape[1] % sh or x.shape[2] % sw))
                or x.shape[1] < sh or x.shape[2] < sw):
            allowed = (f"H a multiple of {sh} and W a multiple of {sw}" if exact
                       else f"H >= {sh} and W >= {sw}")
            raise ValueError(f"images must have shape (batch, H, W, {cfg.channels}) with {allowed} for this "
                             f"model, got {tuple(np.shape(images))}")
        return x
    expected = (*cfg.image_size, cfg.channels)
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise ValueError(f"images must have shape (batch, {expected[0]}, {expected[1]}, {expected[2]}) "
                         f"for this model, got {tuple(np.shape(images))}")
    return x


def _grid(model, images: np.ndarray) -> Tuple[int, int]:
    """The patch grid (gh, gw) of checked images."""
    sh, sw = get_config(model).input_stride
    return images.shape[1] // sh, images.shape[2] // sw


# --- attention probabilities ------------------------------------------------------------------
def attention_maps(model, images, batch_size: int = 32) -> List[np.ndarray]:
    """Attention probabilities of every encoder block: a list (one per layer) of float32 arrays
    (B, heads, S, S), S = prefix tokens (class, distillation, registers) + patches; rows sum to 1.

    Read from the model's own intermediate outputs (`model.forward_intermediates(images,
    attention=True)`), so it works for every keras-vit model: any variant, hybrid, classifier,
    image size (dynamic-size models take any multiple of the patch size), and models loaded
    from .keras files. A feature_layers model has blocks up to its last feature block.
    """
    x_all = _check_images(model, images)
    _check_batch_size(batch_size)
    per_layer: List[List[np.ndarray]] = []
    for start in range(0, len(x_all), batch_size):
        x = keras.ops.convert_to_tensor(x_all[start:start + batch_size])
        probs = model.forward_intermediates(x, attention=True)["attention"]
        per_layer = per_layer or [[] for _ in probs]
        for k, p in enumerate(probs):
            per_layer[k].append(keras.ops.convert_to_numpy(p).astype(np.float32))
    return [np.concatenate(p, axis=0) for p in per_layer]


def _check_batch_size(batch_size) -> None:
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")


def rollout_from_attention(attentions: Sequence[np.ndarray], num_prefix_tokens: int = 1,
                           head_fusion: str = "mean", class_token: Optional[bool] = None) -> np.ndarray:
    """Attention rollout (Abnar & Zuidema 2020) from per-layer probabilities (B, heads, S, S).

    Heads are fused (mean, or max), the residual connection is accounted for as
    A' = (A + I) / 2 (rows renormalised), and the layers are multiplied from the input up:
    R = A'_L ... A'_1. The output token's row of R over the patch tokens (the class token's
    row when `class_token`, by default when there are prefix tokens; else, for "gap" and "map"
    models, the mean of the patch rows) is returned, normalised to sum to 1: (B, N) with N
    patches in row-major order; the `num_prefix_tokens` first tokens are not patches.
    """
    if head_fusion not in ("mean", "max"):
        raise ValueError(f"head_fusion must be 'mean' or 'max', got {head_fusion!r}")
    rollout = None
    for a in attentions:
        a = np.asarray(a, dtype=np.float64)
        fused = a.mean(axis=1) if head_fusion == "mean" else a.max(axis=1)  # (B, S, S)
        s = fused.shape[-1]
        fused = 0.5 * fused + 0.5 * np.eye(s)[None]
        fused = fused / fused.sum(axis=-1, keepdims=True)
        rollout = fused if rollout is None else fused @ rollout
    if rollout is None:
        raise ValueError("attentions is empty")
    p = num_prefix_tokens
    class_token = p > 0 if class_token is None else class_token
    out = rollout[:, 0, p:] if class_token else rollout[:, p:, p:].mean(axis=1)
    out = out / np.maximum(out.sum(axis=-1, keepdims=True), 1e-12)
    return out.astype(np.float32)


def attention_rollout(model, images, head_fusion: str = "mean", batch_size: int = 32) -> np.ndarray:
    """Rollout map of what the output attends to, over the patch grid: (B, gh, gw), sums to 1.

    Use `upsample_map` (or `plot_attention_rollout`) to overlay it on the input image.
    """
    x = _check_images(model, images)
    maps = rollout_from_attention(attention_maps(model, x, batch_size), _num_prefix_tokens(model), head_fusion,
                                  _reads_class_token(model))
    return maps.reshape((-1, *_grid(model, x)))


def upsample_map(grid_map: np.ndarray, image_size: Tuple[int, int],
                 stride: Optional[Tuple[int, int]] = None) -> np.ndarray:
    """Nearest-neighbour upsampling of a (gh, gw) patch map to (H, W) pixels, for overlays. With the
    model's `stride` (pixels per patch) each patch covers its own pixels and those past the last
    whole patch (patch_remainder='drop') get 0; without it the map is stretched over the image."""
    gh, gw = grid_map.shape
    h, w = image_size
    if stride is None:
        rows = np.minimum((np.arange(h) * gh) // h, gh - 1)
        cols = np.minimum((np.arange(w) * gw) // w, gw - 1)
        return grid_map[rows][:, cols]
    sh, sw = stride
    out = np.zeros((h, w), dtype=grid_map.dtype)
    ch, cw = min(h, gh * sh), min(w, gw * sw)
    out[:ch, :cw] = grid_map[np.arange(ch) // sh][:, np.arange(cw) // sw]
    return out


# --- attention distance -------------------------------------------------------------------------
def patch_distances(grid_size: Tuple[int, int], stride: Tuple[int, int]) -> np.ndarray:
    """(N, N) Euclidean distances in pixels between patch centres (row-major patches)."""
    gh, gw = grid_size
    y, x = np.mgrid[:gh, :gw]
    y = y.reshape(-1) * float(stride[0])
    x = x.reshape(-1) * float(stride[1])
    return np.sqrt((y[:, None] - y[None, :]) ** 2 + (x[:, None] - x[None, :]) ** 2)


def attention_distance_from_probs(probs: np.ndarray, grid_size: Tuple[int, int], stride: Tuple[int, int],
                                  num_prefix_tokens: int = 1) -> np.ndarray:
    """Mean attention distance per head, (heads,), from one layer's probabilities (B, heads, S, S).

    Only patch-to-patch attention has a distance: the prefix tokens' rows and columns are dropped
    and each query's attention over the patches is renormalised before weighting the pixel
    distances; the result is averaged over query patches and images.
    """
    return (_distance_sums(probs, grid_size, stride, num_prefix_tokens) / len(probs)).astype(np.float32)


def _distance_sums(probs: np.ndarray, grid_size: Tuple[int, int], stride: Tuple[int, int],
                   num_prefix_tokens: int) -> np.ndarray:
    """`attention_distance_from_probs` summed over the images instead of averaged, in float64: (heads,)."""
    p = num_prefix_tokens
    a = np.asarray(probs, dtype=np.float64)[:, :, p:, p:]
    a = a / np.maximum(a.sum(axis=-1, keepdims=True), 1e-12)
    dist = patch_distances(grid_size, stride)
    if a.shape[-1] != dist.shape[0]:
        raise ValueError(f"attention over {a.shape[-1]} patches does not match the grid {grid_size}")
    per_query = (a * dist[None, None]).sum(axis=-1)  # (B, heads, N)
    return per_query.mean(axis=2).sum(axis=0)


def _layer_sums(attentions: Sequence[np.ndarray], grid_size: Tuple[int, int], stride: Tuple[int, int],
                prefix: int) -> np.ndarray:
    """(layers, heads) distances summed over the images of one batch of every layer's maps."""
    return np.stack([_distance_sums(a, grid_size, stride, prefix) for a in attentions])


def mean_attention_distance(model, images, batch_size: int = 32) -> np.ndarray:
    """(layers, heads) attention-weighted mean distance in pixels between query and key patches
    (Fig. 7 right). For hybrids a "patch" spans the ResNet stride times the patch size. Summed batch
    by batch: memory follows `batch_size`, not the number of images (400 images of a 64 px model
    took 2.5 GB when every layer's maps of every image were kept)."""
    cfg = get_config(model)
    x = _check_images(model, images)
    _check_batch_size(batch_size)
    grid, prefix = _grid(model, x), _num_prefix_tokens(model)
    total = None
    for start in range(0, len(x), batch_size):
        sums = _layer_sums(attention_maps(model, x[start:start + batch_size], batch_size), grid, cfg.input_stride, prefix)
        total = sums if total is None else total + sums
    return (total / len(x)).astype(np.float32)


# --- position embeddings and filters ---------------------------------------------------------
def position_embedding_similarity(model) -> np.ndarray:
    """Cosine similarity of each patch's position embedding with every other patch's:
    (gh, gw, gh, gw), entry [i, j] is the map for the patch at row i, column j (Fig. 7 centre)."""
    cfg = get_config(model)
    emb = model.get_layer("posembed_input").embedding()
    if emb is None:
        raise ValueError(f"model has pos_embedding={cfg.pos_embedding!r}: there is no position embedding table "
                         "to compare (use 'learned', 'learned_2d' or 'sincos2d')")
    e = keras.ops.convert_to_numpy(emb)[0, cfg.num_pos_prefix_tokens:].astype(np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=-1, keepdims=True), 1e-12)
    gh, gw = cfg.grid_size
    return (e @ e.T).reshape(gh, gw, gh, gw).astype(np.float32)


def embedding_filters(model, k: int = 28) -> Tuple[np.ndarray, np.ndarray]:
    """Top-k principal components of the patch-embedding filters (Fig. 7 left).

    The D filters of the patch projection (each P x P x C) are the samples; returns
    (components (k, P, P, C), explained_variance_ratio (k,)). k is capped at min(D, P*P*C).
    Hybrids embed ResNet features rather than pixels, so they have no such filters.
    """
    cfg = get_config(model)
    if cfg.resnet_layers is not None:
        raise ValueError("a hybrid's patch embedding acts on ResNet features, not pixels: "
                         "embedding_filters needs a plain ViT")
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    kernel = keras.ops.convert_to_numpy(model.get_layer("embedding").projection.kernel).astype(np.float64)
    ph, pw, c, d = kernel.shape
    filters = kernel.reshape(ph * pw * c, d).T  # (D, P*P*C)
    filters = filters - filters.mean(axis=0, keepdims=True)
    _, s, vt = np.linalg.svd(filters, full_matrices=False)
    var = s ** 2
    ratio = var / max(var.sum(), 1e-12)
    k = int(min(k, vt.shape[0]))
    return vt[:k].reshape(k, ph, pw, c).astype(np.float32), ratio[:k].astype(np.float32)


# --- figures ----------------------------------------------------------------------------------
def _display(image: np.ndarray) -> np.ndarray:
    img = np.clip(np.asarray(image, dtype=np.float32) / 255.0, 0.0, 1.0)
    return img[..., 0] if img.shape[-1] == 1 else img


def _to_rgb_range(x: np.ndarray) -> np.ndarray:
    lo, hi = float(x.min()), float(x.max())
    return (x - lo) / (hi - lo) if hi > lo else np.zeros_like(x)


def plot_attention_rollout(image: np.ndarray, rollout: np.ndarray, path: str,
                           stride: Optional[Tuple[int, int]] = None) -> str:
    """Input, rollout map and the input masked by the (max-normalised) map, side by side
    (`stride`: the model's pixels per patch, as `upsample_map` takes it)."""
    plt = pyplot()
    h, w = image.shape[:2]
    mask = upsample_map(rollout, (h, w), stride)
    mask = mask / max(float(mask.max()), 1e-12)
    fig, axes = plt.subplots(1, 3, figsize=(9, 3.4))
    axes[0].imshow(_display(image), cmap="gray")
    axes[0].set_title("input")
    im = axes[1].imshow(rollout, cmap="inferno")
    axes[1].set_title("attention rollout")
    fig.colorbar(im, ax=axes[1], fraction=0.046, format="%.3f")
    overlay = np.asarray(image, dtype=np.float32) / 255.0 * mask[..., None]
    axes[2].imshow(_display(overlay * 255.0), cmap="gray")
    axes[2].set_title("input x rollout")
    for ax in axes:
        ax.axis("off")
    return save_figure(fig, path)


def plot_attention_maps(attentions: Sequence[np.ndarray], grid_size: Tuple[int, int], path: str,
                        num_prefix_tokens: int = 1, index: int = 0, class_token: Optional[bool] = None) -> str:
    """Grid (layers x heads) of the output token's attention over the patches for one image
    (the class token's row when `class_token`, by default when there are prefix tokens; else
    the mean over patch queries, for "gap" and "map" models)."""
    plt = pyplot()
    n_layers, n_heads = len(attentions), attentions[0].shape[1]
    fig, axes = plt.subplots(n_layers, n_heads, figsize=(1.6 * n_heads + 0.4, 1.6 * n_layers + 0.4), squeeze=False)
    p = num_prefix_tokens
    class_token = p > 0 if class_token is None else class_token
    for li, a in enumerate(attentions):
        for hi in range(n_heads):
            row = a[index, hi, 0, p:] if class_token else a[index, hi, p:, p:].mean(axis=0)
            ax = axes[li, hi]
            ax.imshow(row.reshape(grid_size), cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            if li == 0:
                ax.set_title(f"head {hi}", fontsize=8)
            if hi == 0:
                ax.set_ylabel(f"layer {li}", fontsize=8)
    fig.suptitle("attention of the output token", fontsize=10)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_attention_distance(distances: np.ndarray, path: str, image_side: Optional[float] = None) -> str:
    """Mean attention distance (pixels) of every head against network depth (Fig. 7 right)."""
    plt = pyplot()
    n_layers, n_heads = distances.shape
    fig, ax = plt.subplots(figsize=(4.5, 3.6))
    for hi in range(n_heads):
        ax.scatter(np.arange(n_layers), distances[:, hi], s=14, label=f"head {hi}" if n_heads <= 16 else None)
    ax.set_xlabel("network depth (layer)")
    ax.set_ylabel("mean attention distance (pixels)")
    ax.set_ylim(0, image_side if image_side else None)
    ax.set_xticks(np.arange(n_layers))
    if n_heads <= 16:
        ax.legend(fontsize=6, ncol=2, loc="lower right")
    ax.grid(alpha=0.3)
    return save_figure(fig, path)


def plot_position_embedding_similarity(similarity: np.ndarray, path: str) -> str:
    """Grid of grids: for each patch (row, column), its cosine similarity to all patches (Fig. 7 centre)."""
    plt = pyplot()
    gh, gw = similarity.shape[:2]
    fig, axes = plt.subplots(gh, gw, figsize=(max(3.0, 0.55 * gw + 1.0), max(3.0, 0.55 * gh + 0.6)), squeeze=False)
    im = None
    for i in range(gh):
        for j in range(gw):
            ax = axes[i, j]
            im = ax.imshow(similarity[i, j], vmin=-1, vmax=1, cmap="viridis")
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(str(i + 1), fontsize=6)
            if i == gh - 1:
                ax.set_xlabel(str(j + 1), fontsize=6)
    fig.supylabel("input patch row")
    fig.supxlabel("input patch column")
    fig.colorbar(im, ax=axes.ravel().tolist(), fraction=0.03, label="cosine similarity")
    return save_figure(fig, path)


def plot_embedding_filters(components: np.ndarray, path: str) -> str:
    """The principal components of the patch-embedding filters, each scaled to [0, 1] (Fig. 7 left)."""
    plt = pyplot()
    k = len(components)
    cols = min(7, k)
    rows = int(np.ceil(k / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.2 * cols, 1.2 * rows + 0.4), squeeze=False)
    for i, ax in enumerate(axes.ravel()):
        ax.axis("off")
        if i < k:
            comp = _to_rgb_range(components[i])
            ax.imshow(comp[..., 0] if comp.shape[-1] == 1 else comp[..., :3], cmap="gray",
                      interpolation="nearest")
    fig.suptitle("RGB embedding filters (first principal components)", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def inspect_model(model, images: np.ndarray, out_dir: str, distance_images: Optional[np.ndarray] = None,
                  k: int = 28) -> Dict[str, Any]:
    """Every figure for one model: PNGs and `inspect.npz` under out_dir. `images[0]` is the one
    shown for rollout and attention maps; mean attention distance averages over
    `distance_images` (default: `images`). Returns {figure name: path}; figures that do not
    apply to the model (filters of a hybrid, similarity without position embeddings) are skipped
    and named under "skipped"."""
    os.makedirs(out_dir, exist_ok=True)
    images = _check_images(model, images)
    dist_images = images if distance_images is None else _check_images(model, distance_images)
    p = _num_prefix_tokens(model)
    written: Dict[str, Any] = {}
    skipped: Dict[str, str] = {}
    arrays: Dict[str, np.ndarray] = {"images": images}

    attn = attention_maps(model, images)
    for i, a in enumerate(attn):
        arrays[f"attention_layer{i}"] = a
    grid = _grid(model, images)
    rollout = rollout_from_attention(attn, p, class_token=_reads_class_token(model)).reshape((-1, *grid))
    arrays["attention_rollout"] = rollout
    written["attention_rollout"] = plot_attention_rollout(images[0], rollout[0], os.path.join(out_dir, "attention_rollout.png"),
                                                           get_config(model).input_stride)
    written["attention_maps"] = plot_attention_maps(attn, grid, os.path.join(out_dir, "attention_maps.png"), p,
                                                    class_token=_reads_class_token(model))

    if distance_images is None:  # the maps above, not a second pass over the same images
        dist = (_layer_sums(attn, grid, get_config(model).input_stride, p) / len(images)).astype(np.float32)
    else:
        dist = mean_attention_distance(model, dist_images)
    arrays["mean_attention_distance"] = dist
    written["mean_attention_distance"] = plot_attention_distance(
        dist, os.path.join(out_dir, "mean_attention_distance.png"),
        image_side=float(np.hypot(*dist_images.shape[1:3])))

    try:
        sim = position_embedding_similarity(model)
        arrays["position_embedding_similarity"] = sim
        written["position_embedding_similarity"] = plot_position_embedding_similarity(
            sim, os.path.join(out_dir, "position_embedding_similarity.png"))
    except ValueError as exc:
        skipped["position_embedding_similarity"] = str(exc)
    try:
        comps, ratio = embedding_filters(model, k)
        arrays["embedding_filters"] = comps
        arrays["embedding_filters_explained_variance"] = ratio
        written["embedding_filters"] = plot_embedding_filters(comps, os.path.join(out_dir, "embedding_filters.png"))
    except ValueError as exc:
        skipped["embedding_filters"] = str(exc)

    npz = os.path.join(out_dir, "inspect.npz")
    with atomic_path(npz) as tmp:
        np.savez_compressed(tmp, **arrays)
    written["arrays"] = npz
    if skipped:
        written["skipped"] = skipped
    return written
