"""Image ops: small named functions taking and returning tensors.

Every random op is stateless: it takes a `seed` of shape [2] and gives the same output for the same seed,
so a batch is a pure function of (seed, epoch, batch index) and a resumed run sees the same pixels. Ops
take a batch [N, H, W, C] or a single image [H, W, C].
"""

import tensorflow as tf


def _batched(op):
  """Lets a batch op accept one image too."""
  def wrapper(images, *args, **kwargs):
    if images.shape.rank == 3:
      return op(images[None], *args, **kwargs)[0]
    return op(images, *args, **kwargs)
  wrapper.__name__, wrapper.__doc__ = op.__name__, op.__doc__
  return wrapper


@_batched
def random_crop(images: tf.Tensor, seed: tf.Tensor, padding: int) -> tf.Tensor:
  """Reflect-pads by `padding` pixels and crops back to the original size at a random offset per image.

  The crop is two batched gathers (rows, then columns) rather than a per-image slice: one op for the batch.
  """
  if padding <= 0:
    return images
  n, h, w = tf.shape(images)[0], images.shape[1], images.shape[2]
  padded = tf.pad(images, [[0, 0], [padding, padding], [padding, padding], [0, 0]], mode="REFLECT")
  offsets = tf.random.stateless_uniform([2, n], seed, minval=0, maxval=2 * padding + 1, dtype=tf.int32)
  rows = offsets[0][:, None] + tf.range(h)[None, :]
  cols = offsets[1][:, None] + tf.range(w)[None, :]
  cropped = tf.gather(padded, rows, axis=1, batch_dims=1)
  return tf.gather(cropped, cols, axis=2, batch_dims=1)


@_batched
def random_flip(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Mirrors each image left-right with probability 1/2."""
  flip = tf.random.stateless_uniform([tf.shape(images)[0]], seed) < 0.5
  return tf.where(flip[:, None, None, None], tf.reverse(images, axis=[2]), images)


def normalize(images: tf.Tensor, mean, std) -> tf.Tensor:
  """uint8 (or float in [0, 255]) pixels -> float32 standardised per channel; mean/std in [0, 1] units."""
  mean = tf.constant(mean, tf.float32) * 255.0
  std = tf.constant(std, tf.float32) * 255.0
  return (tf.cast(images, tf.float32) - mean) / std


def augment(images: tf.Tensor, seed: tf.Tensor, config) -> tf.Tensor:
  """The train augmentation the config names (`config.augment`), applied in a fixed order.

  Args:
    images: uint8 [N, 32, 32, 3] or [32, 32, 3].
    seed: int32/int64 [2], the batch's seed.
    config: the `augment` ConfigDict: `crop_padding` (pixels; 0 = off), `flip` (bool).
  Returns:
    The augmented images, same shape and dtype.
  """
  crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  images = random_crop(images, crop_seed, config.crop_padding)
  if config.flip:
    images = random_flip(images, flip_seed)
  return images
