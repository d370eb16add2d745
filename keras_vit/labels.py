"""ImageNet class names shipped with the package (keras_vit/assets/*.txt, one class a line).

imagenet1k: the 1000 ILSVRC-2012 classes in the usual (sorted WordNet id) order of the
published in1k checkpoints. imagenet21k: the 21843 classes of Google's ImageNet-21k
checkpoints (sorted WordNet ids). Each line is the WordNet lemma list of the class
("tabby, tabby cat"); both lists were made from timm's data/_info synset and lemma files.
"""
from __future__ import annotations

import functools
import os
from typing import List

LABEL_SETS = ("imagenet1k", "imagenet21k")
_ASSETS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets")


@functools.cache
def _read(kind: str) -> tuple:
    with open(os.path.join(_ASSETS, f"{kind}.txt"), encoding="utf-8") as f:
        return tuple(line.rstrip("\n") for line in f if line.strip())


def imagenet_labels(kind: str = "imagenet1k") -> List[str]:
    """The class names of `kind` ("imagenet1k" or "imagenet21k"), in the checkpoints' order."""
    if kind not in LABEL_SETS:
        raise ValueError(f"unknown label set {kind!r}; allowed: {', '.join(LABEL_SETS)}")
    return list(_read(kind))


__all__ = ["LABEL_SETS", "imagenet_labels"]
