"""tf.data assembly: shard files by `tf.distribute.InputContext`, read, decode, augment, batch, prefetch.

Each image of a training step is a pure function of (seed, epoch, step, its place in the step's global
batch): each epoch's order comes from a stateless shuffle seeded by the epoch, and augmentation draws for
the whole global batch from the step's seed, each replica keeping the rows of its own images
(pipeline/ops.py, `Places`). So a run resumed at step k builds the pipeline with `start_step=k` and sees
exactly the batches an uninterrupted run would, without replaying the ones before; in memory on any number
of replicas and workers, streaming on any number of replicas per worker (its shares of the shards are per
worker).

Two ways to feed training (`config.input.cache_in_memory`):
  - True (CIFAR-10 always fits): the whole split is read and decoded once into one uint8 tensor; every
    batch is a gather of shuffled indices from it, the same on every worker. Elements are whole batches, so per-element
    tf.data overhead is paid once per batch, not once per image.
  - False (data that does not fit in RAM): each pipeline reads its share of the files, shuffled and
    interleaved each epoch; records are
    shuffled within windows of `shuffle_buffer`, then parsed and decoded a batch at a time.

Elements are dicts. Training: `images`, `labels` after preprocessing; with `augment_on="device"` the raw
batch instead (`images` uint8, `labels`, `seed`, `run_seed`, `epoch`, `keys`, `positions`, `global_batch_size`)
for `augment.train_preprocess` in the train step. Evaluation: `images`, `labels`.
"""

import tensorflow as tf

from pipeline import augment
from pipeline import cpus
from pipeline import manifest as manifest_lib
from pipeline import ops
from pipeline import records

AUTOTUNE = tf.data.AUTOTUNE
_MAX_EPOCHS = 1 << 40  # "forever": training stops by step count, not by running out of data
_ALL = 1 << 40  # a batch size that takes a whole split in one element
_CHUNK = 2048  # records decoded by one op while loading a split into memory
# The functions given to tf.data have no tensor-dependent Python control flow, so AutoGraph need not
# rewrite them (and everything they call) first: that rewrite was most of a pipeline's build time.
_as_is = tf.autograph.experimental.do_not_convert


def _context(input_context: tf.distribute.InputContext | None) -> tf.distribute.InputContext:
  return input_context or tf.distribute.InputContext()


def _options() -> tf.data.Options:
  options = tf.data.Options()
  # Every dataset here keeps its order: a training batch is a pure function of (seed, epoch, step, its
  # rows in the global batch) in every mode, which is what lets a resume skip exactly the batches trained
  # before a stop.
  options.deterministic = True
  # Files are sharded here by hand; auto-sharding would shard them again.
  options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
  # Threads for the CPUs this process may run on: tf.data would size its pool and autotuning budget by the
  # affinity mask alone, which is the whole shared node where SLURM binds no CPUs (pipeline/cpus.py).
  threads = cpus.usable().count
  options.threading.private_threadpool_size = threads
  options.autotune.cpu_budget = threads
  return options


def _share(files: list[str], ctx: tf.distribute.InputContext, counts: list[int] | None = None,
           quota: int = 0) -> tuple[list[str], bool]:
  """This input pipeline's files, and whether it must further keep only every n-th of their records.

  Whole files when there are enough of them to go round and (training, with the files' record `counts`)
  every pipeline's files hold the `quota` records it takes per epoch; else every pipeline reads all the
  files in one common order and keeps every n-th record (more reading, but no pipeline runs short and
  wraps round while another drops records). Every pipeline takes the same decision.
  """
  n = ctx.num_input_pipelines
  if len(files) >= n and (counts is None or min(sum(counts[i::n]) for i in range(n)) >= quota):
    return files[ctx.input_pipeline_id::n], False
  return files, True


def _keep_share(records: tf.data.Dataset, by_record: bool, ctx: tf.distribute.InputContext) -> tf.data.Dataset:
  return records.shard(ctx.num_input_pipelines, ctx.input_pipeline_id) if by_record else records


def shard_records(files: list[str], input_context: tf.distribute.InputContext | None) -> tf.data.Dataset:
  """Serialized records of this input pipeline's share (see `_share`). Shares are disjoint and together
  complete."""
  ctx = _context(input_context)
  local, by_record = _share(files, ctx)
  return _keep_share(tf.data.TFRecordDataset(local), by_record, ctx)


