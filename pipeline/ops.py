"""Image ops: small named functions taking and returning tensors.

Every random op is stateless: it takes a `seed` of shape [2] and gives the same output for the same seed,
so a batch is a pure function of (seed, epoch, step) and a resumed run sees the same pixels. A batch that is
one replica's slice of a global batch also takes its `Places` there: the op draws for the whole global batch
and keeps its own rows, so an image's draws depend on its place in the global batch, not on how many
replicas and workers share that batch (a run resumed on another replica count augments alike).

Geometric ops (translate, flip, rotate/shift/zoom) do not move pixels: they transform a sampling grid of
source coordinates, and `sample` reads all images' pixels through it with one gather. Moving pixels once
instead of once per op is what makes the default augmentation fast: a crop by `tf.pad` + gathers was
several times slower (docs/results.md). Pixel ops (cutout, mixup, cutmix) work on the images themselves.

Ops take a batch [N, H, W, C] or (where marked) a single image [H, W, C]; those under "encoded images" take
a file's bytes and read the size its header declares, so that a small file that would decode to gigabytes
is refused before it is decoded.
"""

from typing import NamedTuple

import tensorflow as tf


class Places(NamedTuple):
  """Where a batch's images sit in the global batch they are a slice of (the replicas' batches of one step,
  concatenated in replica order)."""
  positions: tf.Tensor  # int32 [N]: each image's row in the global batch
  size: tf.Tensor  # int32 scalar: the global batch's image count


def whole_batch(batch_size) -> Places:
  """The places of a batch that is a global batch of its own: rows 0..N-1 of N."""
  return Places(tf.range(batch_size), batch_size)


def _places(places: Places | None, batch_size) -> Places:
  return whole_batch(batch_size) if places is None else places


def _draw(seed: tf.Tensor, places: Places, count: int, minval=0.0, maxval=1.0, dtype=tf.float32) -> tf.Tensor:
  """[N, count] uniform random numbers, a row per image: the rows at `places.positions` of one draw for the
  whole global batch. Drawing the global batch's few numbers on every replica costs little beside moving
  its pixels, and needs no per-image seeds (stateless ops take one seed per call)."""
  return tf.gather(tf.random.stateless_uniform([places.size, count], seed, minval, maxval, dtype), places.positions)


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


def translate(grid, seed: tf.Tensor, max_pixels: int, places: Places | None = None):
  """Shifts each image by a random whole number of pixels in [-max_pixels, max_pixels] on each axis; with
  reflection at the borders this is the classic reflect-pad-by-`max_pixels` random crop. `places`: where the
  images sit in their global batch (None: the batch is a whole one), as every random op takes it."""
  rows, cols = grid
  places = _places(places, tf.shape(rows)[0])
  offsets = tf.cast(_draw(seed, places, 2, -max_pixels, max_pixels + 1, tf.int32), tf.float32)
  return rows + offsets[:, 0, None, None], cols + offsets[:, 1, None, None]


def flip(grid, flip_mask: tf.Tensor):
  """Mirrors left-right the images where `flip_mask` [N] (bool) is true."""
  rows, cols = grid
  width = tf.cast(tf.shape(cols)[2], tf.float32)
  return rows, tf.where(flip_mask[:, None, None], width - 1.0 - cols, cols)


def random_flip_mask(seed: tf.Tensor, batch_size, places: Places | None = None) -> tf.Tensor:
  """Each image flipped with probability 1/2."""
  return _draw(seed, _places(places, batch_size), 1)[:, 0] < 0.5


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


def affine(grid, seed: tf.Tensor, rotation_degrees: float, shift_fraction: float, zoom_fraction: float,
           places: Places | None = None):
  """Random rotation in ±`rotation_degrees`, shift in ±`shift_fraction` of the size on each axis and zoom
  by a factor in [1 - zoom_fraction, 1 + zoom_fraction], about the image centre (ImageDataGenerator's
  rotation_range / width_shift_range / height_shift_range / zoom_range)."""
  rows, cols = grid
  height, width = tf.cast(tf.shape(rows)[1], tf.float32), tf.cast(tf.shape(cols)[2], tf.float32)
  u = tf.unstack(_draw(seed, _places(places, tf.shape(rows)[0]), 5, -1.0, 1.0), axis=1)
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
def cutout(images: tf.Tensor, seed: tf.Tensor, size: int, probability: float = 1.0,
           places: Places | None = None, inside: bool = False) -> tf.Tensor:
  """Blanks (to 0) a `size` x `size` square at a random place in each image, with `probability`: centred
  anywhere, so that squares may hang over the border (DeVries & Taylor, 2017), or with `inside`, wholly in
  the image (airbench96; a square larger than the image blanks it all)."""
  height, width = images.shape[1], images.shape[2]
  u = tf.unstack(_draw(seed, _places(places, tf.shape(images)[0]), 3), axis=1)
  if inside:  # the corner, uniform over the places the square fits
    top = tf.cast(u[0] * max(height - size + 1, 1), tf.int32)[:, None, None]
    left = tf.cast(u[1] * max(width - size + 1, 1), tf.int32)[:, None, None]
  else:
    top = tf.cast(u[0] * height, tf.int32)[:, None, None] - size // 2
    left = tf.cast(u[1] * width, tf.int32)[:, None, None] - size // 2
  y, x = tf.range(height)[None, :, None], tf.range(width)[None, None, :]
  square = (y >= top) & (y < top + size) & (x >= left) & (x < left + size)
  square &= (u[2] < probability)[:, None, None]
  return tf.where(square[..., None], tf.zeros_like(images), images)


