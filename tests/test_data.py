"""The dataset registry and the tf.data pipeline (keras_vit.data)."""
from __future__ import annotations

import numpy as np
import pytest
import tensorflow as tf  # a required dependency: a failed import fails the suite

from keras_vit import data  # noqa: E402


@pytest.fixture(scope="module")
def digits():
    return data.load("digits")


def test_digits_contract(digits):
    assert digits.class_names == [str(i) for i in range(10)]
    assert digits.image_shape == (32, 32, 3)
    n = [int(d.cardinality()) for d in (digits.train, digits.val, digits.test)]
    assert n[2] == 360 and n[0] + n[1] == 1797 - 360 and n[1] == round(1437 * 0.1)
    x, y = next(iter(digits.train))
    assert x.shape == (32, 32, 3) and x.dtype == tf.float32 and y.dtype == tf.int32
    test_y = np.array([int(y) for _, y in digits.test])
    assert np.bincount(test_y).min() >= 35  # stratified
    x_tr, y_tr, x_te, y_te = data.digits_arrays()
    assert 0.0 <= x_te.min() and x_te.max() <= 255.0 and x_te.max() > 200
    np.testing.assert_array_equal(test_y, y_te)  # the test split is fixed, whatever the seed


def test_val_split_is_seeded():
    a = [int(y) for _, y in data.load("digits", seed=1).val]
    b = [int(y) for _, y in data.load("digits", seed=1).val]
    c = [int(y) for _, y in data.load("digits", seed=2).val]
    assert a == b and a != c


def test_pipeline_batches_resizes_and_repeats(digits):
    kw = dict(image_size=(16, 16), batch_size=32, num_classes=10, training=True, seed=3)
    ds = data.pipeline(digits.train, **kw)
    x, y = next(iter(ds))
    assert x.shape == (32, 16, 16, 3) and y.shape == (32, 10)
    np.testing.assert_allclose(y.numpy().sum(-1), 1.0)
    x2, _ = next(iter(data.pipeline(digits.train, **kw)))
    np.testing.assert_array_equal(x.numpy(), x2.numpy())  # same seed, same first batch
    assert int(ds.cardinality()) == len(list(digits.train)) // 32  # drop_remainder in training
    ev = data.pipeline(digits.test, image_size=(16, 16), batch_size=100, num_classes=10, one_hot=False)
    assert [int(b[1].shape[0]) for b in ev] == [100, 100, 100, 60]


@pytest.mark.parametrize("augment", ["light", "affine", "basic", "randaugment", "inception"])
def test_augmentations_keep_shapes(digits, augment):
    ds = data.pipeline(digits.train.take(16), image_size=(32, 32), batch_size=8, num_classes=10,
                       training=True, augment=augment)
    x, y = next(iter(ds))
    assert x.shape == (8, 32, 32, 3) and y.shape == (8, 10)
    assert float(tf.reduce_min(x)) >= -1e-3 and float(tf.reduce_max(x)) <= 255.0 + 1e-3


def test_mixup_cutmix_give_soft_labels(digits):
    ds = data.pipeline(digits.train.take(32), image_size=(32, 32), batch_size=16, num_classes=10,
                       training=True, mixup=0.8, cutmix=1.0)
    _, y = next(iter(ds))
    y = y.numpy()
    np.testing.assert_allclose(y.sum(-1), 1.0, atol=1e-5)
    assert (y.max(-1) < 1.0).any()


def test_grayscale_becomes_rgb():
    ds = tf.data.Dataset.from_tensor_slices((np.zeros((4, 28, 28, 1), np.float32), np.zeros(4, np.int32)))
    x, _ = next(iter(data.pipeline(ds, image_size=(32, 32), batch_size=4, num_classes=2, channels=3)))
    assert x.shape == (4, 32, 32, 3)


def _write_images(root, classes=("cat", "dog"), n=6, size=(20, 24)):
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, cls in enumerate(classes):
        (root / cls).mkdir(parents=True)
        for j in range(n):
            img = rng.integers(0, 255, size + (3,), dtype=np.uint8)
            img[..., i] = 255  # class = colour
            Image.fromarray(img).save(root / cls / f"{j}.{'png' if j % 2 else 'jpg'}")


