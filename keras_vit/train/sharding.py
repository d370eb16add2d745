"""Which share of the data each worker of a cluster reads: tf.data auto-shard policies per
source, image folders split by file before decoding, and endless training streams where the
workers' shares can differ in size."""
from __future__ import annotations

from typing import Optional, Tuple

from keras_vit.train.distribute import Cluster


def file_share(cluster: Cluster, dataset: str) -> Optional[Tuple[int, int]]:
    """(workers, this worker's index) when this worker should read only its share of an image
    folder's training files (TensorFlow clusters; Keras shards JAX processes' batches itself)."""
    if cluster.multi_worker and cluster.backend == "tensorflow" and dataset.startswith("folder:"):
        return cluster.num_workers, cluster.index
    return None


def uneven_shares(cluster: Cluster, dataset: str) -> bool:
    """Whether this worker's share of the training data can differ in size from the others'
    (image folders, TFRecord shards and tfds files in a TensorFlow cluster). A worker whose share
    ran out first would get empty batches, which the convolution's gradient cannot take, so such
    training streams are endless and every worker takes the same steps per epoch."""
    return (cluster.multi_worker and cluster.backend == "tensorflow"
            and dataset.startswith(("folder:", "records:", "tfds:")))


def shard_datasets(cluster: Cluster, dataset: str, batch_size: int, train, *evaluation):
    """The pipelines with the auto-shard policy for `dataset`: each worker reads its share.

    An image folder's training split is already this worker's share of the files (file_share:
    each worker decodes only its own), so it is not sharded again (OFF); tf.distribute then
    takes each step's per-worker batch from it. In-memory arrays and the folder's validation
    and test files shard by DATA: every worker walks the same order and keeps its slice of each
    global batch (every example evaluated once). tfds and TFRecord files shard AUTO: by FILE when
    there are at least as many files as workers, else by DATA (see uneven_shares). On JAX, Keras
    shards only batches of a known size, so validation and test drop their last partial batch.
    """
    if not cluster.multi_worker:
        return (train, *evaluation)
    import tensorflow as tf

    policy = tf.data.experimental.AutoShardPolicy

    def with_policy(ds, chosen):
        options = tf.data.Options()
        options.experimental_distribute.auto_shard_policy = chosen
        return ds.with_options(options)

    file_based = dataset.startswith(("tfds:", "records:"))
    shared = policy.AUTO if file_based else policy.DATA
    if cluster.backend == "jax":
        evaluation = tuple(p.rebatch(batch_size, drop_remainder=True) for p in evaluation)
    own = file_share(cluster, dataset) is not None
    return (with_policy(train, policy.OFF if own else shared), *(with_policy(p, shared) for p in evaluation))
