"""Input pipelines at scale: folder listing, bad images, TFRecord shards, seeded per-image
augmentation (keras_vit.data.folders / records / augment)."""
from __future__ import annotations

import functools
import json
import os
import time

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")

from click.testing import CliRunner  # noqa: E402

from keras_vit import data  # noqa: E402
from keras_vit import train as kt  # noqa: E402
from keras_vit.data import augment as A  # noqa: E402

TINY = dict(variant="Ti/4", image_size=16, hidden_size=32, num_layers=1, num_heads=2, mlp_dim=64,
            batch_size=8, learning_rate=3e-3, warmup_epochs=0.0, augment="none", jit_compile="none",
            mixed_precision="none", distribute="none")


def _colour_folder(root, n=16, size=(20, 24)):
    """Two classes told apart by colour (red / green); JPEG and PNG files."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i, cls in enumerate(("red", "green")):
        (root / cls).mkdir(parents=True)
        for j in range(n):
            img = rng.integers(0, 80, size + (3,), dtype=np.uint8)
            img[..., i] = 255
            Image.fromarray(img).save(root / cls / f"{j}.{'png' if j % 2 else 'jpg'}")
    return root


def test_listing_opens_no_file(tmp_path):
    root = _colour_folder(tmp_path / "imgs", n=3)
    for path in root.glob("*/*"):
        path.chmod(0)  # unreadable: listing must not open them
    try:
        files, labels, names = data.folders.list_images(str(root))
    finally:
        for path in root.glob("*/*"):
            path.chmod(0o644)
    assert names == ["green", "red"] and labels.tolist() == [0, 0, 0, 1, 1, 1]
    assert [os.path.basename(f) for f in files] == ["0.jpg", "1.png", "2.jpg"] * 2


@pytest.mark.slow
def test_listing_scales_to_100k_files(tmp_path):
    root = tmp_path / "big"
    for c in range(10):
        (root / f"c{c}").mkdir(parents=True)
        for j in range(10_000):  # 100k empty files
            open(root / f"c{c}" / f"{j}.jpg", "wb").close()
    (root / "c0" / "notes.txt").write_text("not an image")
    start = time.perf_counter()
    files, labels, names = data.folders.list_images(str(root))
    seconds = time.perf_counter() - start
    assert len(files) == 100_000 and names == [f"c{c}" for c in range(10)]
    assert np.bincount(labels).tolist() == [10_000] * 10 and files == sorted(files)
    assert seconds < 10.0, f"listing 100k files took {seconds:.1f} s"  # ~0.2 s on a 2-core laptop


def test_bad_image_fails_with_its_name_or_is_skipped(tmp_path):
    root = _colour_folder(tmp_path / "imgs", n=6)
    (root / "red" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really a JPEG")
    (root / "green" / "empty.png").write_bytes(b"")
    s = data.load(f"folder:{root}")  # listing does not open files
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        for split in (s.train, s.val):
            list(split)
    line = data.bad_image_line(info.value)
    assert line.startswith("cannot read image ") and line.endswith("(--skip-bad-images skips such files)")
    assert ("broken.jpg" in line) or ("empty.png" in line)
    s = data.load(f"folder:{root}", skip_bad_images=True)
    assert len(list(s.train)) + len(list(s.val)) == 12
    assert s.bad_images.paths == sorted([str(root / "red" / "broken.jpg"), str(root / "green" / "empty.png")])


@pytest.mark.slow
def test_cli_train_bad_image_default_fails_and_flag_skips(tmp_path):
    from keras_vit.cli.main import cli

    root = _colour_folder(tmp_path / "imgs", n=12)
    (root / "red" / "broken.jpg").write_bytes(b"not an image")
    args = ["train", "--dataset", f"folder:{root}", "--variant", "Ti/4", "--image-size", "16",
            "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--mlp-dim", "64",
            "--epochs", "1", "--batch-size", "8", "--augment", "none", "--jit", "none", "--val-fraction", "0.25"]
    failed = CliRunner().invoke(cli, args + ["--output", str(tmp_path / "run_fail")])
    assert failed.exit_code != 0 and "Traceback" not in failed.output
    errors = [ln for ln in failed.output.splitlines() if ln.startswith("Error:")]
    assert len(errors) == 1 and errors[0].startswith(f"Error: cannot read image {root / 'red' / 'broken.jpg'}: ")
    ok = CliRunner().invoke(cli, args + ["--output", str(tmp_path / "run_skip"), "--skip-bad-images"])
    assert ok.exit_code == 0, ok.output
    assert "1 bad images skipped" in ok.output
    listed = (tmp_path / "run_skip" / "bad_images.txt").read_text().splitlines()
    assert listed == [str(root / "red" / "broken.jpg")]
    assert json.loads((tmp_path / "run_skip" / "results.json").read_text())["bad_images"] == 1


@pytest.mark.slow
def test_records_round_trip_trains_like_the_folder(tmp_path):
    from keras_vit.cli.main import cli

    root = _colour_folder(tmp_path / "imgs", n=24)
    bad = CliRunner().invoke(cli, ["records", "--dataset", f"folder:{root}", "--output", str(tmp_path / "rec"),
                                   "--val-fraction", "2"])
    assert bad.exit_code == 2 and bad.output.strip() == "Error: val_fraction must be in (0, 1), got 2.0"
    out = CliRunner().invoke(cli, ["records", "--dataset", f"folder:{root}", "--output", str(tmp_path / "rec"),
                                   "--examples-per-shard", "10"])
    assert out.exit_code == 0, out.output
    assert out.output.startswith("train 43, val 5, test 5 examples in ")
    meta = json.loads((tmp_path / "rec" / "dataset.json").read_text())
    assert meta["class_names"] == ["green", "red"] and len(meta["shards"]["train"]) == 5
    first = tf.data.TFRecordDataset(str(tmp_path / "rec" / meta["shards"]["train"][0]))
    labels = {tf.train.Example.FromString(r.numpy()).features.feature["image/class/label"].int64_list.value[0]
              for r in first}
    assert labels == {0, 1}  # written in a seeded random order: class by class, this shard held green alone
    rec = data.load(f"records:{tmp_path / 'rec'}")
    folder = data.load(f"folder:{root}")
    assert rec.sizes == folder.sizes == (43, 5, 5)

    def content(ds):
        return sorted((int(y), round(float(tf.reduce_sum(x)), 1)) for x, y in ds)

    assert content(rec.train) == content(folder.train) and content(rec.val) == content(folder.val)
    results = {}
    for name in (f"records:{tmp_path / 'rec'}", f"folder:{root}"):
        cfg = kt.make_config(name, epochs=3, **TINY)
        results[name] = kt.train(cfg, output=str(tmp_path / data.slug(name)), verbose=0)["test"]["top1"]
    assert min(results.values()) >= 0.8, results  # colour classes: both learn them


def _shards(folder) -> list:
    return sorted(p.name for p in folder.iterdir() if p.suffix == ".tfrecord")


def test_records_rewrite_keeps_one_set_and_load_reads_the_listed_shards(tmp_path):
    root, rec = _colour_folder(tmp_path / "imgs", n=6), tmp_path / "rec"
    data.write_records(f"folder:{root}", str(rec), examples_per_shard=100)
    (rec / "notes.tfrecord").write_bytes(b"")  # not a name write_records gives: kept
    data.write_records(f"folder:{root}", str(rec), examples_per_shard=4)
    assert _shards(rec) == ["notes.tfrecord", "test-00000-of-00001.tfrecord", "train-00000-of-00003.tfrecord",
                            "train-00001-of-00003.tfrecord", "train-00002-of-00003.tfrecord", "val-00000-of-00001.tfrecord"]
    (rec / "train-00000-of-00009.tfrecord").write_bytes((rec / "train-00000-of-00003.tfrecord").read_bytes())
    s = data.load(f"records:{rec}")  # a stray shard that dataset.json does not list is not read
    assert len(list(s.train)) == s.sizes[0] == 11
    assert len(list(data.load(f"records:{rec}/train-*").train)) == 9  # a glob too; 2 of 11 held out
    (rec / "train-00001-of-00003.tfrecord").unlink()
    with pytest.raises(data.DatasetError) as info:
        data.load(f"records:{rec}")
    assert str(info.value) == (f"records shard {rec / 'train-00001-of-00003.tfrecord'} is missing "
                               f"({rec / 'dataset.json'} lists it); write the folder again with vitcli records")
    for source in (f"records:{rec}", f"records:{rec}/train-*"):  # its own input: refused before any write
        with pytest.raises(data.DatasetError, match="is the folder .* reads; give another folder"):
            data.write_records(source, str(rec))


def _stored(folder, split) -> list:
    """(bytes, label, file name) of every record of a split's shards, sorted."""
    meta = json.loads((folder / "dataset.json").read_text())
    out = []
    for name in meta["shards"][split]:
        for r in tf.data.TFRecordDataset(str(folder / name)):
            f = tf.train.Example.FromString(r.numpy()).features.feature
            out.append((f["image/encoded"].bytes_list.value[0], f["image/class/label"].int64_list.value[0],
                        f["image/filename"].bytes_list.value[0]))
    return sorted(out)