def test_folder_single_level(tmp_path):
    _write_images(tmp_path / "imgs", n=10)
    s = data.load(f"folder:{tmp_path / 'imgs'}", val_fraction=0.2)
    assert s.class_names == ["cat", "dog"]
    assert (len(list(s.train)), len(list(s.val))) == (16, 4)
    x, y = next(iter(s.train))
    assert x.shape == (20, 24, 3) and x.dtype == tf.float32 and float(tf.reduce_max(x)) == 255.0
    b, _ = next(iter(data.pipeline(s.train, image_size=(32, 32), batch_size=4, num_classes=2)))
    assert b.shape == (4, 32, 32, 3)


def test_folder_train_val_layout(tmp_path):
    _write_images(tmp_path / "d" / "train", n=6)
    _write_images(tmp_path / "d" / "val", n=2)
    s = data.load(f"folder:{tmp_path / 'd'}")
    assert s.class_names == ["cat", "dog"]
    assert (len(list(s.train)), len(list(s.val)), len(list(s.test))) == (12, 4, 4)


def test_a_class_named_train_in_a_flat_folder_is_a_class(tmp_path):
    """A flat folder of classes with one named "train" (buses, cars, trains) was read as the train/ split
    layout: "folder .../train has no class sub-folders". A train/ holding images itself is a class."""
    _write_images(tmp_path / "d", n=5, classes=("bus", "car", "train"))
    s = data.load(f"folder:{tmp_path / 'd'}", val_fraction=0.2)
    assert s.class_names == ["bus", "car", "train"]
    assert len(list(s.train)) + len(list(s.val)) == 15


