"""keras-vit against transformers itself: its ViT-family models built small with random weights
(every parameter drawn, norms and LayerScale included), written by their own `save_pretrained`
(config.json + model.safetensors) with a preprocessor_config.json beside them, loaded with
`keras_vit.ViT(weights=folder)` and compared with transformers' own outputs: the logits of the
classifiers, the pooled output (or CLIP's projected embedding) of the towers.

tests/test_hf_family.py checks the loaders against a NumPy reading of transformers' code; this
file is the independent implementation itself. It needs transformers (and torch), which CI does
not install, so it is skipped there; it runs where they are, e.g.
`.venv-peers/bin/python -m pytest tests/test_hf_models.py` with transformers installed there.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

import keras_vit  # noqa: E402

OPENAI = ([0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711])
IMAGENET = ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])
HALF = ([0.5] * 3, [0.5] * 3)
SIZE = 32
TOL = 1e-4  # max |diff| relative to max |transformers|; float32 both sides
SMALL = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=SIZE,
             patch_size=8)


DINO = {k: v for k, v in SMALL.items() if k != "intermediate_size"}  # DINOv2 sizes its MLP by mlp_ratio
t = transformers
CASES = {  # name: (model class, its config, normalisation, the output compared)
    "vit_classifier": (t.ViTForImageClassification, t.ViTConfig(**SMALL, num_labels=10), HALF, "logits"),
    "vit_pooler": (t.ViTModel, t.ViTConfig(**SMALL), HALF, "pooler_output"),
    "deit_teacher": (t.DeiTForImageClassificationWithTeacher, t.DeiTConfig(**SMALL, num_labels=10), IMAGENET,
                     "logits"),
    "deit": (t.DeiTForImageClassification, t.DeiTConfig(**SMALL, num_labels=10), IMAGENET, "logits"),
    "dinov2": (t.Dinov2Model, t.Dinov2Config(**DINO, mlp_ratio=2), IMAGENET, "pooler_output"),
    "dinov2_swiglu": (t.Dinov2Model, t.Dinov2Config(**DINO, use_swiglu_ffn=True), IMAGENET, "pooler_output"),
    "dinov2_registers": (t.Dinov2WithRegistersModel, t.Dinov2WithRegistersConfig(**DINO, mlp_ratio=2, num_register_tokens=4),
                         IMAGENET, "pooler_output"),
    "clip": (t.CLIPVisionModel, t.CLIPVisionConfig(**SMALL), OPENAI, "pooler_output"),
    "clip_projection": (t.CLIPVisionModelWithProjection, t.CLIPVisionConfig(**SMALL, projection_dim=24), OPENAI,
                        "image_embeds"),
    "siglip": (t.SiglipVisionModel, t.SiglipVisionConfig(**SMALL), HALF, "pooler_output"),
}


def _randomised(model_class, config, seed: int = 0):
    """The transformers model with every parameter drawn at random (norm weights around 1)."""
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            centre = 1.0 if p.dim() == 1 and ("norm" in name or "layernorm" in name) and name.endswith("weight") else 0.0
            p.copy_(torch.randn_like(p) * (0.2 if p.dim() > 1 else 0.1) + centre)
    return model


def _their_output(model, images: np.ndarray, norm, output: str) -> np.ndarray:
    mean, std = (torch.tensor(v)[:, None, None] for v in norm)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2) / 255.0 - mean) / std
    with torch.no_grad():
        return getattr(model(pixel_values=x), output).numpy()


def _rel(got, want) -> float:
    return float(np.max(np.abs(np.asarray(got, np.float64) - want)) / np.max(np.abs(want)))


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_model_gives_its_outputs(tmp_path, case):
    model_class, config, norm, output = CASES[case]
    model = _randomised(model_class, config)
    folder = tmp_path / case
    model.save_pretrained(folder)
    mean, std = norm
    (folder / "preprocessor_config.json").write_text(json.dumps(dict(image_mean=mean, image_std=std)))
    images = np.random.default_rng(1).uniform(0, 255, (3, SIZE, SIZE, 3)).astype(np.float32)
    want = _their_output(model, images, norm, output)
    got = keras_vit.ViT(weights=str(folder)).predict(images, verbose=0)
    assert got.shape == want.shape
    assert _rel(got, want) <= TOL, (case, _rel(got, want))


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_model_at_another_size_gives_its_outputs(tmp_path, case):
    """At 48x64 (a 6x8 grid from 4x4) keras-vit resamples the position table as transformers'
    interpolate_pos_encoding does (bicubic; ViTModel's too: it was resampled linearly, 2.8% off)."""
    import inspect

    model_class, config, norm, output = CASES[case]
    model = _randomised(model_class, config)
    folder = tmp_path / case
    model.save_pretrained(folder)
    (folder / "preprocessor_config.json").write_text(json.dumps(dict(image_mean=norm[0], image_std=norm[1])))
    images = np.random.default_rng(1).uniform(0, 255, (2, 48, 64, 3)).astype(np.float32)
    mean, std = (torch.tensor(v)[:, None, None] for v in norm)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2) / 255.0 - mean) / std
    extra = {"interpolate_pos_encoding": True} if "interpolate_pos_encoding" in inspect.signature(model.forward).parameters else {}
    with torch.no_grad():
        want = getattr(model(pixel_values=x, **extra), output).numpy()
    got = keras_vit.ViT(weights=str(folder), image_size=(48, 64)).predict(images, verbose=0)
    assert _rel(got, want) <= TOL, (case, _rel(got, want))
