"""TFRecord shards: `write_records` converts a dataset, `records:GLOB` trains from the shards.

Each record is a tf.train.Example with the features
    image/encoded      bytes   the image file (JPEG/PNG/BMP/GIF) as stored, or PNG for array datasets
    image/class/label  int64   the class index, 0-based
    image/filename     bytes   the source file (optional; named in bad-image messages)
Shards are named `<split>-NNNNN-of-MMMMM.tfrecord` (split: train, val, test) next to a
`dataset.json` with the class names and the number of examples per split. Shards written by
other tools load when their features have these names and a `dataset.json` (or a
`class_names.txt`, one name per line) lies beside them; their file names choose the split
(train*, val*/validation*, test*; anything else counts as train).

`records:DIR` reads exactly the shards dataset.json lists (rewriting a folder removes the shards
of the set it replaces); a shard that is missing, not a TFRecord file or cut short fails with one
line naming it. Reading is sharded by file (tf.data's FILE auto-shard puts whole shards on each worker), shards
are interleaved and decoded on parallel threads in a fixed order, so a seeded run is repeatable.
"""
from __future__ import annotations

import glob as globlib
import json
import math
import os
import re
import shutil
import struct
import tempfile
from typing import Dict, List, Optional, Sequence, Union

import numpy as np

from keras_vit.files import FolderHeld, hold_folder, release_folder

FEATURE_IMAGE = "image/encoded"
FEATURE_LABEL = "image/class/label"
FEATURE_FILENAME = "image/filename"
METADATA = "dataset.json"
SPLITS = ("train", "val", "test")
SHARD_NAME = re.compile(r"(train|val|test)-\d{5}-of-\d{5}\.tfrecord")  # the names write_records gives
REWRITE_HINT = "write the folder again with vitcli records"
LOCK_FILE = ".writing"  # held by the process writing the folder (keras_vit.files.hold_folder)


def write_records(dataset: str, output: str, *, examples_per_shard: int = 1024, seed: int = 0,
                  val_fraction: float = 0.1) -> Dict[str, int]:
    """Write `dataset` (a registry name such as folder:PATH or digits) as TFRecord shards in
    `output` (train/val/test shards and dataset.json); returns the examples per split.

    Image files and the images of `records:` shards are stored as they are (no decoding or re-encoding, file
    names kept); array datasets as PNG."""

    from keras_vit.data import DatasetError, _folder_lists, load
    from keras_vit.data.folders import SKIP_HINT

    if examples_per_shard < 1:
        raise DatasetError(f"examples_per_shard must be >= 1, got {examples_per_shard}")
    if not 0.0 < val_fraction < 1.0:
        raise DatasetError(f"val_fraction must be in (0, 1), got {val_fraction!r}")
    if os.path.exists(output) and not os.path.isdir(output):
        raise DatasetError(f"records output {output!r} is a file; give a folder for the shards")
    source = os.path.expanduser(dataset[len("records:"):]) if dataset.startswith("records:") else None
    source = source if source is None or os.path.isdir(source) else os.path.dirname(source) or "."
    if source is not None and os.path.isdir(output) and os.path.isdir(source) and os.path.samefile(output, source):
        raise DatasetError(f"records output {output!r} is the folder {dataset!r} reads; give another folder")
    try:
        lists = _folder_lists(dataset[len("folder:"):], seed, val_fraction) if dataset.startswith("folder:") else None
    except DatasetError as exc:  # vitcli records has no --skip-bad-images: the line does not offer it
        raise DatasetError(str(exc).replace(SKIP_HINT, "")) from None
    if lists is None and source is not None:  # the stored bytes and names are copied, not decoded and re-encoded
        splits = load_records(dataset[len("records:"):], seed, val_fraction, raw=True)
    else:
        splits = None if lists is not None else load(dataset, seed=seed, val_fraction=val_fraction)
    class_names = lists[3] if lists is not None else splits.class_names
    made = not os.path.isdir(output)  # the folder appears once the dataset loads; gone again if the writing fails
    os.makedirs(output, exist_ok=True)
    try:
        held = hold_folder(output, LOCK_FILE)
    except FolderHeld as exc:  # two writers: the second's clean-up removed the first's shards (a set that failed)
        raise DatasetError(f"records folder {output!r} is being written by another process (pid {exc.pid}); "
                           "wait for it to finish, or give another --output") from None
    try:
        return _write_shards(output, dataset, lists, splits, class_names, examples_per_shard, seed)
    except BaseException:
        if made:
            shutil.rmtree(output, ignore_errors=True)
        raise
    finally:
        release_folder(held)


