"""The run's data as the trainer sees it: the facts it takes from the manifest (normalisation, steps per
epoch) and the pipeline's datasets distributed over a strategy's replicas.

`pipeline/` knows nothing of strategies; this module is where its datasets meet one.
"""

import math
import time

import tensorflow as tf

from pipeline import augment
from pipeline import input_pipeline
from pipeline import manifest as manifest_lib
from pipeline import ops
from trainer import models
from trainer.faults import TrainingError

NORMALIZATIONS = {"centered": ((0.5, 0.5, 0.5), (1.0, 1.0, 1.0)),  # pixels / 255 - 0.5
                  "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}  # pixels / 255
DATA_INIT_IMAGES = 5000  # what data-dependent layers (layers.PatchWhitening) see before the first step


def normalization_for(config, manifest: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) in [0, 1] units for `config.input.normalization`: `dataset` (the train split's per-channel
  statistics from the manifest: z-score), `centered` or `unit`. The export bakes the same in."""
  if config.input.normalization == "dataset":
    return manifest_lib.normalization(manifest)
  if config.input.normalization not in NORMALIZATIONS:
    raise ValueError(f"input.normalization={config.input.normalization!r} is not one of: dataset, "
                     f"{', '.join(NORMALIZATIONS)}")
  return NORMALIZATIONS[config.input.normalization]


def model_shape(manifest: dict) -> models.DataShape:
  """What the model is built for: the dataset's image shape and class count."""
  return models.DataShape(manifest_lib.image_shape(manifest), manifest_lib.num_classes(manifest))


def steps_per_epoch_for(config, manifest: dict) -> int:
  """Full global batches in the train split, capped by `config.steps_per_epoch` when it is set."""
  if "train" not in manifest["splits"]:
    raise TrainingError(f"data_dir {config.data_dir} has no train split (it has {', '.join(manifest['splits'])}): "
                        "give make_tfrecords a source with train/ images to train on it")
  per_epoch = manifest_lib.num_examples(manifest, "train") // config.global_batch_size
  if config.steps_per_epoch:
    per_epoch = min(per_epoch, config.steps_per_epoch) if per_epoch else config.steps_per_epoch
  if per_epoch <= 0:
    raise TrainingError(f"global_batch_size={config.global_batch_size} is larger than the train split "
                        f"({manifest_lib.num_examples(manifest, 'train')} images)")
  return per_epoch


def train_dataset_fn(config, manifest: dict, steps_per_epoch: int, start_step: int, run_id: str = ""):
  """The function `distribute_datasets_from_function` calls once per input pipeline for training; `run_id`
  names the run's tf.data service job."""
  mean, std = normalization_for(config, manifest)

  def dataset_fn(ctx):
    return input_pipeline.build_train_dataset(
        config, config.data_dir, steps_per_epoch=steps_per_epoch, global_batch_size=config.global_batch_size,
        mean=mean, std=std, input_context=ctx, start_step=start_step, run_id=run_id)

  return dataset_fn


def eval_dataset(config, strategy, manifest: dict, split: str):
  """One split, unaugmented, in file order, distributed over the strategy's replicas in global batches
  of `config.eval_batch_size` rounded up to a multiple of the replicas (the batch changes no result, so it
  fits itself to 3 or 6 GPUs); only the first `config.eval_steps` of them when that is set."""
  mean, std = normalization_for(config, manifest)

  def dataset_fn(ctx):
    dataset = input_pipeline.build_eval_dataset(
        config.data_dir, split, batch_size=-(-config.eval_batch_size // ctx.num_replicas_in_sync), mean=mean,
        std=std, input_context=ctx)
    return dataset.take(config.eval_steps) if config.eval_steps else dataset

  return strategy.distribute_datasets_from_function(dataset_fn)


def eval_splits(manifest: dict) -> list[str]:
  """The splits a run is scored on, of those the manifest has."""
  return [split for split in ("validation", "test") if split in manifest["splits"]]


def bn_statistics_dataset(config, strategy, manifest: dict):
  """The first `config.bn_statistics_images` unaugmented train images (at least one global batch), the
  same prefix on every worker, each replica keeping its rows: what precise BatchNorm averages over."""
  images = max(min(config.bn_statistics_images, manifest_lib.num_examples(manifest, "train")),
               config.global_batch_size)
  mean, std = normalization_for(config, manifest)
  return strategy.distribute_datasets_from_function(lambda ctx: input_pipeline.build_prefix_dataset(
      config.data_dir, "train", images=images, global_batch_size=config.global_batch_size, mean=mean, std=std,
      input_context=ctx))


def first_train_images(config) -> dict:
  """The first DATA_INIT_IMAGES train records in file order, decoded (`images` uint8, `labels`): the same
  on every worker and run. What data-dependent layers are set from, and the input grid shows."""
  return next(iter(input_pipeline.build_eval_dataset(config.data_dir, "train", batch_size=DATA_INIT_IMAGES)))


def data_init_images(config, manifest: dict, first: dict) -> tf.Tensor:
  """`first_train_images` normalised as the model gets them."""
  return ops.normalize(first["images"], *normalization_for(config, manifest))


def input_grid(config, manifest: dict, first: dict) -> tf.Tensor:
  """A grid [1, 8H, 8W, C] of the first 64 of `first_train_images` (file order), through the config's
  augmentation with the first batch's seed at epoch 0 (the alternating flip keyed by position, not by
  record), then de-normalised: the kind of image the model is shown, for TensorBoard."""
  mean, std = normalization_for(config, manifest)
  side = min(8, math.isqrt(first["images"].shape[0]))
  seed = tf.constant([config.seed, 0], tf.int64)
  batch = {"images": first["images"][:side * side], "labels": first["labels"][:side * side],
           "seed": augment.batch_seed(seed, tf.constant(0, tf.int64), tf.constant(0, tf.int64)), "run_seed": seed,
           "epoch": tf.constant(0, tf.int64), "keys": tf.range(side * side, dtype=tf.int64),
           "positions": tf.range(side * side), "global_batch_size": tf.constant(side * side)}
  images = augment.train_preprocess(batch, config.augment, mean, std, manifest_lib.num_classes(manifest))["images"]
  images = ops.denormalize(images, mean, std)
  height, width, channels = images.shape[1:]
  rows = tf.reshape(images, [side, side, height, width, channels])  # grid row r holds images r*side...
  return tf.reshape(tf.transpose(rows, [0, 2, 1, 3, 4]), [1, side * height, side * width, channels])


def input_rate(config, manifest: dict) -> float:
  """Images/s of one host pipeline as configured (host-side augmentation) alone, over
  `input.probe_batches` batches after two of warm-up; the step's own rate is train/images_per_sec."""
  mean, std = normalization_for(config, manifest)
  host = config.copy_and_resolve_references()
  host.input.augment_on, host.input.data_service = "host", ""
  batches = iter(input_pipeline.build_train_dataset(host, config.data_dir, steps_per_epoch=1,
                                                    global_batch_size=config.global_batch_size, mean=mean, std=std))
  for _ in range(2):
    next(batches)
  start = time.perf_counter()
  for _ in range(config.input.probe_batches):
    next(batches)
  return config.input.probe_batches * config.global_batch_size / (time.perf_counter() - start)
