"""Shared by the export tests: small keras-vit models with non-trivial weights, and the digits
model that the session fixture `trained_digits` (conftest.py) trains once per test session."""
from __future__ import annotations

import numpy as np

# Ti width (hidden 192, 3 heads, MLP 768) with one block at 32x32 keeps each export ~2 s.
TI = dict(hidden_size=192, num_heads=3, mlp_dim=768, num_layers=1)
FAMILIES = {
    "learned": dict(pos_embedding="learned"),
    "learned_2d": dict(pos_embedding="learned_2d"),
    "relative": dict(pos_embedding="relative"),
    "sincos2d": dict(pos_embedding="sincos2d"),
    "none": dict(pos_embedding="none"),
    "gap": dict(classifier="gap"),
}
DIGIT_NAMES = [str(i) for i in range(10)]


def small_model(family: str = "learned", seed: int = 0, **options):
    """A Ti-width ViT on 32x32 images; zero-initialised weights (head, class token, biases) are
    filled with noise so that logits differ between classes and images. `options` are further
    ViTConfig fields (e.g. gelu_approximate=False)."""
    import keras

    import keras_vit

    keras.utils.set_random_seed(seed)
    if family == "hybrid":
        # A two-stage BiT ResNet (one unit each, total stride 8) under a one-block Ti encoder.
        cfg = keras_vit.ViTConfig(**{**TI, **options}, patch_size=1, image_size=32, num_classes=10,
                                  resnet_layers=(1, 1), variant="R+Ti/8")
        model = keras_vit.ViT(config=cfg)
    else:
        model = keras_vit.ViT("Ti/4", image_size=32, num_classes=10, **{**TI, **FAMILIES[family], **options})
    rng = np.random.RandomState(seed)
    for w in model.weights:
        value = np.asarray(w.numpy())
        if not value.any():
            w.assign(rng.normal(0.0, 0.2, value.shape).astype("float32"))
    return model


def train_digits(digits, path: str):
    """(model, `path` where it is saved as .keras): a small ViT (patch 8, 17 tokens) trained ~25 s
    on the digits train split with a cosine schedule (~96% test accuracy; confident enough for
    int8 to keep >= 97% top-1). `digits`: x_train, y_train, x_test, y_test."""
    import keras

    import keras_vit

    x_train, y_train, _, _ = digits
    keras.utils.set_random_seed(0)
    model = keras_vit.ViT("Ti/8", image_size=32, num_classes=10, hidden_size=64, mlp_dim=128, num_heads=2,
                          num_layers=2)
    epochs, batch = 30, 64
    schedule = keras.optimizers.schedules.CosineDecay(3e-3, epochs * -(-len(x_train) // batch))
    model.compile(optimizer=keras.optimizers.AdamW(schedule),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=epochs, batch_size=batch, verbose=0)
    model.save(path)
    return model, path


def full_ti16():
    """The real Ti/16 (12 blocks, 224px, 1000 classes) with a random head, so logits differ per image."""
    import keras_vit

    model = keras_vit.ViT("Ti/16", image_size=224, num_classes=1000)
    head = model.get_layer("head")
    head.kernel.assign(np.random.RandomState(0).normal(0, 0.05, head.kernel.shape).astype("float32"))
    return model