def _write_shards(output: str, dataset: str, lists, splits, class_names, examples_per_shard: int,
                  seed: int = 0) -> Dict[str, int]:
    """write_records' work once the dataset is loaded and `output` exists. A folder's training files are
    written in a seeded random order, not class by class: the reader interleaves 8 shards and shuffles
    in a buffer, which cannot mix a shard set sorted by class (a batch of 32 from 100 classes held
    10.6 of them, against 27.3 from the folder), as TF-slim's and tfds' writers shuffle too."""
    from keras_vit.files import write_json

    counts: Dict[str, int] = {}
    shards: Dict[str, List[str]] = {}
    # Every shard is written in a folder of its own and moved in only once the whole set is written: a set
    # that fails midway (an unreadable file, Ctrl-C) leaves the folder's earlier set as it was.
    staging = tempfile.mkdtemp(dir=output, prefix=".staging-")
    try:
        _write_splits(staging, lists, splits, examples_per_shard, seed, counts, shards)
        for names in shards.values():
            for name in names:
                os.replace(os.path.join(staging, name), os.path.join(output, name))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    write_json(os.path.join(output, METADATA), {
        "class_names": list(class_names), "examples": counts, "shards": shards,
        "features": {FEATURE_IMAGE: "bytes", FEATURE_LABEL: "int64", FEATURE_FILENAME: "bytes"},
        "source": dataset})
    _remove_replaced_shards(output, {name for names in shards.values() for name in names})
    return counts


def _write_splits(folder: str, lists, splits, examples_per_shard: int, seed: int, counts: Dict[str, int],
                  shards: Dict[str, List[str]]) -> None:
    """Write every split's shards into `folder`, filling `counts` and `shards` (split -> shard names)."""
    import tensorflow as tf

    for i, split in enumerate(SPLITS):
        if lists is not None:
            files, labels = lists[i]
            if split == "train":
                order = np.random.RandomState(seed).permutation(len(files))
                files, labels = [files[j] for j in order], [labels[j] for j in order]
            examples = ((_read(f), int(y), f) for f, y in zip(files, labels))
            n = len(files)
        else:
            ds = (splits.train, splits.val, splits.test)[i]
            n = int(ds.cardinality()) if int(ds.cardinality()) >= 0 else sum(1 for _ in ds)
            if len(ds.element_spec) == 3:  # records: (bytes, label, file name) as stored
                examples = ((data.numpy(), int(y), name.numpy()) for data, y, name in ds)
            else:
                examples = ((tf.io.encode_png(tf.cast(tf.clip_by_value(tf.round(x), 0, 255), tf.uint8)).numpy(),
                             int(y), "") for x, y in ds)
        num = max(1, math.ceil(n / examples_per_shard))
        names = [f"{split}-{k:05d}-of-{num:05d}.tfrecord" for k in range(num)]
        it = iter(examples)
        for k, name in enumerate(names):
            with tf.io.TFRecordWriter(os.path.join(folder, name)) as w:
                for _ in range(min(examples_per_shard, n - k * examples_per_shard)):
                    data, label, fname = next(it)
                    w.write(_example(data, label, fname))
        counts[split] = n
        shards[split] = names