def test_folder_errors(tmp_path):
    with pytest.raises(data.DatasetError, match="does not exist"):
        data.load(f"folder:{tmp_path / 'missing'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(data.DatasetError, match="no class sub-folders"):
        data.load(f"folder:{tmp_path / 'empty'}")
    _write_images(tmp_path / "one", classes=("cat",))
    with pytest.raises(data.DatasetError, match="has one class \\('cat'\\); a classifier needs two or more"):
        data.load(f"folder:{tmp_path / 'one'}")
    _write_images(tmp_path / "hole")
    (tmp_path / "hole" / "emu").mkdir()
    with pytest.raises(data.DatasetError, match="class folder 'emu' has no images"):
        data.load(f"folder:{tmp_path / 'hole'}")
    # val and test may leave training classes out, or hold none of a class's images
    _write_images(tmp_path / "d" / "train")
    _write_images(tmp_path / "d" / "val", classes=("dog",))
    (tmp_path / "d" / "test" / "cat").mkdir(parents=True)
    _write_images(tmp_path / "d" / "test", classes=("dog",))
    s = data.load(f"folder:{tmp_path / 'd'}")
    assert s.class_names == ["cat", "dog"] and len(list(s.val)) == len(list(s.test)) == 6


def test_evaluation_scores_a_split_by_class_name():
    """A split with some of the model's classes is scored by name; one with other classes, and not
    as many, is refused; other names for as many classes (ImageNet's synset folders) keep their order."""
    from keras_vit.errors import TrainError
    from keras_vit.train.evaluation import _labels_by_name

    digits = [str(i) for i in range(10)]
    assert _labels_by_name(digits, digits, 10) is None and _labels_by_name(["a", "b"], None, 2) is None
    np.testing.assert_array_equal(_labels_by_name(["3", "7"], digits, 10), [3, 7])
    assert _labels_by_name([f"n{i:08d}" for i in range(10)], digits, 10) is None
    with pytest.raises(TrainError, match=r"the dataset's classes \['a'\] are not among the model's 10 classes"):
        _labels_by_name(["a"], digits, 10)
    # as many classes, some the model's: dog/ and zebra/ for (cat, dog) scored dog's images as cat
    with pytest.raises(TrainError, match=r"the dataset's classes \['zebra'\] are not among the model's 2 classes"):
        _labels_by_name(["dog", "zebra"], ["cat", "dog"], 2)


def test_unknown_and_offline_datasets(monkeypatch):
    with pytest.raises(data.DatasetError, match="unknown dataset 'imagenet9'.*allowed: digits"):
        data.load("imagenet9")
    import keras

    def offline():
        raise Exception("URL fetch failure on https://example.org/cifar-10: [Errno -2] Name or service not known\nmore")

    monkeypatch.setattr(keras.datasets.cifar10, "load_data", offline)
    with pytest.raises(data.DatasetError) as info:
        data.load("cifar10")
    assert "'cifar10'" in str(info.value) and "\n" not in str(info.value)


def test_tfds_offline_is_one_line_at_once(tmp_path, monkeypatch):
    """A tfds dataset that is not prepared, on a machine that cannot reach tfds' servers: one line naming
    where it is not prepared and what to do, at once (tfds retried for 3.5 minutes under progress bars)."""
    import socket
    import time

    pytest.importorskip("tensorflow_datasets")
    for v in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY"):
        monkeypatch.delenv(v, raising=False)

    def unreachable(address, timeout=None):
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    start = time.time()
    with pytest.raises(data.DatasetError, match=rf"^could not load dataset 'tfds:mnist': it is not prepared in "
                                                rf"{tmp_path}.* and storage\.googleapis\.com cannot be reached "
                                                r"\(Network is unreachable\); prepare it where there is network "
                                                r"\(tfds build mnist\) and pass --data-dir$"):
        data.load("tfds:mnist", data_dir=str(tmp_path))
    assert time.time() - start < 30


def test_tfds_with_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        s = data.load("tfds:mnist")
        x, y = next(iter(s.train))
        assert s.class_names == [str(i) for i in range(10)] and s.image_shape == (28, 28, 1)
        assert x.shape == (28, 28, 1) and x.dtype == tf.float32 and y.dtype == tf.int32
        b, _ = next(iter(data.pipeline(s.test, image_size=(32, 32), batch_size=4, num_classes=10)))
        assert b.shape == (4, 32, 32, 3)
        for fraction in (0.004, 0.996):  # train[100%:] / train[:0%]: tfds' "Instruction [] corresponds to no data!"
            with pytest.raises(data.DatasetError, match=rf"^--val-fraction {fraction:g} of tfds:mnist's train split "
                                                        r"rounds to (0|100)% .*give 0\.01 to 0\.99$"):
                data.load("tfds:mnist", val_fraction=fraction)


def test_tfds_can_reach_its_download_step():
    """tensorflow-datasets 4.9.10 imports importlib_resources to find a builder's code before it downloads
    (undeclared on Python >= 3.9, tensorflow/datasets#11212; the [tfds] extra brings it): the step mock data skips."""
    tfds = pytest.importorskip("tensorflow_datasets")
    assert str(tfds.builder("mnist").code_path).endswith("mnist.py")


def test_slug():
    assert data.slug("folder:/data/My Flowers/") == "folder-My-Flowers"
    assert data.slug("tfds:oxford_flowers102") == "tfds-oxford_flowers102"


def test_folder_listing_takes_sub_folders_of_a_class_and_webp(tmp_path):
    """A class folder's sub-folders are part of the class (as image_dataset_from_directory and
    ImageFolder list them); WebP files are listed, as predict decodes them."""
    from PIL import Image

    _write_images(tmp_path / "d", n=2)
    (tmp_path / "d" / "cat" / "more" / "deeper").mkdir(parents=True)
    (tmp_path / "d" / "cat" / ".hidden").mkdir()
    img = Image.fromarray(np.full((8, 8, 3), 200, np.uint8))
    img.save(tmp_path / "d" / "cat" / "more" / "a.png")
    img.save(tmp_path / "d" / "cat" / "more" / "deeper" / "b.webp", lossless=True)
    img.save(tmp_path / "d" / "cat" / ".hidden" / "c.png")
    (tmp_path / "d" / "dog" / "loop").symlink_to(tmp_path / "d" / "dog")  # followed once, not forever
    files, labels, names = data.list_images(str(tmp_path / "d"))
    rel = [str(f)[len(str(tmp_path / "d")) + 1:] for f in files]
    assert names == ["cat", "dog"] and labels.tolist() == [0] * 4 + [1] * 2
    assert rel[:4] == ["cat/0.jpg", "cat/1.png", "cat/more/a.png", "cat/more/deeper/b.webp"]


def test_palette_bmp_and_webp_with_alpha_decode_as_pil(tmp_path):
    """TensorFlow's BMP decoder returns an 8-bit palette BMP's indices as grey; its WebP decoder refuses
    3 channels for a file with alpha: both reach the model as PIL shows them."""
    import io

    from PIL import Image

    from keras_vit.data.images import read_image

    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (5, 7, 3), dtype=np.uint8))
    rgba = Image.fromarray(rng.integers(0, 255, (5, 7, 4), dtype=np.uint8), "RGBA")
    cases = [(rgb.convert("P", palette=Image.ADAPTIVE, colors=40), "BMP", {}), (rgb.convert("L"), "BMP", {}),
             (rgb, "BMP", {}), (rgba, "WEBP", {"lossless": True}), (rgb, "WEBP", {"lossless": True})]
    for im, fmt, kw in cases:
        buf = io.BytesIO()
        im.save(buf, fmt, **kw)
        buf.seek(0)
        want = np.asarray(Image.open(buf).convert("RGB"), np.float32)
        got = read_image(tf.constant(buf.getvalue()), from_bytes=True).numpy()
        np.testing.assert_array_equal(got, want, err_msg=f"{fmt} {im.mode}")