def test_records_from_records_copy_the_stored_files(tmp_path):
    """Re-sharding a records set decoded every image and wrote it as PNG (JPEGs 4.4x larger, file names
    lost): the stored bytes and names are copied, each split's the same, and a glob's hold-out too."""
    root, rec, again = _colour_folder(tmp_path / "imgs", n=6), tmp_path / "rec", tmp_path / "again"
    data.write_records(f"folder:{root}", str(rec), examples_per_shard=100)
    assert data.write_records(f"records:{rec}", str(again), examples_per_shard=3) == {"train": 11, "val": 1, "test": 1}
    assert len(json.loads((again / "dataset.json").read_text())["shards"]["train"]) == 4
    for split in ("train", "val", "test"):
        assert _stored(again, split) == _stored(rec, split)
    assert any(data.startswith(b"\xff\xd8") for data, _, _ in _stored(again, "train"))  # a JPEG, as it was
    glob = tmp_path / "glob"
    data.write_records(f"records:{rec}/train-*", str(glob), val_fraction=0.5)
    held = _stored(glob, "train") + _stored(glob, "val")
    assert sorted(held) == _stored(rec, "train") and len(_stored(glob, "val")) == 6
    assert _stored(glob, "test") == _stored(glob, "val")


def test_a_records_folder_being_written_is_refused_in_one_line(tmp_path):
    """Two `vitcli records --output SAME` at once: the second's clean-up removed shards the first had just
    listed in dataset.json, both exited 0, and the set did not load. The second is refused now."""
    from keras_vit.data.records import LOCK_FILE
    from keras_vit.files import hold_folder, release_folder

    root, rec = _colour_folder(tmp_path / "imgs", n=6), tmp_path / "rec"
    data.write_records(f"folder:{root}", str(rec), examples_per_shard=100)
    before = {p.name: p.read_bytes() for p in rec.iterdir()}
    held = hold_folder(rec, LOCK_FILE)  # another writer (flock: another open file conflicts, as another process)
    try:
        with pytest.raises(data.DatasetError, match=f"records folder '{rec}' is being written by another process "
                                                    f"\\(pid {os.getpid()}\\); wait for it"):
            data.write_records(f"folder:{root}", str(rec), examples_per_shard=4)
        assert {p.name: p.read_bytes() for p in rec.iterdir() if p.name != LOCK_FILE} == before
    finally:
        release_folder(held)
    data.write_records(f"folder:{root}", str(rec), examples_per_shard=4)
    assert LOCK_FILE not in os.listdir(rec) and len(data.load(f"records:{rec}").class_names) == 2