def _remove_replaced_shards(output: str, keep: set) -> None:
    """Remove the shards of an earlier set in `output` (only names write_records gives), once the
    new set and its dataset.json are complete, so the folder holds one set."""
    for entry in os.scandir(output):
        if entry.is_file() and SHARD_NAME.fullmatch(entry.name) and entry.name not in keep:
            os.remove(entry.path)


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def _example(data: bytes, label: int, filename: Union[str, bytes]) -> bytes:
    import tensorflow as tf

    name = filename if isinstance(filename, bytes) else filename.encode()
    feature = {
        FEATURE_IMAGE: tf.train.Feature(bytes_list=tf.train.BytesList(value=[data])),
        FEATURE_LABEL: tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
        FEATURE_FILENAME: tf.train.Feature(bytes_list=tf.train.BytesList(value=[name])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def _split_of(path: str) -> str:
    base = os.path.basename(path).lower()
    if base.startswith(("val", "validation")):
        return "val"
    if base.startswith("test"):
        return "test"
    return "train"


def _metadata(folder: str) -> Optional[dict]:
    """dataset.json (or class_names.txt) beside the shards; a damaged dataset.json is a one-line DatasetError."""
    from keras_vit.data import DatasetError

    path = os.path.join(folder, METADATA)
    if os.path.isfile(path):
        with open(path) as f:
            try:
                meta = json.load(f)
            except (json.JSONDecodeError, UnicodeDecodeError) as exc:
                raise DatasetError(f"{path} is not valid JSON ({str(exc).splitlines()[0]}); vitcli records writes it: "
                                   "run it again for this folder") from None
        if not isinstance(meta, dict) or not isinstance(meta.get("class_names", []), list) \
                or not isinstance(meta.get("shards", {}), dict):
            raise DatasetError(f"{path} is not a records description (expected an object with a class_names list "
                               f"and a shards object, as vitcli records writes it); {REWRITE_HINT}")
        return meta
    path = os.path.join(folder, "class_names.txt")
    if os.path.isfile(path):
        with open(path) as f:
            return {"class_names": [ln.strip() for ln in f if ln.strip()]}
    return None


def load_records(pattern: str, seed: int, val_fraction: float, bad=None, evaluation: bool = False,
                 shuffle_seed: Optional[int] = None, raw: bool = False):
    """The Splits of `records:DIR` (the shards its dataset.json lists, else all its *.tfrecord) or
    `records:GLOB` (the matching shards; those dataset.json lists, when it lists them). With
    `evaluation`, shards without training ones (records:DIR/test-*) are every split. With `raw`, the
    splits hold (stored bytes, label, file name), not decoded images: write_records copies them."""
    from keras_vit.data import DatasetError, Splits

    pattern = os.path.expanduser(pattern)
    folder = pattern if os.path.isdir(pattern) else None
    files = None if folder else sorted(f for f in globlib.glob(pattern) if os.path.isfile(f) and not f.endswith(".json"))
    if folder is None and files:
        folder = os.path.dirname(files[0])
    meta = _metadata(folder) if folder else None
    listed = _listed_shards(meta, folder) if meta else None
    if files is None:
        files = sorted(f for names in listed.values() for f in names) if listed \
            else sorted(f for f in globlib.glob(os.path.join(folder, "*.tfrecord")) if os.path.isfile(f))
    elif listed:  # a glob reads only the current set, not shards dataset.json does not list
        current = {os.path.abspath(f) for names in listed.values() for f in names}
        files = [f for f in files if os.path.abspath(f) in current]
    if not files:
        raise DatasetError(f"records:{pattern} matches no files (expected TFRecord shards, e.g. records:DIR/train-*.tfrecord)")
    if not meta or not meta.get("class_names"):
        raise DatasetError(f"records:{pattern}: no {METADATA} or class_names.txt beside the shards in {folder} "
                           "(keras_vit.data.write_records writes it)")
    sizes_of = {f: _shard_size(f) for f in files}
    n_cls = len(meta["class_names"])
    by_split: Dict[str, List[str]] = {s: [f for f in files if _split_of(f) == s] for s in SPLITS}
    known = _known_examples(meta, listed, by_split)
    for split, shards in by_split.items():  # an empty split writes one empty shard; a split with examples, none
        empty = [f for f in shards if sizes_of[f] == 0]
        if empty and (len(empty) < len(shards) or known.get(split)):
            raise DatasetError(f"records shard {empty[0]} is empty (0 bytes), but its {split} split holds examples; "
                               f"{REWRITE_HINT}")
    if evaluation and not by_split["train"]:
        split = "test" if by_split["test"] else "val"
        scored = _records(by_split[split], sizes_of, bad, n_cls)
        n = _known_examples(meta, listed, by_split).get(split)
        return Splits(scored, scored, scored, list(meta["class_names"]), (None, None, 3), bad,
                      (n, n, n) if isinstance(n, int) else None)
    if not by_split["train"]:
        raise DatasetError(f"records:{pattern} has no training shards (file names starting 'train')")
    examples = _known_examples(meta, listed, by_split)
    train = _records(by_split["train"], sizes_of, bad, n_cls, shuffle_seed=seed if shuffle_seed is None else shuffle_seed,
                     raw=raw)
    if by_split["val"]:
        val = _records(by_split["val"], sizes_of, bad, n_cls, raw=raw)
    else:  # hold out every k-th training example (seeded offset)
        k = max(2, int(round(1 / val_fraction)))
        offset = seed % k

        def held_out(i, *example):
            return i % k == offset

        def kept(i, *example):
            return i % k != offset

        def drop_index(i, *example):
            return example

        val = _records(by_split["train"], sizes_of, bad, n_cls, indexed=True, raw=raw).filter(held_out).map(drop_index)
        train = _records(by_split["train"], sizes_of, bad, n_cls, indexed=True, raw=raw).filter(kept).map(drop_index)
        if isinstance(examples.get("train"), int):
            n_val = len(range(offset, examples["train"], k))
            examples = {"train": examples["train"] - n_val, "val": n_val,
                        "test": examples["test"] if by_split["test"] else n_val}
    test = _records(by_split["test"], sizes_of, bad, n_cls, raw=raw) if by_split["test"] else val
    sizes = None
    if all(isinstance(examples.get(s), int) for s in SPLITS):
        sizes = (examples["train"], examples["val"], examples["test"])
        if sizes[0] > 0 and bad is None and not raw:
            train = train.apply(_assert_cardinality(sizes[0]))
    return Splits(train, val, test, list(meta["class_names"]), (None, None, 3), bad, sizes)


def _listed_shards(meta: dict, folder: str) -> Optional[Dict[str, List[str]]]:
    """{split: shard paths} that dataset.json lists (None if it lists none); a listed shard that
    is missing is a one-line DatasetError."""
    from keras_vit.data import DatasetError

    shards = meta.get("shards")
    if not shards:
        return None
    path = os.path.join(folder, METADATA)
    listed: Dict[str, List[str]] = {}
    for split, names in shards.items():
        if split not in SPLITS or not isinstance(names, list) or not all(isinstance(n, str) for n in names):
            raise DatasetError(f"{path}: shards[{split!r}] is not a list of shard file names of a split "
                               f"({', '.join(SPLITS)}); {REWRITE_HINT}")
        listed[split] = [os.path.join(folder, name) for name in names]
    for paths in listed.values():
        for shard in paths:
            if not os.path.isfile(shard):
                raise DatasetError(f"records shard {shard} is missing ({path} lists it); {REWRITE_HINT}")
    return listed


def _known_examples(meta: dict, listed: Optional[Dict[str, List[str]]], by_split: Dict[str, List[str]]) -> dict:
    """dataset.json's examples per split, kept only for splits read whole (all the shards it lists)."""
    examples = {s: n for s, n in (meta.get("examples") or {}).items()
                if s in SPLITS and (listed is None or sorted(by_split[s]) == sorted(listed.get(s, [])))}
    if not by_split["test"] and by_split["val"]:
        examples["test"] = examples.get("val")  # the test split is the val split then
    return examples


def _shard_size(path: str) -> int:
    """The size of the shard `path`, after a cheap check of its first record header, so a file
    that is not a TFRecord file (or is shorter than one record) fails here by name."""
    from keras_vit.data import DatasetError

    size = os.path.getsize(path)
    if size == 0:  # an empty split's shard
        return size
    with open(path, "rb") as f:
        head = f.read(8)
    length = struct.unpack("<Q", head)[0] if len(head) == 8 else None
    if length is None or length + 16 > size:
        raise DatasetError(f"records shard {path} is not a whole TFRecord file (its first record does not fit in its "
                           f"{size} bytes); {REWRITE_HINT}")
    return size


def _assert_cardinality(n: int):
    import tensorflow as tf

    return tf.data.experimental.assert_cardinality(n)


def _records(files: Sequence[str], sizes_of: Dict[str, int], bad, num_classes: int, indexed: bool = False,
             shuffle_seed: Optional[int] = None, raw: bool = False):
    """(image, label) of the shards `files` (sizes in `sizes_of`): read interleaved, each checked
    whole (_whole_shard), parsed and decoded in order; a label outside 0..num_classes-1 fails by
    name. With `shuffle_seed` (and not `indexed`) the shard order is reshuffled each epoch."""
    import tensorflow as tf

    from keras_vit.data.folders import BAD_IMAGE_PREFIX, checked_images

    AUTO = tf.data.AUTOTUNE
    names = tf.data.Dataset.from_tensor_slices((list(files), [sizes_of[f] for f in files]))
    if shuffle_seed is not None and not indexed:
        names = names.shuffle(len(files), seed=shuffle_seed, reshuffle_each_iteration=True)
    ds = names.interleave(_whole_shard, cycle_length=min(len(files), 8), block_length=1,
                          num_parallel_calls=AUTO, deterministic=True)
    spec = {FEATURE_IMAGE: tf.io.FixedLenFeature([], tf.string),
            FEATURE_LABEL: tf.io.FixedLenFeature([], tf.int64),
            FEATURE_FILENAME: tf.io.FixedLenFeature([], tf.string, default_value="")}

    def parse(record):
        ex = tf.io.parse_single_example(record, spec)
        name = tf.where(tf.strings.length(ex[FEATURE_FILENAME]) > 0, ex[FEATURE_FILENAME], "<record>")
        label = ex[FEATURE_LABEL]
        ok = tf.logical_and(label >= 0, label < num_classes)
        msg = tf.strings.join([BAD_IMAGE_PREFIX, name, ": its label ", tf.strings.as_string(label),
                               f" is not a class index 0..{num_classes - 1} of the {num_classes} classes named "
                               f"beside the shards ({FEATURE_LABEL} is 0-based)"])  # no quote: Assert escapes it
        with tf.control_dependencies([tf.debugging.Assert(ok, [msg], summarize=1)]):
            label = tf.cast(tf.identity(label), tf.int32)
        if raw:  # as stored, for write_records: no decoding, the file name as it was (maybe none)
            return ex[FEATURE_IMAGE], label, ex[FEATURE_FILENAME]
        return name, ex[FEATURE_IMAGE], label

    ds = ds.map(parse, num_parallel_calls=AUTO)
    if raw:
        return ds.enumerate().map(lambda i, e: (i, *e)) if indexed else ds
    if indexed:
        ds = ds.enumerate()
        ds = ds.map(lambda i, e: (e[0], e[1], (i, e[2])))
        ds = checked_images(ds, bad)
        return ds.map(lambda x, iy: (iy[0], x, iy[1]))
    return checked_images(ds, bad)


def _whole_shard(path, size):
    """The records of the shard `path`, failing after its last whole record unless those records
    fill its `size` bytes: a damaged or cut-short shard fails by name, not with TensorFlow's
    nameless 'corrupted/truncated record'. The line starts with BAD_IMAGE_PREFIX, so the training
    loop, evaluation and batches report it as they report an image that does not decode."""
    import tensorflow as tf

    from keras_vit.data.folders import BAD_IMAGE_PREFIX

    end = tf.data.Dataset.from_tensors((tf.constant(b""), True))
    records = tf.data.TFRecordDataset(path).ignore_errors().map(lambda r: (r, False)).concatenate(end)

    def count(total, elem):  # bytes of whole records so far: each is its data plus 16 bytes of framing
        return total + tf.cast(tf.strings.length(elem[0]), tf.int64) + 16, (elem[0], elem[1], total)

    def check(record, last, total):
        ok = tf.logical_or(tf.logical_not(last), tf.equal(total, tf.cast(size, tf.int64)))
        msg = tf.strings.join([BAD_IMAGE_PREFIX, "records from shard ", path, ": it is damaged or truncated (",
                               tf.strings.as_string(total), " of its ", tf.strings.as_string(size),
                               " bytes are whole records); " + REWRITE_HINT])
        with tf.control_dependencies([tf.debugging.Assert(ok, [msg], summarize=1)]):
            return tf.identity(record), last

    checked = records.scan(tf.constant(0, tf.int64), count).map(check)
    return checked.filter(lambda record, last: tf.logical_not(last)).map(lambda record, last: record)