def decode_records(serialized: tf.Tensor, shape: tuple[int, int, int] = records.cifar10.IMAGE_SHAPE,
                   num_classes: int = records.cifar10.NUM_CLASSES) -> dict[str, tf.Tensor]:
  """[N] serialized records of images of `shape` in `num_classes` classes -> `images` uint8 [N, *shape],
  `labels` int64 [N], `keys` int64 [N] (a hash of each record's id: stable per image, wherever it lands)."""
  features = records.check_batch(records.parse_batch(serialized), shape, num_classes)
  return {"images": records.decode_batch(features[records.ENCODED], features[records.FORMAT], features[records.ID],
                                         shape),
          "labels": features[records.LABEL],
          "keys": tf.strings.to_hash_bucket_fast(features[records.ID], 1 << 62)}


def decoder(manifest: dict):
  """`decode_records` for the dataset of `manifest`: its image shape and class count."""
  shape, num_classes = manifest_lib.image_shape(manifest), manifest_lib.num_classes(manifest)
  return lambda serialized: decode_records(serialized, shape, num_classes)


def _epoch_permutation(seed: tf.Tensor, epoch: tf.Tensor, num_records: tf.Tensor, needed: int) -> tf.Tensor:
  """`needed` indices into [0, num_records): a fresh permutation per epoch, wrapped round if short."""
  perm = tf.random.experimental.stateless_shuffle(
      tf.range(num_records), seed=tf.random.experimental.stateless_fold_in(seed, epoch))
  return tf.tile(perm, [(needed + num_records - 1) // num_records])[:needed]


def build_train_dataset(config, data_dir: str, *, steps_per_epoch: int, global_batch_size: int,
                        mean, std, input_context: tf.distribute.InputContext | None = None,
                        start_step: int = 0, run_id: str = "") -> tf.data.Dataset:
  """Endless training batches for one input pipeline: per-replica batches for each of its replicas.

  Args:
    config: the training config (`seed`, `augment`, `input`).
    data_dir: directory written by make_tfrecords.
    steps_per_epoch: train steps per epoch.
    global_batch_size: images per step over all replicas.
    mean, std: per-channel normalisation in [0, 1] units.
    input_context: from `distribute_datasets_from_function`; None = one pipeline feeding one replica.
    start_step: steps already trained; the dataset starts at the next one.
    run_id: this start's (the workdir's lease): names its tf.data service job, which two runs of one
      seed on one dispatcher (a learning-rate sweep) would otherwise share, splitting its batches.
  Returns:
    A dataset of dicts (see the module docstring).
  """
  ctx = _context(input_context)
  augment.check(config.augment)
  manifest = manifest_lib.load(data_dir)
  files = manifest_lib.split_files(data_dir, manifest, "train")
  layout = _Layout(ctx, global_batch_size, steps_per_epoch)
  first_epoch, skip = divmod(start_step, steps_per_epoch)
  decode = decoder(manifest)
  if config.input.cache_in_memory:
    batches = _in_memory_batches(files, decode, layout, config.seed, first_epoch)
  else:
    batches = _streaming_batches(files, manifest_lib.split_counts(manifest, "train"), decode, layout,
                                 config.seed, first_epoch, config)
  batches = batches.skip(skip * layout.local_replicas)
  if config.input.data_service:  # each service worker makes every n-th batch: each batch made once
    batches = batches.shard(tf.data.experimental.SHARD_HINT, tf.data.experimental.SHARD_HINT)
  if config.input.augment_on == "host":
    num_classes = manifest_lib.num_classes(manifest)
    batches = batches.map(_as_is(lambda b: augment.train_preprocess(b, config.augment, mean, std, num_classes)),
                          num_parallel_calls=AUTOTUNE, deterministic=True)
  elif config.input.augment_on != "device":
    raise ValueError(f"input.augment_on={config.input.augment_on!r} is not one of: host, device")
  batches = batches.prefetch(AUTOTUNE).with_options(_options())
  if config.input.data_service:
    batches = batches.apply(tf.data.experimental.service.distribute(
        processing_mode=tf.data.experimental.service.ShardingPolicy.HINT, service=config.input.data_service,
        job_name=f"train-{run_id or config.seed}-{ctx.input_pipeline_id}-{start_step}"))
  return batches


class _Layout:
  """Which replicas an input pipeline feeds, and with how many images each."""

  def __init__(self, ctx: tf.distribute.InputContext, global_batch_size: int, steps_per_epoch: int):
    self.replicas = ctx.num_replicas_in_sync
    self.local_replicas = ctx.num_replicas_in_sync // ctx.num_input_pipelines
    self.first_replica = ctx.input_pipeline_id * self.local_replicas
    self.batch = ctx.get_per_replica_batch_size(global_batch_size)
    self.steps_per_epoch = steps_per_epoch
    self.ctx = ctx


def _in_memory_batches(files, decode, layout: _Layout, seed: int, first_epoch: int) -> tf.data.Dataset:
  """Raw per-replica batches gathered from the whole train split, decoded once and held in memory.

  Every pipeline holds the whole split and draws the same permutation per epoch; replica r of step s
  gets rows [r * batch, (r + 1) * batch) of that step's global batch, with the step's seed and those
  rows' places (`_randomness`). So an image's place, pixels and augmentation do not depend on how many
  replicas there are or how they are spread over workers: a run resumed on 4 GPUs after 8, or on 2
  workers after 3, trains as it would have (tests/test_elastic.py), and a resumed run continues exactly.
  (Mixup and cutmix pair neighbouring places, so with an odd per-replica batch one image per replica is
  left unmixed, and which ones depends on the layout: BUILD.md.)
  """
  # Decoded in chunks on every core, then made one element: one op over the whole split ran on one core.
  everything = (tf.data.TFRecordDataset(files).batch(_CHUNK)
                .map(_as_is(decode), num_parallel_calls=AUTOTUNE, deterministic=True).unbatch().batch(_ALL).cache())
  base_seed = tf.constant([seed, 0], tf.int64)
  needed = layout.steps_per_epoch * layout.replicas * layout.batch

  def epoch_batches(epoch, data):
    perm = _epoch_permutation(base_seed, epoch, tf.shape(data["labels"], tf.int64)[0], needed)
    perm = tf.reshape(perm, [layout.steps_per_epoch, layout.replicas, layout.batch])
    mine = perm[:, layout.first_replica:layout.first_replica + layout.local_replicas]
    steps = tf.repeat(tf.range(layout.steps_per_epoch, dtype=tf.int64), layout.local_replicas)
    replicas = tf.tile(tf.range(layout.first_replica, layout.first_replica + layout.local_replicas),
                       [layout.steps_per_epoch])
    index = tf.data.Dataset.from_tensor_slices((steps, replicas, tf.reshape(mine, [-1, layout.batch])))
    return index.map(_as_is(lambda s, r, idx: dict(
        {k: tf.gather(v, idx) for k, v in data.items()}, epoch=epoch,
        **_randomness(base_seed, epoch, s, r, layout))))

  # Each epoch's element holds a reference to the cached tensors, not a copy.
  epochs = tf.data.Dataset.range(first_epoch, _MAX_EPOCHS)
  return tf.data.Dataset.zip(epochs, everything.repeat()).flat_map(_as_is(epoch_batches))


def _randomness(seed: tf.Tensor, epoch: tf.Tensor, step: tf.Tensor, replica: tf.Tensor,
                layout: _Layout) -> dict[str, tf.Tensor]:
  """What the augmentation of replica `replica`'s batch of step `step` (in `epoch`) draws from: the step's
  seed, the run's, and where its images sit in the step's global batch (rows [replica * batch,
  (replica + 1) * batch)). The same for an image at the same place on any layout."""
  return {"seed": augment.batch_seed(seed, epoch, step), "run_seed": seed,
          "positions": tf.cast(replica, tf.int32) * layout.batch + tf.range(layout.batch),
          "global_batch_size": tf.constant(layout.replicas * layout.batch, tf.int32)}


def _streaming_batches(files, counts, decode, layout: _Layout, seed: int, first_epoch: int,
                       config) -> tf.data.Dataset:
  """Raw per-replica batches read from this pipeline's share of the shards every epoch, shuffled in
  windows. Shares are disjoint and each holds what its pipeline takes per epoch, so an epoch whose batches
  cover the split reads every record exactly once over all pipelines.

  Step s of a pipeline takes the next `local_replicas * batch` records of its stream, its replicas in
  turn, whatever that split: so on the same number of workers (shares) any replica count trains the same
  images, augmented alike (`_randomness`). Another number of workers gives other shares, which a resume
  refuses (trainer/workdir.py).
  """
  ctx = layout.ctx
  batches_per_epoch = layout.steps_per_epoch * layout.local_replicas
  local, by_record = _share(files, ctx, counts, quota=batches_per_epoch * layout.batch)
  # The file order and augmentation are the same on every pipeline (sharing by record takes every n-th
  # record of one common stream; augmentation follows the global batch); windows are shuffled per pipeline.
  run_seed = tf.constant([seed, 0], tf.int64)
  base_seed = tf.constant([seed, ctx.input_pipeline_id], tf.int64)

  def one_epoch(epoch):
    # Stateless shuffles throughout: tf.data's shuffle() takes no tensor seed once op determinism is on.
    epoch_seed = tf.random.experimental.stateless_fold_in(base_seed, epoch)
    order = tf.random.experimental.stateless_shuffle(
        tf.range(len(local)), seed=tf.random.experimental.stateless_fold_in(run_seed, epoch))
    reader = (tf.data.Dataset.from_tensor_slices(tf.gather(tf.constant(local), order))
              .interleave(tf.data.TFRecordDataset, cycle_length=config.input.interleave_cycle,
                          num_parallel_calls=AUTOTUNE, deterministic=True))
    reader = _keep_share(reader, by_record, ctx)
    window = lambda i, records: tf.gather(records, tf.random.experimental.stateless_shuffle(
        tf.range(tf.shape(records)[0]), seed=tf.random.experimental.stateless_fold_in(epoch_seed, i)))
    shuffled = reader.batch(config.input.shuffle_buffer).enumerate().map(_as_is(window)).unbatch()
    return (shuffled.batch(layout.batch, drop_remainder=True).take(batches_per_epoch).enumerate()
            .map(_as_is(lambda b, s: dict(decode(s), epoch=epoch, **_randomness(
                run_seed, epoch, b // layout.local_replicas,
                layout.first_replica + tf.cast(b % layout.local_replicas, tf.int32), layout))),
                 num_parallel_calls=AUTOTUNE, deterministic=True))

  return tf.data.Dataset.range(first_epoch, _MAX_EPOCHS).flat_map(_as_is(one_epoch))


def build_prefix_dataset(data_dir: str, split: str, *, images: int, global_batch_size: int, mean, std,
                         input_context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
  """The first `images` records of `split` in file order (whole global batches only), unaugmented, as
  per-replica batches: every input pipeline reads the same prefix and keeps its own replicas' rows, so
  replica r gets rows [r * b, (r + 1) * b) of each global batch however replicas are spread over workers,
  and no replica gets an empty batch."""
  ctx = _context(input_context)
  manifest = manifest_lib.load(data_dir)
  files = manifest_lib.split_files(data_dir, manifest, split)
  decode = decoder(manifest)
  layout = _Layout(ctx, global_batch_size, steps_per_epoch=0)
  replica = lambda i: i % layout.replicas
  mine = lambda i, _: (replica(i) >= layout.first_replica) & (replica(i) < layout.first_replica + layout.local_replicas)
  whole = images // global_batch_size * global_batch_size
  return (tf.data.TFRecordDataset(files).take(whole).batch(layout.batch, drop_remainder=True).enumerate()
          .filter(_as_is(mine)).map(_as_is(lambda _, s: _preprocess(decode(s), mean, std)), num_parallel_calls=AUTOTUNE)
          .prefetch(AUTOTUNE).with_options(_options()))


def _preprocess(data: dict, mean, std) -> dict[str, tf.Tensor]:
  images = data["images"] if mean is None else ops.normalize(data["images"], mean, std)
  return {"images": images, "labels": data["labels"]}


def build_eval_dataset(data_dir: str, split: str, *, batch_size: int, mean=None, std=None,
                       input_context: tf.distribute.InputContext | None = None) -> tf.data.Dataset:
  """One pass over `split`, every record exactly once across all input pipelines, last batch partial.

  Returns:
    A dataset of {`images`: float32 [B, H, W, C] normalised by `mean`, `std` ([0, 1] units), or the
    uint8 pixels when they are None; `labels`}.
  """
  manifest = manifest_lib.load(data_dir)
  files = manifest_lib.split_files(data_dir, manifest, split)
  decode = decoder(manifest)
  return (shard_records(files, input_context).batch(batch_size)
          .map(_as_is(lambda s: _preprocess(decode(s), mean, std)), num_parallel_calls=AUTOTUNE)
          .prefetch(AUTOTUNE).with_options(_options()))