def jitter(images: tf.Tensor, seed: tf.Tensor, brightness: float, contrast: float,
           places: Places | None = None) -> tf.Tensor:
  """Colour jitter on normalised images [N, H, W, C]: each image scaled by a factor uniform in
  [1 - `contrast`, 1 + `contrast`] about the normalisation's mean (0), then shifted by an offset uniform in
  +-`brightness` (in units of the channels' std), the same on every channel."""
  u = _draw(seed, _places(places, tf.shape(images)[0]), 2, -1.0, 1.0)
  scale = (1.0 + contrast * u[:, 0])[:, None, None, None]
  return images * scale + (brightness * u[:, 1])[:, None, None, None]


def _beta(seed: tf.Tensor, alpha: float, places: Places) -> tf.Tensor:
  seeds = tf.random.experimental.stateless_split(seed, 2)
  a = tf.random.stateless_gamma([places.size], seeds[0], alpha)
  b = tf.random.stateless_gamma([places.size], seeds[1], alpha)
  return tf.gather(a / (a + b), places.positions)


def partners(places: Places) -> tf.Tensor:
  """Each image's partner in mixup and cutmix, as an index into its batch: its neighbour in the global
  batch, in pairs (0, 1), (2, 3)... Pairs, not a shift by one, so that no partner is in another replica's
  batch when per-replica batches are even-sized: each image then gets the same partner on any layout. An
  image whose pair-mate is elsewhere (odd sizes) or missing (an odd global batch's last) is its own."""
  positions = places.positions
  own = tf.range(tf.shape(positions)[0])
  mate = tf.bitwise.bitwise_xor(positions, 1)
  index = own + (mate - positions)  # where the mate is when the batch's positions run consecutively
  index = tf.where((index >= 0) & (index < tf.shape(positions)[0]), index, own)
  return tf.where(tf.gather(positions, index) == mate, index, own)


def mixup(images: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor, alpha: float, places: Places | None = None):
  """Blends each image and its label with its partner's (`partners`), weight ~ Beta(alpha, alpha)
  (Zhang et al., 2018). Images float [N, H, W, C], labels one-hot float [N, K]."""
  places = _places(places, tf.shape(images)[0])
  lam = _beta(seed, alpha, places)
  other = partners(places)
  other_images, other_labels = tf.gather(images, other), tf.gather(labels, other)
  mixed = lam[:, None, None, None] * images + (1.0 - lam[:, None, None, None]) * other_images
  return mixed, lam[:, None] * labels + (1.0 - lam[:, None]) * other_labels