def test_a_file_name_that_is_not_utf8_is_one_line_or_skipped(tmp_path):
    import os

    _write_images(tmp_path / "d", n=2)
    bad = os.path.join(os.fsencode(tmp_path / "d" / "cat"), b"caf\xe9.png")
    with open(bad, "wb") as f:
        f.write(open(tmp_path / "d" / "cat" / "1.png", "rb").read())
    with pytest.raises(data.DatasetError, match=r"cannot read image .*caf\ufffd\.png: its file name is not UTF-8"):
        data.load(f"folder:{tmp_path / 'd'}")
    s = data.load(f"folder:{tmp_path / 'd'}", skip_bad_images=True)
    assert len(s.bad_images) == 1 and s.bad_images.paths[0].endswith("caf\ufffd.png")
    assert s.sizes[0] + s.sizes[1] == 4  # the four good files
    with pytest.raises(data.DatasetError) as info:  # vitcli records has no --skip-bad-images to offer
        data.write_records(f"folder:{tmp_path / 'd'}", str(tmp_path / "rec"))
    assert str(info.value).endswith("its file name is not UTF-8, which TensorFlow needs; rename it")


def _animated_webp(path, alpha: bool) -> None:
    from PIL import Image

    frames = [Image.fromarray(np.full((24, 20, 4 if alpha else 3), c, np.uint8)) for c in (10, 200, 90)]
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, lossless=True)


def test_an_animated_webp_without_alpha_is_a_bad_image_not_a_crash(tmp_path):
    """TensorFlow's decode_image overran its heap on an animated WebP without alpha: the process aborted
    (glibc "corrupted size", status 134), --skip-bad-images or not. Now it is refused as a bad image; one
    with alpha decodes (its first frame)."""
    import os

    from keras_vit.data.images import load_image_file

    _write_images(tmp_path / "d", n=3)
    _animated_webp(tmp_path / "d" / "cat" / "anim.webp", alpha=False)
    _animated_webp(tmp_path / "anima.webp", alpha=True)
    with pytest.raises(data.DatasetError, match="an animated WebP without alpha, which TensorFlow's decoder cannot"):
        load_image_file(str(tmp_path / "d" / "cat" / "anim.webp"), (16, 16), 3)
    assert load_image_file(str(tmp_path / "anima.webp"), None, 3)[0, 0].tolist() == [10.0, 10.0, 10.0]
    s = data.load(f"folder:{tmp_path / 'd'}", skip_bad_images=True, val_fraction=0.5)
    assert sum(1 for _ in s.train) + sum(1 for _ in s.val) == 6
    assert [os.path.basename(p) for p in s.bad_images.paths] == ["anim.webp"]
    with pytest.raises(Exception, match="cannot read image .*anim.webp: not a decodable"):
        s = data.load(f"folder:{tmp_path / 'd'}", val_fraction=0.5)
        for _ in s.train.concatenate(s.val):
            pass


