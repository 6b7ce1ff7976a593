"""Image ops: small named functions taking and returning tensors.

Every random op is stateless: it takes a `seed` of shape [2] and gives the same output for the same seed,
so a batch is a pure function of (seed, epoch, batch index) and a resumed run sees the same pixels.

Geometric ops (translate, flip, rotate/shift/zoom) do not move pixels: they transform a sampling grid of
source coordinates, and `sample` reads all images' pixels through it with one gather. Moving pixels once
instead of once per op is what makes the default augmentation fast: a crop by `tf.pad` + gathers was
several times slower (docs/results.md). Pixel ops (cutout, mixup, cutmix) work on the images themselves.

Ops take a batch [N, H, W, C] or (where marked) a single image [H, W, C].
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


# --- sampling grids ----------------------------------------------------------------------------------------

def identity_grid(batch_size, height: int, width: int) -> tuple[tf.Tensor, tf.Tensor]:
  """Source (row, col) coordinates that reproduce each image: float32 [N, H, 1] and [N, 1, W].

  Grids broadcast: translate and flip keep rows and cols separable; `affine` makes them [N, H, W].
  """
  rows = tf.tile(tf.range(height, dtype=tf.float32)[None, :, None], [batch_size, 1, 1])
  cols = tf.tile(tf.range(width, dtype=tf.float32)[None, None, :], [batch_size, 1, 1])
  return rows, cols


def translate(grid, seed: tf.Tensor, max_pixels: int):
  """Shifts each image by a random whole number of pixels in [-max_pixels, max_pixels] on each axis; with
  reflection at the borders this is the classic reflect-pad-by-`max_pixels` random crop."""
  rows, cols = grid
  n = tf.shape(rows)[0]
  offsets = tf.random.stateless_uniform([2, n], seed, -max_pixels, max_pixels + 1, dtype=tf.int32)
  offsets = tf.cast(offsets, tf.float32)
  return rows + offsets[0][:, None, None], cols + offsets[1][:, None, None]


def flip(grid, flip_mask: tf.Tensor):
  """Mirrors left-right the images where `flip_mask` [N] (bool) is true."""
  rows, cols = grid
  width = tf.cast(tf.shape(cols)[2], tf.float32)
  return rows, tf.where(flip_mask[:, None, None], width - 1.0 - cols, cols)


def random_flip_mask(seed: tf.Tensor, batch_size) -> tf.Tensor:
  """Each image flipped with probability 1/2."""
  return tf.random.stateless_uniform([batch_size], seed) < 0.5


def alternating_flip_mask(image_keys: tf.Tensor, epoch: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """airbench's alternating flip: a fixed random half of the images is flipped in even epochs, the other
  half in odd epochs, so every image is seen both ways every two epochs.

  Args:
    image_keys: int64 [N], a stable key per image (e.g. a hash of its id), whatever batch it lands in.
    epoch: the epoch number.
    seed: [2]; picks which half starts flipped.
  """
  mixed = (tf.cast(image_keys, tf.int64) + tf.cast(seed[0], tf.int64)) * 2654435761  # multiplicative hash
  bit = tf.bitwise.bitwise_and(tf.bitwise.right_shift(mixed, 16), 1)
  return tf.not_equal(bit, tf.cast(epoch, tf.int64) % 2)


def affine(grid, seed: tf.Tensor, rotation_degrees: float, shift_fraction: float, zoom_fraction: float):
  """Random rotation in ±`rotation_degrees`, shift in ±`shift_fraction` of the size on each axis and zoom
  by a factor in [1 - zoom_fraction, 1 + zoom_fraction], about the image centre (ImageDataGenerator's
  rotation_range / width_shift_range / height_shift_range / zoom_range)."""
  rows, cols = grid
  n = tf.shape(rows)[0]
  height, width = tf.cast(tf.shape(rows)[1], tf.float32), tf.cast(tf.shape(cols)[2], tf.float32)
  u = tf.random.stateless_uniform([5, n], seed, -1.0, 1.0)
  angle = u[0] * rotation_degrees * (3.141592653589793 / 180.0)
  zoom = 1.0 + u[1] * zoom_fraction
  dy, dx = u[2] * shift_fraction * height, u[3] * shift_fraction * width
  cy, cx = (height - 1.0) / 2.0, (width - 1.0) / 2.0
  y, x = rows - cy, cols - cx  # broadcast to [N, H, W]
  cos, sin = tf.cos(angle)[:, None, None], tf.sin(angle)[:, None, None]
  zoom = zoom[:, None, None]
  new_rows = (cos * y - sin * x) / zoom + cy + dy[:, None, None]
  new_cols = (sin * y + cos * x) / zoom + cx + dx[:, None, None]
  return new_rows, new_cols


def _reflect(index: tf.Tensor, size: int) -> tf.Tensor:
  """Folds integer coordinates into [0, size) by mirroring at the borders (as tf.pad's REFLECT)."""
  period = 2 * (size - 1)
  index = tf.math.floormod(index, period)
  return tf.where(index >= size, period - index, index)


def sample(images: tf.Tensor, grid) -> tf.Tensor:
  """Reads every image through its grid (nearest pixel, reflected at the borders) with one gather."""
  rows, cols = grid
  n, height, width, channels = tf.shape(images)[0], images.shape[1], images.shape[2], images.shape[3]
  rows = _reflect(tf.cast(tf.round(rows), tf.int32), height)
  cols = _reflect(tf.cast(tf.round(cols), tf.int32), width)
  flat = tf.range(n)[:, None, None] * (height * width) + rows * width + cols  # [N, H, W] by broadcasting
  pixels = tf.gather(tf.reshape(images, [-1, channels]), tf.reshape(flat, [-1]))
  return tf.reshape(pixels, [n, height, width, channels])


# --- single-purpose wrappers (each a complete op) ----------------------------------------------------------

@_batched
def random_crop(images: tf.Tensor, seed: tf.Tensor, padding: int) -> tf.Tensor:
  """Reflect-pad by `padding` pixels, then crop back to the original size at a random offset per image."""
  if padding <= 0:
    return images
  grid = identity_grid(tf.shape(images)[0], images.shape[1], images.shape[2])
  return sample(images, translate(grid, seed, padding))


@_batched
def random_flip(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Mirrors each image left-right with probability 1/2."""
  grid = identity_grid(tf.shape(images)[0], images.shape[1], images.shape[2])
  return sample(images, flip(grid, random_flip_mask(seed, tf.shape(images)[0])))


@_batched
def random_affine(images: tf.Tensor, seed: tf.Tensor, rotation_degrees: float, shift_fraction: float,
                  zoom_fraction: float) -> tf.Tensor:
  """Random rotation, shift and zoom (see `affine`), nearest pixel, reflected borders."""
  grid = identity_grid(tf.shape(images)[0], images.shape[1], images.shape[2])
  return sample(images, affine(grid, seed, rotation_degrees, shift_fraction, zoom_fraction))


@_batched
def cutout(images: tf.Tensor, seed: tf.Tensor, size: int, probability: float = 1.0) -> tf.Tensor:
  """Blanks (to 0) a `size` x `size` square at a random centre in each image, with `probability`; squares
  may hang over the border (DeVries & Taylor, 2017)."""
  n, height, width = tf.shape(images)[0], images.shape[1], images.shape[2]
  u = tf.random.stateless_uniform([3, n], seed)
  cy = tf.cast(u[0] * height, tf.int32)[:, None, None]
  cx = tf.cast(u[1] * width, tf.int32)[:, None, None]
  y, x = tf.range(height)[None, :, None], tf.range(width)[None, None, :]
  half = size // 2
  inside = (y >= cy - half) & (y < cy - half + size) & (x >= cx - half) & (x < cx - half + size)
  inside &= (u[2] < probability)[:, None, None]
  return tf.where(inside[..., None], tf.zeros_like(images), images)


def _beta(seed: tf.Tensor, alpha: float, n) -> tf.Tensor:
  seeds = tf.random.experimental.stateless_split(seed, 2)
  a = tf.random.stateless_gamma([n], seeds[0], alpha)
  b = tf.random.stateless_gamma([n], seeds[1], alpha)
  return a / (a + b)


def mixup(images: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor, alpha: float):
  """Blends each image and its label with its neighbour's in the batch, weight ~ Beta(alpha, alpha)
  (Zhang et al., 2018). Images float [N, H, W, C], labels one-hot float [N, K]."""
  lam = _beta(seed, alpha, tf.shape(images)[0])
  other_images, other_labels = tf.roll(images, 1, axis=0), tf.roll(labels, 1, axis=0)
  mixed = lam[:, None, None, None] * images + (1.0 - lam[:, None, None, None]) * other_images
  return mixed, lam[:, None] * labels + (1.0 - lam[:, None]) * other_labels


def cutmix(images: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor, alpha: float):
  """Pastes a box from each image's neighbour in the batch; labels mix by the box's exact area
  (Yun et al., 2019). Images [N, H, W, C], labels one-hot float [N, K]."""
  n, height, width = tf.shape(images)[0], images.shape[1], images.shape[2]
  box_seed, centre_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  lam = _beta(box_seed, alpha, n)
  cut = tf.sqrt(1.0 - lam)
  box_h = tf.cast(cut * height, tf.int32)[:, None, None]
  box_w = tf.cast(cut * width, tf.int32)[:, None, None]
  u = tf.random.stateless_uniform([2, n], centre_seed)
  cy = tf.cast(u[0] * height, tf.int32)[:, None, None]
  cx = tf.cast(u[1] * width, tf.int32)[:, None, None]
  y, x = tf.range(height)[None, :, None], tf.range(width)[None, None, :]
  inside = ((y >= cy - box_h // 2) & (y < cy - box_h // 2 + box_h) &
            (x >= cx - box_w // 2) & (x < cx - box_w // 2 + box_w))
  mixed = tf.where(inside[..., None], tf.roll(images, 1, axis=0), images)
  area = tf.reduce_mean(tf.cast(inside, tf.float32), axis=[1, 2])[:, None]
  return mixed, (1.0 - area) * labels + area * tf.roll(labels, 1, axis=0)


def normalize(images: tf.Tensor, mean, std) -> tf.Tensor:
  """uint8 (or float in [0, 255]) pixels [..., H, W, C] -> float32 standardised per channel.

  Args:
    images: one image or a batch; H, W, C must be static.
    mean, std: per-channel, in [0, 1] units.
  """
  # Scale and offset are tiled to a whole image so they broadcast over rows of H*W*C values: TensorFlow's
  # broadcast of a [C] vector over a last axis of 3 ran several times slower (docs/results.md).
  pixels = images.shape[-3] * images.shape[-2]
  std = tf.constant(std, tf.float32)
  scale = tf.tile(1.0 / (std * 255.0), [pixels])
  offset = tf.tile(-tf.constant(mean, tf.float32) / std, [pixels])
  flat = tf.reshape(tf.cast(images, tf.float32), [-1, pixels * images.shape[-1]])
  return tf.reshape(flat * scale + offset, tf.shape(images))


def denormalize(images, mean, std) -> tf.Tensor:
  """The inverse of `normalize`, for looking at images: float32 in [0, 1] (clipped), per channel `mean`
  and `std` in [0, 1] units."""
  images = tf.convert_to_tensor(images, tf.float32)
  return tf.clip_by_value(images * tf.constant(std, tf.float32) + tf.constant(mean, tf.float32), 0.0, 1.0)


def fit_image(image: tf.Tensor, height: int, width: int) -> tf.Tensor:
  """One uint8 image [h, w, C] of any size as uint8 [height, width, C]: the largest central crop of the
  target's aspect ratio, resized bilinearly with antialiasing (no distortion; the edges of a photo of
  another shape are cut). An image of the target size comes back unchanged. make_tfrecords' --image_size
  and the export's serve_bytes both use it, so a served photo gets the pixels training data got."""
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  # Crop to the target aspect: keep h x round(h * width / height), or round(w * height / width) x w.
  crop_w = tf.minimum(w, tf.cast(tf.round(tf.cast(h, tf.float64) * width / height), tf.int32))
  crop_h = tf.minimum(h, tf.cast(tf.round(tf.cast(w, tf.float64) * height / width), tf.int32))
  crop_h, crop_w = tf.maximum(crop_h, 1), tf.maximum(crop_w, 1)
  cropped = tf.image.crop_to_bounding_box(image, (h - crop_h) // 2, (w - crop_w) // 2, crop_h, crop_w)
  resized = tf.image.resize(cropped, [height, width], method="bilinear", antialias=True)
  resized = tf.cast(tf.clip_by_value(tf.round(resized), 0, 255), tf.uint8)
  same = tf.logical_and(tf.equal(h, height), tf.equal(w, width))
  return tf.ensure_shape(tf.cond(same, lambda: image, lambda: resized), [height, width, image.shape[-1]])
