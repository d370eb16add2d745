"""keras-vit against timm itself: real timm models of the ViT family (random weights at small
sizes, every parameter and buffer drawn, LayerScale and norms included) saved as timm saves them
(model.safetensors + config.json), loaded with `keras_vit.ViT(weights=path)` and compared on the
logits (or pooled features) timm's own forward gives, at the native size and at another size
(timm's `checkpoint_filter_fn` resamples the position embeddings for it).

The rest of the suite checks the loaders against tests/reference_family.py, a NumPy reading of
timm's code; this file is the independent implementation itself. It needs timm (and torchvision):
CI does not install them, so it is skipped there. Run it where the peers are, e.g.
`.venv-peers/bin/python -m pytest tests/test_timm_models.py` after `bash bench/amx.sh` set them up.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

timm = pytest.importorskip("timm")
torch = pytest.importorskip("torch")

import keras_vit  # noqa: E402

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
OPENAI = ((0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711))
HALF = ((0.5,) * 3, (0.5,) * 3)
SMALL = dict(embed_dim=64, depth=2, num_heads=4)
TOL = 1e-4  # max |diff| relative to max |timm|; float32 both sides

# name: (timm architecture, pretrained tag, native size, normalisation, classes (0: a feature tower))
CASES = {
    "deit_distilled": ("deit_tiny_distilled_patch16_224", "fb_in1k", 64, IMAGENET, 10),
    "deit": ("deit_small_patch16_224", "fb_in1k", 64, IMAGENET, 10),
    "deit3": ("deit3_small_patch16_224", "fb_in1k", 64, IMAGENET, 10),
    "dinov2": ("vit_small_patch14_dinov2", "lvd142m", 56, IMAGENET, 0),
    "dinov2_reg4": ("vit_small_patch14_reg4_dinov2", "lvd142m", 56, IMAGENET, 0),
    "clip_laion": ("vit_base_patch16_clip_224", "laion2b", 64, OPENAI, 10),
    "clip_quickgelu": ("vit_base_patch16_clip_quickgelu_224", "openai", 64, OPENAI, 10),
    "siglip": ("vit_base_patch16_siglip_224", "webli", 64, HALF, 0),
    "siglip_head": ("vit_base_patch16_siglip_224", "webli", 64, HALF, 10),
    "so150m_reg4_map": ("vit_so150m_patch16_reg4_map_256", "sbb_e250_in12k_ft_in1k", 64, HALF, 10),
    "so150m2_reg1_gap": ("vit_so150m2_patch16_reg1_gap_256", "sbb_e200_in12k_ft_in1k", 64, HALF, 10),
    "augreg": ("vit_base_patch16_224", "augreg2_in21k_ft_in1k", 64, HALF, 10),
    "r50_hybrid": ("vit_base_r50_s16_224", "orig_in21k", 64, HALF, 10),
    "r26_hybrid": ("vit_small_r26_s32_224", "augreg_in21k_ft_in1k", 64, HALF, 10),
    "gap": ("vit_medium_patch16_gap_256", "sw_in12k_ft_in1k", 64, HALF, 10),
    "siglip_gap": ("vit_base_patch16_siglip_gap_224", "webli", 64, HALF, 0),
    "clip_laion_b32": ("vit_base_patch32_clip_224", "laion2b_ft_in12k_in1k", 64, OPENAI, 10),
}


def _random_timm(arch: str, size: int, classes: int, seed: int = 0):
    """timm's model at a small width and depth with every parameter and buffer drawn at random
    (norm weights around 1, so no LayerScale, bias or norm is left at its identity init)."""
    torch.manual_seed(seed)
    model = timm.create_model(arch, pretrained=False, num_classes=classes, img_size=size, **SMALL).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            centre = 1.0 if name.endswith("weight") and p.dim() == 1 and "norm" in name else 0.0
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 0.1) + centre)
        for name, b in model.named_buffers():
            if name.endswith("running_var"):
                b.copy_(torch.rand_like(b) + 0.5)
            elif name.endswith("running_mean"):
                b.copy_(torch.randn_like(b) * 0.1)
    return model


def _timm_forward(model, images: np.ndarray, norm) -> np.ndarray:
    """timm's output for [0, 255] NHWC images, normalised as its pretrained_cfg says."""
    mean, std = (torch.tensor(v)[:, None, None] for v in norm)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2) / 255.0 - mean) / std
    with torch.no_grad():
        return model(x).numpy()


def _save_as_timm(folder, model, arch: str, tag: str, size: int, norm, classes: int) -> str:
    """model.safetensors + the config.json timm writes beside it (push_to_hub's layout)."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "model.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    mean, std = norm
    config = dict(architecture=arch, num_classes=classes, num_features=model.num_features,
                  global_pool=model.global_pool, model_args=dict(SMALL, img_size=size),
                  pretrained_cfg=dict(tag=tag, input_size=[3, size, size], mean=list(mean), std=list(std),
                                      num_classes=classes, interpolation="bicubic"))
    (folder / "config.json").write_text(json.dumps(config))
    return str(path)


def _rel(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("case", list(CASES))
def test_timm_checkpoint_gives_timms_outputs(tmp_path, case):
    arch, tag, size, norm, classes = CASES[case]
    model = _random_timm(arch, size, classes)
    path = _save_as_timm(tmp_path / case, model, arch, tag, size, norm, classes)
    kwargs = {} if classes else {"include_top": False}
    images = np.random.default_rng(1).uniform(0, 255, (3, size, size, 3)).astype(np.float32)
    want = _timm_forward(model, images, norm)
    ours = keras_vit.ViT(weights=path, **kwargs)
    got = ours.predict(images, verbose=0)
    assert got.shape == want.shape
    assert _rel(got, want) <= TOL, (case, _rel(got, want))

    # Another size: timm resamples the position embeddings while loading (checkpoint_filter_fn,
    # bicubic with antialias); keras-vit resamples them in ViT(image_size=...).
    other = size + 2 * (14 if "patch14" in arch else 16)
    bigger = timm.create_model(arch, pretrained=False, num_classes=classes, img_size=other, **SMALL).eval()
    bigger.load_state_dict(timm.models.vision_transformer.checkpoint_filter_fn(model.state_dict(), bigger))
    images = np.random.default_rng(2).uniform(0, 255, (2, other, other, 3)).astype(np.float32)
    want = _timm_forward(bigger, images, norm)
    got = keras_vit.ViT(weights=path, image_size=other, **kwargs).predict(images, verbose=0)
    assert _rel(got, want) <= TOL, (case, other, _rel(got, want))