def test_damaged_records_folder_fails_naming_the_file(tmp_path):
    root, rec = _colour_folder(tmp_path / "imgs", n=6), tmp_path / "rec"
    data.write_records(f"folder:{root}", str(rec), examples_per_shard=100)
    meta, shard = rec / "dataset.json", rec / "train-00000-of-00001.tfrecord"
    good_meta, good_shard = meta.read_bytes(), shard.read_bytes()
    meta.write_text("{ not json")
    with pytest.raises(data.DatasetError, match=f"^{meta} is not valid JSON .*; vitcli records writes it"):
        data.load(f"records:{rec}")
    meta.write_bytes(good_meta)
    shard.write_text("this is not a TFRecord file")
    with pytest.raises(data.DatasetError, match=f"^records shard {shard} is not a whole TFRecord file"):
        data.load(f"records:{rec}")
    for damaged in (good_shard[:-100], good_shard[:200] + b"XXXX" + good_shard[204:]):  # cut short, a bad checksum
        shard.write_bytes(damaged)
        with pytest.raises(tf.errors.OpError) as info:
            list(data.load(f"records:{rec}").train)
        line = data.bad_image_line(info.value)  # the line the training loop and evaluation print
        assert line is not None and line.startswith(f"cannot read image records from shard {shard}: it is damaged "
                                                    "or truncated (") and line.endswith("vitcli records"), line
    shard.write_bytes(b"")  # emptied: read as an empty split's shard, it trained on fewer examples (all of them
    # skipped with --skip-bad-images, "bad_images": 0) or failed with a cardinality error naming no file
    with pytest.raises(data.DatasetError, match=f"^records shard {shard} is empty \\(0 bytes\\), but its train split "
                                                "holds examples"):
        data.load(f"records:{rec}")