def cutmix(images: tf.Tensor, labels: tf.Tensor, seed: tf.Tensor, alpha: float, places: Places | None = None):
  """Pastes a box from each image's partner (`partners`); labels mix by the box's exact area
  (Yun et al., 2019). Images [N, H, W, C], labels one-hot float [N, K]."""
  height, width = images.shape[1], images.shape[2]
  places = _places(places, tf.shape(images)[0])
  box_seed, centre_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  lam = _beta(box_seed, alpha, places)
  cut = tf.sqrt(1.0 - lam)
  box_h = tf.cast(cut * height, tf.int32)[:, None, None]
  box_w = tf.cast(cut * width, tf.int32)[:, None, None]
  u = tf.unstack(_draw(centre_seed, places, 2), axis=1)
  cy = tf.cast(u[0] * height, tf.int32)[:, None, None]
  cx = tf.cast(u[1] * width, tf.int32)[:, None, None]
  y, x = tf.range(height)[None, :, None], tf.range(width)[None, None, :]
  inside = ((y >= cy - box_h // 2) & (y < cy - box_h // 2 + box_h) &
            (x >= cx - box_w // 2) & (x < cx - box_w // 2 + box_w))
  other = partners(places)
  mixed = tf.where(inside[..., None], tf.gather(images, other), images)
  area = tf.reduce_mean(tf.cast(inside, tf.float32), axis=[1, 2])[:, None]
  return mixed, (1.0 - area) * labels + area * tf.gather(labels, other)


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


# --- encoded images ----------------------------------------------------------------------------------------

# The most pixels an image's header may declare for it to be decoded: above every photo a user would
# classify (61 MP full-frame cameras, 50 MP phones; ~190 MB as RGB), where TensorFlow alone decodes up to
# 2^31 bytes: a 249 KB PNG of 16000 x 16000 grey pixels took ~800 MB through serve_bytes.
MAX_IMAGE_PIXELS = 64_000_000

ACCEPTED_FORMATS = "PNG, JPEG, BMP or WebP"  # those whose size `declared_image_size` reads
_PNG = b"\x89PNG\r\n\x1a\n"
_HEADER_BYTES = 32  # enough for every size field read below


def declared_image_size(encoded: tf.Tensor) -> tf.Tensor:
  """The (height, width) an encoded image's header declares, int64 [2], read without decoding its pixels.

  PNG (IHDR), JPEG (its frame header, by `tf.image.extract_jpeg_shape`), BMP and WebP (lossy, lossless and
  extended). Other bytes, GIF and JPEG XL among them, fail with InvalidArgumentError: TensorFlow reads all
  of a GIF's frames, each of the size its own descriptor gives, before it decodes the first, and JPEG XL's
  size is a bit-packed field. Works eagerly and in a graph (tf.function, Dataset.map, a SavedModel).

  Args:
    encoded: string scalar, the file's bytes.
  """
  encoded = tf.convert_to_tensor(encoded, tf.string)
  head = tf.strings.substr(tf.strings.join([encoded, tf.constant(b"\0" * _HEADER_BYTES)]), 0, _HEADER_BYTES)
  is_at = lambda tag, pos: tf.equal(tf.strings.substr(head, pos, len(tag)), tag)
  byte = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)
  # The 4-byte unsigned integer starting at each byte, little- and big-endian: a few ops for all the fields
  # read below instead of a few per byte (serve_bytes runs this per image).
  quads = tf.stack([byte[i:_HEADER_BYTES - 3 + i] for i in range(4)])
  le32 = tf.reduce_sum(quads * tf.constant([[1], [2**8], [2**16], [2**24]], tf.int64), axis=0)
  be32 = tf.reduce_sum(quads * tf.constant([[2**24], [2**16], [2**8], [1]], tf.int64), axis=0)

  def signed32(pos: int) -> tf.Tensor:  # BMP's width and height; a height < 0 means rows stored top-down
    return tf.abs(tf.where(le32[pos] >= 2**31, le32[pos] - 2**32, le32[pos]))

  vp8l = le32[21]  # 14 bits width - 1, then 14 bits height - 1
  webp = is_at(b"RIFF", 0) & is_at(b"WEBP", 8)
  formats = [  # (is it, (height, width)); an unknown format's size is -1, refused below
      (is_at(_PNG, 0) & is_at(b"IHDR", 12), (be32[20], be32[16])),
      (is_at(b"BM", 0), (signed32(22), signed32(18))),
      (webp & is_at(b"VP8X", 12), (le32[27] % 2**24 + 1, le32[24] % 2**24 + 1)),
      (webp & is_at(b"VP8L", 12), (vp8l // 2**14 % 2**14 + 1, vp8l % 2**14 + 1)),
      (webp & is_at(b"VP8 ", 12), (le32[28] % 2**14, le32[26] % 2**14)),
  ]
  size = tf.constant([-1, -1], tf.int64)
  for known, (height, width) in reversed(formats):
    size = tf.where(known, tf.stack([height, width]), size)
  is_jpeg = is_at(b"\xff\xd8\xff", 0)
  size = tf.cond(is_jpeg, lambda: tf.cast(tf.image.extract_jpeg_shape(encoded)[:2], tf.int64), lambda: size)
  check = tf.debugging.assert_non_negative(size, message=f"not a {ACCEPTED_FORMATS} image (GIF and JPEG XL are "
                                                         "refused: their size cannot be read before decoding)")
  with tf.control_dependencies([check]):
    return tf.identity(size)


def check_pixel_limit(encoded: tf.Tensor, max_pixels: int = MAX_IMAGE_PIXELS) -> tf.Tensor:
  """`encoded` (a string scalar) unchanged, once its header declares at most `max_pixels` pixels: decode the
  returned tensor, and in a graph the check runs first. Raises InvalidArgumentError stating the limit,
  or if the bytes are no image `declared_image_size` reads."""
  size = tf.minimum(declared_image_size(encoded), 2**31)  # no format has more on a side; no int64 overflow
  check = tf.debugging.assert_less_equal(
      size[0] * size[1], tf.constant(max_pixels, tf.int64),
      message=f"image refused before decoding: its header declares more than the limit of {max_pixels:,} pixels")
  with tf.control_dependencies([check]):
    return tf.identity(encoded)


def decode_and_fit(encoded: tf.Tensor, shape: tuple[int, int, int]) -> tf.Tensor:
  """An encoded image (string scalar) decoded to uint8 `shape` (H, W, C) as the export's serve_bytes takes
  photos: its header checked against MAX_IMAGE_PIXELS first (decoding takes what the header declares, up to
  2^31 bytes for a PNG, however small the file), then `fit_image`d."""
  height, width, channels = shape
  image = tf.io.decode_image(check_pixel_limit(encoded), channels=channels, expand_animations=False)
  return fit_image(image, height, width)
