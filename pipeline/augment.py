"""The training preprocessing the config asks for, composed from `pipeline.ops`, for a whole batch.

The same function runs on the host (inside tf.data) or on the accelerator (inside the train step) as
`config.input.augment_on` says; a batch carries its own seed, so both places give the same result. The seed
is its step's, and the batch says where its images sit in the step's global batch (`positions`,
`global_batch_size`): each image's augmentation is a function of (seed, epoch, step, its place), the same
whichever replica's slice it is in, so a run may resume on another replica count (pipeline/ops.py).
"""

import math

import tensorflow as tf

from pipeline import cifar10
from pipeline import ops

FLIPS = ("none", "random", "alternating")
CUTOUT_FILLS = ("black", "mean")


def batch_seed(seed: tf.Tensor, epoch: tf.Tensor, step: tf.Tensor) -> tf.Tensor:
  """The seed of one global batch: a pure function of the run's seed, the epoch and the step in it. Every
  replica's slice of that batch draws from it (ops.Places)."""
  fold = tf.random.experimental.stateless_fold_in
  return fold(fold(seed, epoch), step)


def check(config) -> None:
  """Raises ValueError naming the bad `augment` field."""
  if config.flip not in FLIPS:
    raise ValueError(f"augment.flip={config.flip!r} is not one of: {', '.join(FLIPS)}")
  if not isinstance(config.cutout_inside, bool):
    raise ValueError(f"augment.cutout_inside={config.cutout_inside!r} must be true or false")
  if config.cutout_fill not in CUTOUT_FILLS:
    raise ValueError(f"augment.cutout_fill={config.cutout_fill!r} is not one of: {', '.join(CUTOUT_FILLS)}")
  for key in ("crop_padding", "rotation_degrees", "shift_fraction", "zoom_fraction", "cutout_size",
              "mixup_alpha", "cutmix_alpha", "brightness", "contrast"):
    if not 0 <= config[key] < math.inf:  # written so that nan fails too
      raise ValueError(f"augment.{key}={config[key]} must be >= 0 and finite")
  if not config.contrast < 1:
    raise ValueError(f"augment.contrast={config.contrast} must be < 1: a factor of 1 - contrast <= 0 would "
                     "blank or invert an image")


def train_preprocess(batch: dict, config, mean, std, num_classes: int = cifar10.NUM_CLASSES) -> dict:
  """Augments and normalises a training batch.

  Args:
    batch: `images` uint8 [N, H, W, C], `labels` int64 [N], `seed` [2] (its step's), `run_seed` [2],
      `epoch` scalar, `keys` int64 [N] (stable per image), `positions` int32 [N] (each image's row in the
      step's global batch) and `global_batch_size` int32 scalar.
    config: the `augment` ConfigDict (see configs/default.py); sizes in pixels.
    mean, std: per-channel normalisation in [0, 1] units.
    num_classes: the dataset's, for mixup's and cutmix's one-hot labels.
  Returns:
    {`images`: float32 [N, H, W, C], `labels`: int64 [N], or float32 [N, K] when mixup/cutmix is on,
    `keys`: the batch's own (what the trainer counts each epoch's images by)}.
  """
  images, labels = batch["images"], batch["labels"]
  seeds = tf.unstack(tf.random.experimental.stateless_split(batch["seed"], 7))  # 7 extends 6: same first 6
  places = ops.Places(batch["positions"], batch["global_batch_size"])
  n = tf.shape(images)[0]
  grid = ops.identity_grid(n, images.shape[1], images.shape[2])
  moved = False
  if config.rotation_degrees or config.shift_fraction or config.zoom_fraction:
    grid = ops.affine(grid, seeds[0], config.rotation_degrees, config.shift_fraction, config.zoom_fraction,
                      places)
    moved = True
  if config.crop_padding:
    grid, moved = ops.translate(grid, seeds[1], config.crop_padding, places), True
  if config.flip == "random":
    grid, moved = ops.flip(grid, ops.random_flip_mask(seeds[2], n, places)), True
  elif config.flip == "alternating":
    # The run's seed, not the batch's: an image must keep its half from epoch to epoch.
    grid, moved = ops.flip(grid, ops.alternating_flip_mask(batch["keys"], batch["epoch"], batch["run_seed"])), True
  if moved:
    images = ops.sample(images, grid)
  cutout = lambda x: ops.cutout(x, seeds[3], config.cutout_size, config.cutout_probability, places,
                                config.cutout_inside)
  if config.cutout_size and config.cutout_fill == "black":
    images = cutout(images)
  images = ops.normalize(images, mean, std)
  if config.brightness or config.contrast:
    images = ops.jitter(images, seeds[6], config.brightness, config.contrast, places)
  if config.cutout_size and config.cutout_fill == "mean":
    images = cutout(images)  # 0 once normalised: the normalisation's mean (airbench96: the data's mean colour)
  if config.mixup_alpha or config.cutmix_alpha:
    images, labels = _mix(images, tf.one_hot(labels, num_classes), seeds[4], seeds[5], config, places)
  return {"images": images, "labels": labels, "keys": batch["keys"]}


def _mix(images, onehot, choice_seed, mix_seed, config, places: ops.Places):
  """Mixup or cutmix on a global batch with probability `mix_probability`; cutmix when both are on and a
  coin says so (coins of the step's seed: every replica's slice tosses the same). Labels are one-hot
  probabilities either way, so every batch has the same structure."""
  u = tf.random.stateless_uniform([2], choice_seed)
  identity = lambda: (images, onehot)
  do_mixup = lambda: ops.mixup(images, onehot, mix_seed, config.mixup_alpha, places)
  do_cutmix = lambda: ops.cutmix(images, onehot, mix_seed, config.cutmix_alpha, places)
  if config.mixup_alpha and config.cutmix_alpha:
    mixed = lambda: tf.cond(u[1] < 0.5, do_mixup, do_cutmix)
  else:
    mixed = do_mixup if config.mixup_alpha else do_cutmix
  return tf.cond(u[0] < config.mix_probability, mixed, identity)
