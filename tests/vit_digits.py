"""The small ViT trained on the offline digits (32x32, 8x8 patches of 4 px) that the session
fixture `trained_digits_vit` (conftest.py) trains once for the inspection, few-shot and
pre-training tests."""

TINY_DIGITS = dict(hidden_size=64, num_heads=4, mlp_dim=128, num_layers=2, patch_size=4)


def train_digits_vit(digits, epochs: int = 8):
    """A Ti-sized-down ViT (2 layers, D=64) fit on the digits train split: ~90% test accuracy,
    ~20 s on 2 cores. `digits`: x_train, y_train, x_test, y_test."""
    import keras

    import keras_vit

    x_tr, y_tr, _, _ = digits
    keras.utils.set_random_seed(0)
    model = keras_vit.ViT("Ti/4", image_size=32, num_classes=10, **TINY_DIGITS)
    model.compile(keras.optimizers.AdamW(1e-3, weight_decay=1e-4),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    model.fit(x_tr, y_tr, batch_size=64, epochs=epochs, verbose=0)
    return model