def test_a_dangling_link_is_named_as_one(tmp_path):
    """A link to a missing file was called "not a decodable JPEG/PNG/...": the line says where it points."""
    import tensorflow as tf

    _write_images(tmp_path / "d", n=3)
    (tmp_path / "d" / "cat" / "zzz.png").symlink_to(tmp_path / "nothere.png")
    s = data.load(f"folder:{tmp_path / 'd'}", val_fraction=0.5)
    with pytest.raises(tf.errors.OpError) as info:
        for _ in s.train.concatenate(s.val):
            pass
    assert data.bad_image_line(info.value) == (f"cannot read image {tmp_path / 'd' / 'cat' / 'zzz.png'}: a link to "
                                               f"'{tmp_path / 'nothere.png'}', which does not exist "
                                               "(--skip-bad-images skips such files)")


def test_evaluation_data_is_scored_whole(tmp_path):
    """`evaluation=True`: a folder of class sub-folders is its test split, every image, one class
    allowed (no hold-out); shards of a test split alone load."""
    _write_images(tmp_path / "one", classes=("dog",), n=5)
    s = data.load(f"folder:{tmp_path / 'one'}", evaluation=True)
    assert s.class_names == ["dog"] and len(list(s.test)) == 5
    _write_images(tmp_path / "two", n=10)
    assert len(list(data.load(f"folder:{tmp_path / 'two'}", evaluation=True).test)) == 20
    assert len(list(data.load(f"folder:{tmp_path / 'two'}").test)) == 2  # trained on: the 10% hold-out
    data.write_records(f"folder:{tmp_path / 'two'}", str(tmp_path / "rec"))
    with pytest.raises(data.DatasetError, match="has no training shards"):
        data.load(f"records:{tmp_path / 'rec'}/test-*")
    s = data.load(f"records:{tmp_path / 'rec'}/test-*", evaluation=True)
    assert s.sizes == (2, 2, 2) and len(list(s.test)) == 2


def test_records_with_labels_outside_the_classes_fail_by_name(tmp_path):
    """1-based labels (as TF-slim's ImageNet shards) against dataset.json's classes: one line naming the
    example, not an all-zero one-hot target that trains silently."""
    import json

    from keras_vit.data.records import _example

    (tmp_path / "rec").mkdir()
    png = tf.io.encode_png(tf.zeros((4, 4, 3), tf.uint8)).numpy()
    with tf.io.TFRecordWriter(str(tmp_path / "rec" / "train-00000-of-00001.tfrecord")) as w:
        for label in (1, 2):
            w.write(_example(png, label, f"img{label}.png"))
    (tmp_path / "rec" / "dataset.json").write_text(json.dumps({"class_names": ["a", "b"]}))
    s = data.load(f"records:{tmp_path / 'rec'}")
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        list(s.train)
    line = data.bad_image_line(info.value)
    assert line == ("cannot read image img2.png: its label 2 is not a class index 0..1 of the 2 classes named beside "
                    "the shards (image/class/label is 0-based)"), line  # no backslash: the quote TF's Assert escaped


@pytest.mark.parametrize("bad", [dict(mixup=-1.0), dict(mixup=float("inf")), dict(cutmix=float("nan")),
                                 dict(cutmix="0.2"), dict(batch_size=0), dict(batch_size=2.0)])
def test_pipeline_refuses_bad_values_in_one_line(digits, bad):
    kwargs = dict(image_size=(8, 8), batch_size=4, num_classes=10, training=True)
    kwargs.update(bad)
    name = next(iter(bad))
    with pytest.raises(data.DatasetError, match=f"^{name} must be"):
        data.pipeline(digits.train, **kwargs)


def test_an_image_this_process_may_not_read_is_named_as_such(tmp_path, monkeypatch):
    """Permission denied is said so (was: 'not a decodable JPEG/PNG...', which points at the wrong fix);
    a name that is no file (a TFRecord's) keeps the decoding line."""
    from keras_vit.data import folders

    def refused(path, mode="r"):
        raise PermissionError(13, "Permission denied", path)

    image = tmp_path / "a.png"
    image.write_bytes(b"\x89PNG")
    text = f"{folders.BAD_IMAGE_PREFIX}{image}: {folders._BAD_IMAGE_HINT}]"
    assert folders.bad_image_line(RuntimeError(text)) == text.rstrip("]")
    monkeypatch.setattr(folders, "open", refused, raising=False)
    assert folders.bad_image_line(RuntimeError(text)) == \
        f"cannot read image {image}: Permission denied (--skip-bad-images skips such files)"
    gone = f"{folders.BAD_IMAGE_PREFIX}photos/x.jpg: {folders._BAD_IMAGE_HINT}"
    monkeypatch.undo()
    assert folders.bad_image_line(RuntimeError(gone)) == gone