def _readme_block(title: str) -> str:
    text = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    section = text[text.index(title):]
    return section[section.index("```python") + len("```python"):].split("```", 1)[0]


def test_readme_records_example_and_per_worker_shards(tmp_path):
    code = _readme_block("## Input pipelines").replace("/tmp/digits_records", str(tmp_path / "rec"))
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)  # noqa: S102 - the documented example, as written
    assert scope["counts"] == {"train": 1293, "val": 144, "test": 360}
    assert scope["images"].shape == (64, 32, 32, 3) and scope["labels"].shape == (64, 10)
    np.testing.assert_allclose(scope["labels"].numpy().sum(-1), 1.0, atol=1e-5)
    rec = scope["splits"]
    opts = tf.data.Options()
    opts.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.FILE
    ds = rec.train.map(lambda x, y: (tf.reduce_sum(x), y)).with_options(opts)
    # FILE auto-shard is what tf.distribute applies per worker; two workers, applied directly:
    from tensorflow.python.data.experimental.ops import distribute as tfd

    parts = [sorted((float(x), int(y)) for x, y in tfd._AutoShardDataset(ds, 2, w)) for w in range(2)]
    assert len(parts[0]) + len(parts[1]) == rec.sizes[0] == 1293 and min(map(len, parts)) >= 500
    assert sorted(parts[0] + parts[1]) == sorted((float(x), int(y)) for x, y in ds)  # disjoint, complete


def test_seeded_pipelines_repeat_and_differ_by_seed(tmp_path):
    root = _colour_folder(tmp_path / "imgs", n=8, size=(40, 48))

    def batches(seed, augment):  # a fresh load, as in a new run (file order is reshuffled per epoch)
        s = data.load(f"folder:{root}", seed=seed)
        ds = data.pipeline(s.train, image_size=(32, 32), batch_size=4, num_classes=2, training=True,
                           augment=augment, mixup=0.2, cutmix=1.0, seed=seed)
        return [(x.numpy(), y.numpy()) for x, y in ds.take(3)]

    for augment in ("randaugment", "inception"):
        a, b, c = batches(5, augment), batches(5, augment), batches(6, augment)
        assert all(np.array_equal(x1, x2) and np.array_equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
        assert not all(np.array_equal(x1, x2) for (x1, _), (x2, _) in zip(a, c))
        x = a[0][0]
        assert x.shape == (4, 32, 32, 3) and x.dtype == np.float32 and x.min() >= 0 and x.max() <= 255


def test_randaugment_ops_are_what_they_claim():
    from PIL import Image, ImageOps

    rng = np.random.default_rng(0)
    u8 = rng.integers(30, 200, (32, 40, 3)).astype(np.uint8)
    img = tf.constant(u8.astype(np.float32))
    seed = tf.constant([3, 4], tf.int64)
    for op in (A.shear, A.translation, A.rotation, A.brightness, A.color_degeneration, A.contrast):
        np.testing.assert_allclose(op(img, seed, 0.0).numpy(), u8, atol=1e-3, err_msg=op.__name__)
    np.testing.assert_allclose(A.posterization(img, seed, 0.25).numpy(),  # factor 0.25: 1 bit
                               np.asarray(ImageOps.posterize(Image.fromarray(u8), 1)), atol=0)
    np.testing.assert_allclose(A.equalization(img).numpy(), np.asarray(ImageOps.equalize(Image.fromarray(u8))), atol=1)
    np.testing.assert_allclose(A.auto_contrast(img).numpy(), np.asarray(ImageOps.autocontrast(Image.fromarray(u8))),
                               atol=1.01)
    np.testing.assert_allclose(A.solarization(img, seed, 0.0).numpy(), 255.0 - u8, atol=1e-3)  # threshold 0
    rot = A.rotation(tf.constant(np.ones((9, 9, 1), np.float32)), seed, 0.5).numpy()
    assert rot.shape == (9, 9, 1) and np.allclose(rot, 1.0)  # reflected borders: no black corners
    moved = A.translation(img, seed, 0.5).numpy()
    assert not np.allclose(moved, u8)
    out = A.rand_augment(img, seed)
    assert out.shape == img.shape and out.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 255.0


@functools.cache
def _tiny_colours_builder():
    """A tensorflow-datasets builder of generated images (two colour classes): prepared into a
    data folder offline, as a user prepares a real dataset before training from it."""
    import tensorflow_datasets as tfds

    class TinyColours(tfds.core.GeneratorBasedBuilder):
        """Two classes told apart by colour (red / green), 16x16 px."""

        VERSION = tfds.core.Version("1.0.0")

        def _info(self):
            return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(16, 16, 3)),
                "label": tfds.features.ClassLabel(names=["red", "green"])}), supervised_keys=("image", "label"))

        def _split_generators(self, dl_manager):
            return {"train": self._generate_examples(48, 0), "test": self._generate_examples(16, 1)}

        def _generate_examples(self, n, seed):
            rng = np.random.default_rng(seed)
            for i in range(n):
                img = rng.integers(0, 80, (16, 16, 3), dtype=np.uint8)
                img[..., i % 2] = 255
                yield i, {"image": img, "label": i % 2}

    return TinyColours


