"""The published checkpoints by name: the paper's and AugReg's .npz files, and the ViT family
(issue #26: DeiT, DeiT-III, DINOv2, CLIP, SigLIP) by timm's names on the Hugging Face Hub, with the
model options and preprocessing each was trained with.

Pure Python (no Keras, no NumPy) so that `vitcli models` lists them cheaply.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict, Mapping, Optional

_GCS = "https://storage.googleapis.com/vit_models/"
# Preprocessing the checkpoints were trained with, per channel on the [0, 1] scale.
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class Published:
    """A checkpoint published with the paper or later: where it is and what model it fits."""

    url: str
    variant: str
    image_size: int
    num_classes: int  # 0: a backbone without a head (built with include_top=False unless num_classes is given)
    representation_size: Optional[int] = None
    # The ViT family (issue #26): further ViTConfig fields, and the preprocessing of timm's pretrained_cfg
    # (pixel_mean / pixel_std are among `options`, so the model carries them).
    options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
    interpolation: str = "bilinear"
    crop_pct: float = 1.0
    # timm's parameter count of the same model, and where the number comes from.
    timm_params: Optional[int] = None
    source: str = ""

    @property
    def labels(self) -> Optional[str]:
        """The label set of the head: "imagenet1k", "imagenet21k" (ImageNet-21k, 21843 classes)."""
        return {1000: "imagenet1k", 21843: "imagenet21k"}.get(self.num_classes)

    def defaults(self) -> Dict[str, Any]:
        """The ViTConfig fields of the model this checkpoint fits."""
        out: Dict[str, Any] = dict(variant=self.variant, image_size=self.image_size,
                                   representation_size=self.representation_size, **self.options)
        if self.num_classes:
            out["num_classes"] = self.num_classes
        else:
            out["include_top"] = False
        return out


def _augreg(stem: str, ft: Optional[str] = None) -> str:
    return f"{_GCS}augreg/{stem}" + (f"--imagenet2012-steps_20k-{ft}" if ft else "") + ".npz"


# Names: "{variant}-{pre-training}[-ft-{fine-tuning}[-{res}]]". Sources: the vision_transformer
# README (imagenet21k/, imagenet21k+imagenet2012/) and the AugReg index (augreg/), as listed in
# timm's default_cfgs.
_AR = {
    "Ti/16": "Ti_16-i21k-300ep-lr_0.001-aug_none-wd_0.03-do_0.0-sd_0.0",
    "S/32": "S_32-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0",
    "S/16": "S_16-i21k-300ep-lr_0.001-aug_light1-wd_0.03-do_0.0-sd_0.0",
    "B/32": "B_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.03-do_0.0-sd_0.0",
    "B/16": "B_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0",
    "B/8": "B_8-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.0-sd_0.0",
    "L/16": "L_16-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1",
}
PUBLISHED: Dict[str, Published] = {
    # The paper's ImageNet-21k pre-trained models (with the pre-logits layer) ...
    **{f"{v}-i21k": Published(f"{_GCS}imagenet21k/ViT-{v.replace('/', '_')}.npz", v, 224, 21843, r)
       for v, r in (("B/16", 768), ("B/32", 768), ("L/16", 1024), ("L/32", 1024), ("H/14", 1280))},
    "R50+B/16-i21k": Published(f"{_GCS}imagenet21k/R50+ViT-B_16.npz", "R50+B/16", 224, 21843, 768),
    # ... and fine-tuned on ImageNet-1k at 384 px (and at 224 px: "-224").
    **{f"{v}-i21k-ft-in1k": Published(f"{_GCS}imagenet21k+imagenet2012/ViT-{v.replace('/', '_')}.npz", v, 384, 1000)
       for v in ("B/16", "B/32", "L/16", "L/32")},
    "B/16-i21k-ft-in1k-224": Published(f"{_GCS}imagenet21k+imagenet2012/ViT-B_16-224.npz", "B/16", 224, 1000),
    "L/16-i21k-ft-in1k-224": Published(f"{_GCS}imagenet21k+imagenet2012/ViT-L_16-224.npz", "L/16", 224, 1000),
    "R50+B/16-i21k-ft-in1k": Published(f"{_GCS}imagenet21k+imagenet2012/R50+ViT-B_16.npz", "R50+B/16", 384, 1000),
    # "How to train your ViT?" (AugReg) ImageNet-21k checkpoints and their ImageNet-1k fine-tunes.
    **{f"{v}-augreg-i21k": Published(_augreg(stem), v, 224, 21843) for v, stem in _AR.items()},
    "R26+S/32-augreg-i21k": Published(_augreg("R26_S_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.03-do_0.0-sd_0.0"),
                                      "R26+S/32", 224, 21843),
    "R50+L/32-augreg-i21k": Published(_augreg("R50_L_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0"),
                                      "R50+L/32", 224, 21843),
    **{f"{v}-augreg-i21k-ft-in1k": Published(_augreg(_AR[v], f"lr_{lr}-res_224"), v, 224, 1000)
       for v, lr in (("Ti/16", "0.03"), ("S/32", "0.03"), ("S/16", "0.03"), ("B/32", "0.03"),
                     ("B/16", "0.01"), ("B/8", "0.01"), ("L/16", "0.01"))},
    **{f"{v}-augreg-i21k-ft-in1k-384": Published(_augreg(_AR[v], f"lr_{lr}-res_384"), v, 384, 1000)
       for v, lr in (("Ti/16", "0.03"), ("S/32", "0.03"), ("S/16", "0.03"), ("B/16", "0.01"), ("L/16", "0.01"))},
    "R26+S/32-augreg-i21k-ft-in1k": Published(_augreg(
        "R26_S_32-i21k-300ep-lr_0.001-aug_light0-wd_0.03-do_0.1-sd_0.1", "lr_0.03-res_224"), "R26+S/32", 224, 1000),
    "R26+S/32-augreg-i21k-ft-in1k-384": Published(_augreg(
        "R26_S_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.03-do_0.0-sd_0.0", "lr_0.03-res_384"), "R26+S/32", 384, 1000),
    "R50+L/32-augreg-i21k-ft-in1k": Published(_augreg(
        "R50_L_32-i21k-300ep-lr_0.001-aug_medium1-wd_0.1-do_0.1-sd_0.1", "lr_0.01-res_224"), "R50+L/32", 224, 1000),
    "R50+L/32-augreg-i21k-ft-in1k-384": Published(_augreg(
        "R50_L_32-i21k-300ep-lr_0.001-aug_medium2-wd_0.1-do_0.0-sd_0.0", "lr_0.01-res_384"), "R50+L/32", 384, 1000),
}

# The ViT family (issue #26) by timm's names, from the Hugging Face Hub. The options and the preprocessing
# are timm's (vision_transformer.py / deit.py default_cfgs and model_args); timm_params is the parameter count
# of timm's module (computed from its shapes; the timm model cards round it to 0.1M). Where keras-vit's
# model has a few more (a zero class slot in the position table for no_embed_class checkpoints, a zero
# patch-embedding bias for CLIP), README's "Models" table says so.
_IN = dict(pixel_mean=IMAGENET_MEAN, pixel_std=IMAGENET_STD, gelu_approximate=False)
_TIMM_DEIT = "timm deit.py default_cfgs (crop_pct 0.9, bicubic, ImageNet mean/std)"
_TIMM_DINO = "timm vision_transformer.py default_cfgs (518 px, crop_pct 1.0, bicubic, ImageNet mean/std, no head)"
FAMILY: Dict[str, Published] = {
    "deit_base_distilled_patch16_224": Published(
        "hf://timm/deit_base_distilled_patch16_224.fb_in1k", "B/16", 224, 1000, options=dict(_IN, distilled=True),
        interpolation="bicubic", crop_pct=0.9, timm_params=87_338_192, source=_TIMM_DEIT),
    "deit_small_patch16_224": Published(
        "hf://timm/deit_small_patch16_224.fb_in1k", "S/16", 224, 1000, options=dict(_IN),
        interpolation="bicubic", crop_pct=0.9, timm_params=22_050_664, source=_TIMM_DEIT),
    "deit3_base_patch16_224": Published(
        "hf://timm/deit3_base_patch16_224.fb_in1k", "B/16", 224, 1000, options=dict(_IN, layer_scale_init=1e-6),
        interpolation="bicubic", crop_pct=0.9, timm_params=86_585_320, source=_TIMM_DEIT),
    "vit_small_patch14_dinov2.lvd142m": Published(
        "hf://timm/vit_small_patch14_dinov2.lvd142m", "S/14", 518, 0, options=dict(_IN, layer_scale_init=1e-5),
        interpolation="bicubic", timm_params=22_056_192, source=_TIMM_DINO),
    "vit_base_patch14_dinov2.lvd142m": Published(
        "hf://timm/vit_base_patch14_dinov2.lvd142m", "B/14", 518, 0, options=dict(_IN, layer_scale_init=1e-5),
        interpolation="bicubic", timm_params=86_579_712, source=_TIMM_DINO),
    "vit_small_patch14_reg4_dinov2.lvd142m": Published(
        "hf://timm/vit_small_patch14_reg4_dinov2.lvd142m", "S/14", 518, 0,
        options=dict(_IN, layer_scale_init=1e-5, num_registers=4), interpolation="bicubic",
        timm_params=22_057_344, source=_TIMM_DINO),
    "vit_base_patch14_reg4_dinov2.lvd142m": Published(
        "hf://timm/vit_base_patch14_reg4_dinov2.lvd142m", "B/14", 518, 0,
        options=dict(_IN, layer_scale_init=1e-5, num_registers=4), interpolation="bicubic",
        timm_params=86_582_016, source=_TIMM_DINO),
    # OpenAI's image tower with its 512-wide projection as the head; QuickGELU, as it was trained (timm's
    # vit_base_patch16_clip_quickgelu_224 architecture).
    "vit_base_patch16_clip_224.openai": Published(
        "hf://timm/vit_base_patch16_clip_224.openai", "B/16", 224, 512,
        options=dict(pre_norm=True, activation="quick_gelu", layer_norm_epsilon=1e-5,
                     pixel_mean=CLIP_MEAN, pixel_std=CLIP_STD),
        interpolation="bicubic", crop_pct=0.9, timm_params=86_193_152,
        source="timm vision_transformer.py default_cfgs (crop_pct 0.9, bicubic, OpenAI CLIP mean/std, 512 classes)"),
    # timm's own copy of these weights is an open_clip .bin; the transformers SiglipModel is safetensors.
    "vit_base_patch16_siglip_224.webli": Published(
        "hf://google/siglip-base-patch16-224", "B/16", 224, 0,
        options=dict(classifier="map", gelu_approximate=True), interpolation="bicubic", crop_pct=0.9,
        timm_params=92_884_224,
        source="timm vision_transformer.py default_cfgs (crop_pct 0.9, bicubic, mean/std 0.5, no head)"),
    # SigLIP So400m/14 at its native 384 px: 27 x 27 patches, the last 6 pixels unseen (patch_remainder).
    "vit_so400m_patch14_siglip_384.webli": Published(
        "hf://google/siglip-so400m-patch14-384", "So400m/14", 384, 0,
        options=dict(classifier="map", gelu_approximate=True, patch_remainder="drop"), interpolation="bicubic",
        timm_params=428_225_600,
        source="timm vision_transformer.py default_cfgs (crop_pct 1.0, bicubic, mean/std 0.5, no head); "
               "parameters counted in timm 1.0.31's own module"),
}
PUBLISHED.update(FAMILY)
