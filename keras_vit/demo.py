"""`make demo`: build a ViT, print its summary and classify a real photo (scikit-learn's sample)."""
from __future__ import annotations

import numpy as np


def main() -> None:
    import keras

    import keras_vit
    from sklearn.datasets import load_sample_image

    image = load_sample_image("china.jpg").astype("float32")  # (427, 640, 3), values in [0, 255]
    image = keras.ops.convert_to_numpy(keras.ops.image.resize(image[None], (224, 224)))
    model = keras_vit.ViT(variant="Ti/16", image_size=224, num_classes=10)
    model.summary()
    logits = model.predict(image, verbose=0)
    print(f"forward pass on a {image.shape[1]}x{image.shape[2]} photo -> logits {logits.shape}, "
          f"finite: {bool(np.isfinite(logits).all())}")


if __name__ == "__main__":
    main()