@pytest.mark.slow
def test_tfds_dataset_prepared_in_data_dir_trains_without_network(tmp_path, monkeypatch):
    pytest.importorskip("tensorflow_datasets")  # the [tfds] extra
    import socket

    from keras_vit.cli.main import cli

    _tiny_colours_builder()(data_dir=str(tmp_path / "tfds")).download_and_prepare()

    def no_network(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    args = ["train", "--dataset", "tfds:tiny_colours", "--data-dir", str(tmp_path / "tfds"), "--variant", "Ti/4",
            "--image-size", "16", "--hidden-size", "32", "--num-layers", "1", "--num-heads", "2", "--mlp-dim", "64",
            "--epochs", "4", "--batch-size", "8", "--lr", "0.003", "--warmup-epochs", "0", "--augment", "none",
            "--jit", "none", "--output", str(tmp_path / "run")]
    out = CliRunner().invoke(cli, args)
    assert out.exit_code == 0, out.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["test"]["top1"] >= 0.8  # colour classes: learned from the prepared files
    assert json.loads((tmp_path / "run" / "class_names.json").read_text()) == ["red", "green"]
    splits = data.load("tfds:tiny_colours", data_dir=str(tmp_path / "tfds"))
    assert [sum(1 for _ in s) for s in (splits.train, splits.val, splits.test)] == [43, 5, 16]  # 10% held out
    # a dataset neither registered nor prepared in the folder: one line, no download attempted
    missing = CliRunner().invoke(cli, [*args[:2], "tfds:not_prepared_here", *args[3:-1], str(tmp_path / "run2")])
    errors = [ln for ln in missing.output.splitlines() if ln.startswith("Error:")]
    assert missing.exit_code != 0 and "Traceback" not in missing.output and len(errors) == 1, missing.output
    assert errors[0].startswith("Error: could not load dataset 'tfds:not_prepared_here': ")
    assert not (tmp_path / "run2").exists()


def test_batched_warps_give_each_image_its_own_map():
    """affine_batch / translate_batch (the training pipeline's light and affine): image 0 of a batch is
    the per-image warp with the batch's seed, every image gets its own parameters, and zero ranges
    leave the batch unchanged."""
    rng = np.random.default_rng(2)
    batch = tf.constant(rng.uniform(0, 255, (6, 16, 16, 3)).astype(np.float32))
    seed = tf.constant([3, 4], tf.int64)
    for batched, single, args in ((A.affine_batch, A.affine, (10.0, 0.1, 1 / 16)),
                                  (A.translate_batch, A.translate, (1 / 16,))):
        out = batched(batch, seed, *args).numpy()
        np.testing.assert_allclose(out[0], single(batch[0], seed, *args).numpy(), atol=1e-4)
        alone = np.stack([single(batch[i], seed, *args).numpy() for i in range(6)])
        assert all(not np.allclose(out[i], alone[i], atol=1e-2) for i in range(1, 6))  # not one map for all
        zero = (0.0, 0.0, 0.0) if len(args) == 3 else (0.0,)
        np.testing.assert_allclose(batched(batch, seed, *zero).numpy(), batch.numpy(), atol=1e-3)


def test_pipeline_warps_batches_the_same_in_every_run(digits):
    """light and affine run once per batch after batching: still seeded (the same batches for the
    same seed, other ones for another seed) and different from epoch to epoch."""
    from keras_vit.data import batches

    x_tr, y_tr = digits[0][:96], digits[1][:96]

    def epochs(seed):
        ds = batches.pipeline(tf.data.Dataset.from_tensor_slices((x_tr, y_tr)), image_size=(16, 16),
                              batch_size=32, num_classes=10, training=True, augment="affine", seed=seed)
        return [np.concatenate([b[0].numpy() for b in ds]) for _ in range(2)]

    first, again, other = epochs(0), epochs(0), epochs(1)
    np.testing.assert_array_equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert not np.allclose(first[0], first[1]) and not np.allclose(first[0], other[0])
    assert batches.batch_augmenter("affine") is not None and batches.batch_augmenter("basic") is None


def test_affine_is_the_rotation_zoom_and_shift_it_draws():
    """A.affine warps each image by the rotation, zoom and shift drawn from its seed: the same map
    computed with scipy (bilinear, zeros outside), and the identity when every range is zero."""
    import math

    import scipy.ndimage

    rng = np.random.default_rng(1)
    img = rng.uniform(0, 255, (16, 20, 1)).astype(np.float32)
    seed = tf.constant([5, 6], tf.int64)
    np.testing.assert_allclose(A.affine(tf.constant(img), seed, 0.0, 0.0, 0.0).numpy(), img, atol=1e-3)
    out = A.affine(tf.constant(img), seed, 10.0, 0.1, 1 / 16).numpy()
    angle = float(A._uniform(A._sub(seed, 0), -10.0, 10.0)) * math.pi / 180
    zoom = float(A._uniform(A._sub(seed, 1), 0.9, 1.1))
    dy = float(A._uniform(A._sub(seed, 2), -1 / 16, 1 / 16)) * 16
    dx = float(A._uniform(A._sub(seed, 3), -1 / 16, 1 / 16)) * 20
    assert abs(angle) > 1e-3 and abs(zoom - 1) > 1e-3
    cy, cx = 7.5, 9.5
    yy, xx = np.mgrid[0:16, 0:20].astype(np.float64)
    u, v = xx - cx - dx, yy - cy - dy  # undo the shift, then rotate back by -angle and unzoom
    x_in = (math.cos(angle) * u + math.sin(angle) * v) / zoom + cx
    y_in = (-math.sin(angle) * u + math.cos(angle) * v) / zoom + cy
    want = scipy.ndimage.map_coordinates(img[..., 0], [y_in, x_in], order=1, mode="constant", cval=0.0)
    inside = (x_in > 0.01) & (x_in < 18.99) & (y_in > 0.01) & (y_in < 14.99)  # away from the border's blend
    np.testing.assert_allclose(out[..., 0][inside], want[inside], atol=1e-2)


def test_a_rewrite_that_fails_midway_leaves_the_earlier_set(tmp_path):
    """Shards were renamed into place one by one: a rewrite that failed on a later file (a dangling link,
    Ctrl-C) left the new train shards beside the old val/test shards and dataset.json, a mixed set."""
    root, rec = _colour_folder(tmp_path / "imgs", n=6), tmp_path / "rec"
    data.write_records(f"folder:{root}", str(rec), examples_per_shard=4)
    before = {p.name: p.read_bytes() for p in rec.iterdir()}
    first_class = sorted(p for p in root.iterdir() if p.is_dir())[0]
    (first_class / "zzz.png").symlink_to(tmp_path / "nothere.png")
    with pytest.raises((data.DatasetError, OSError)):
        data.write_records(f"folder:{root}", str(rec), examples_per_shard=4)
    assert {p.name: p.read_bytes() for p in rec.iterdir()} == before