def test_records_of_a_dataset_that_does_not_load_leave_no_folder(tmp_path):
    """vitcli records --dataset nope --output DIR failed and left an empty DIR."""
    from keras_vit import data

    with pytest.raises(data.DatasetError, match="unknown dataset 'nope'"):
        data.write_records("nope", str(tmp_path / "rec"))
    assert not (tmp_path / "rec").exists()


def test_val_fraction_edges_are_one_line_or_train():
    """A hold-out of every training example is one line naming --val-fraction (it was scikit-learn's
    'test_size=24 should be ...'); one that leaves fewer examples than classes is drawn unstratified
    (it was 'The train_size = 1 should be greater or equal to the number of classes')."""
    n = len(data.digits_arrays()[1])  # the training examples, before the hold-out
    with pytest.raises(data.DatasetError, match=rf"^--val-fraction 0\.9999 holds out {n} of the {n} training "
                                                r"examples, leaving none to train on; give a fraction under"):
        data.load("digits", val_fraction=0.9999)
    s = data.load("digits", val_fraction=(n - 3) / n)
    assert (sum(1 for _ in s.train), sum(1 for _ in s.val)) == (3, n - 3)


def test_evaluation_reads_each_image_once_and_predict_takes_paths(tmp_path):
    """predict_logits walked the split twice (the labels, then model.predict): every file read and decoded
    twice, and labels paired with logits only if both passes came out alike. keras_vit.train.predict refused
    pathlib paths (float() of a PosixPath)."""
    import pathlib

    import keras
    import tensorflow as tf

    import keras_vit
    from keras_vit.train.evaluation import predict, predict_logits

    model = keras_vit.ViT(image_size=16, patch_size=4, hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1,
                          num_classes=3)
    reads = []
    images = np.random.default_rng(0).uniform(0, 255, (7, 16, 16, 3)).astype(np.float32)

    def read(i):
        reads.append(int(i))
        return images[int(i)]

    ds = tf.data.Dataset.range(7).map(
        lambda i: (tf.ensure_shape(tf.py_function(read, [i], tf.float32), (16, 16, 3)), tf.cast(i % 3, tf.int32)))
    logits, labels = predict_logits(model, ds, batch_size=3)
    assert sorted(reads) == list(range(7))
    np.testing.assert_array_equal(labels, np.arange(7) % 3)
    np.testing.assert_allclose(logits, keras.ops.convert_to_numpy(model(images)), atol=1e-5)
    _write_images(tmp_path / "d", n=1)
    path = next((tmp_path / "d" / "cat").iterdir())
    assert predict(model, pathlib.Path(path), top_k=1) == predict(model, str(path), top_k=1)
    assert len(predict(model, [pathlib.Path(path)] * 2, top_k=1)) == 2


@pytest.mark.parametrize("kwargs,message", [
    (dict(image_size=(0, 0)), r"image_size must be a positive integer up to 16384 or \(height, width\) of them, got \(0, 0\)"),
    (dict(image_size=2**70), r"image_size must be a positive integer up to 16384 .*, got 1180591620717411303424"),
    (dict(image_size="32"), "image_size must be a positive integer"),
    (dict(channels=2), "channels must be 1 or 3, got 2"),
    (dict(num_classes=0), "num_classes must be an integer >= 1, got 0"),
    (dict(shuffle_buffer=0), "shuffle_buffer must be None or an integer >= 1, got 0"),
])
def test_pipeline_arguments_are_one_line(kwargs, message):
    """pipeline() took image_size=(0, 0), channels=2 and shuffle_buffer=0 and failed inside TensorFlow when
    iterated; an int image_size (as ViT takes it) was 'int object is not iterable'."""
    s = data.load("digits")
    args = dict(image_size=(16, 16), batch_size=4, num_classes=10, training=True)
    with pytest.raises(data.DatasetError, match=message):
        data.pipeline(s.train, **{**args, **kwargs})
    (x, _), = data.pipeline(s.train, **{**args, "image_size": 16}).take(1)
    assert tuple(x.shape) == (4, 16, 16, 3)
