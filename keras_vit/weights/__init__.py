"""Weights: checkpoints in and out of a model, and what adapts them to it.

- `checkpoints`: hf://, reading .npz / .safetensors, what a checkpoint fits;
- `presets`: the published checkpoints by name (no Keras: `vitcli models` lists them);
- `npz_layout`: the official (vision_transformer) layout, big_vision names brought to it;
- `torch_layout`: timm / Hugging Face (PyTorch layout) names and shapes <-> the official layout;
- `hf_layout`: the Hugging Face ViT family (DINOv2, CLIP, SigLIP, DeiT) <-> the official layout, and their configs;
- `io`: a model's variables by checkpoint name; load_weights, load_npz, save_npz, save_safetensors;
- `resize`: position-embedding resampling (NumPy only);
- `lora`: LoRA factors saved and loaded apart from the model (exact for quantized models, whose save re-quantizes).

`keras_vit.weights.NAME` is `keras_vit.weights.io.NAME`, imported on first use, so that
`keras_vit.weights.resize` (which the config's checks use) stays free of Keras.
"""
from __future__ import annotations

import importlib

SUBMODULES = ("checkpoints", "hf_layout", "io", "lora", "npz_layout", "presets", "resize", "torch_layout")


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    if name in SUBMODULES:
        return importlib.import_module(f"keras_vit.weights.{name}")
    value = getattr(importlib.import_module("keras_vit.weights.io"), name)
    globals()[name] = value
    return value
