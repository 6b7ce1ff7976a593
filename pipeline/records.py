"""The TFRecord schema (../shared/CONTRACTS.md): one writer and one parser for the whole project.

A record is a `tf.train.Example` holding one 32x32x3 image, either as raw HWC uint8 bytes (`raw`, the
fastest to read) or as an encoded PNG/JPEG, plus its label and a unique id.
"""

import tensorflow as tf

from pipeline import cifar10

ENCODED = "image/encoded"
FORMAT = "image/format"
HEIGHT = "image/height"
WIDTH = "image/width"
CHANNELS = "image/channels"
LABEL = "image/class/label"
ID = "image/id"

FORMATS = ("raw", "png", "jpeg")

FEATURES = {
    ENCODED: tf.io.FixedLenFeature([], tf.string),
    FORMAT: tf.io.FixedLenFeature([], tf.string),
    HEIGHT: tf.io.FixedLenFeature([], tf.int64),
    WIDTH: tf.io.FixedLenFeature([], tf.int64),
    CHANNELS: tf.io.FixedLenFeature([], tf.int64),
    LABEL: tf.io.FixedLenFeature([], tf.int64),
    ID: tf.io.FixedLenFeature([], tf.string),
}


def _bytes(value: bytes) -> tf.train.Feature:
  return tf.train.Feature(bytes_list=tf.train.BytesList(value=[value]))


def _int64(value: int) -> tf.train.Feature:
  return tf.train.Feature(int64_list=tf.train.Int64List(value=[value]))


def serialize_example(encoded: bytes, image_format: str, label: int, image_id: str) -> bytes:
  """Returns one serialized record.

  Args:
    encoded: the image: 3072 raw HWC uint8 bytes, or a PNG/JPEG file's bytes.
    image_format: one of FORMATS.
    label: class id in [0, NUM_CLASSES).
    image_id: unique name of the record, e.g. `train_00042`.
  """
  height, width, channels = cifar10.IMAGE_SHAPE
  example = tf.train.Example(features=tf.train.Features(feature={
      ENCODED: _bytes(encoded),
      FORMAT: _bytes(image_format.encode()),
      HEIGHT: _int64(height),
      WIDTH: _int64(width),
      CHANNELS: _int64(channels),
      LABEL: _int64(int(label)),
      ID: _bytes(image_id.encode()),
  }))
  return example.SerializeToString(deterministic=True)


def parse_batch(serialized: tf.Tensor) -> dict[str, tf.Tensor]:
  """Parses a [N] batch of serialized records into a dict of [N] tensors (one op for the batch)."""
  return tf.io.parse_example(serialized, FEATURES)


def _dims(shape: tf.Tensor) -> tf.Tensor:
  return tf.strings.reduce_join(tf.strings.as_string(shape), separator="x")


def _fail_unless(ok: tf.Tensor, *parts) -> tf.Operation:
  """An assertion whose message is the concatenation of `parts` (strings or string tensors)."""
  return tf.debugging.Assert(ok, [tf.strings.join(list(parts))])


def check_batch(features: dict[str, tf.Tensor]) -> dict[str, tf.Tensor]:
  """Fails on the first record of a parsed batch that breaks the schema, naming it by its id.

  Checks the declared shape, the format, the raw byte count and the label range; returns the features
  (gated on the checks, so they run inside tf.data and tf.function alike).
  """
  ids, labels, fmt = features[ID], features[LABEL], features[FORMAT]
  shape = tf.stack([features[HEIGHT], features[WIDTH], features[CHANNELS]], axis=1)
  size = tf.strings.length(features[ENCODED])
  bad_shape = tf.reduce_any(tf.not_equal(shape, tf.constant(cifar10.IMAGE_SHAPE, tf.int64)), axis=1)
  bad_format = tf.logical_not(tf.reduce_any(tf.equal(fmt[:, None], tf.constant(FORMATS)[None, :]), axis=1))
  bad_size = tf.equal(fmt, "raw") & tf.not_equal(size, cifar10.RAW_BYTES)
  bad_label = (labels < 0) | (labels >= cifar10.NUM_CLASSES)
  first = lambda bad: tf.argmax(tf.cast(bad, tf.int32))
  i, j, k, m = first(bad_shape), first(bad_format), first(bad_size), first(bad_label)
  checks = [
      _fail_unless(~tf.reduce_any(bad_shape), "record ", ids[i], ": image/height x image/width x "
                   "image/channels is ", _dims(shape[i]), ", expected 32x32x3"),
      _fail_unless(~tf.reduce_any(bad_format), "record ", ids[j], ": image/format ", fmt[j],
                   " is not one of raw, png, jpeg"),
      _fail_unless(~tf.reduce_any(bad_size), "record ", ids[k], ": raw image is ", tf.strings.as_string(size[k]),
                   " bytes, expected 3072 (32x32x3 uint8)"),
      _fail_unless(~tf.reduce_any(bad_label), "record ", ids[m], ": label ", tf.strings.as_string(labels[m]),
                   " is outside 0..9"),
  ]
  with tf.control_dependencies(checks):
    return {key: tf.identity(value) for key, value in features.items()}


def decode_image(encoded: tf.Tensor, image_format: tf.Tensor, image_id: tf.Tensor | str = "") -> tf.Tensor:
  """Decodes one image of any of FORMATS to uint8 [32, 32, 3]; a wrong size names `image_id`."""
  def raw():
    return tf.reshape(tf.io.decode_raw(encoded, tf.uint8), cifar10.IMAGE_SHAPE)

  def compressed():
    image = tf.io.decode_image(encoded, channels=cifar10.CHANNELS, expand_animations=False)
    check = _fail_unless(tf.reduce_all(tf.equal(tf.shape(image), cifar10.IMAGE_SHAPE)), "record ", image_id,
                         ": image decodes to ", _dims(tf.shape(image)), ", expected 32x32x3")
    with tf.control_dependencies([check]):
      return tf.ensure_shape(image, cifar10.IMAGE_SHAPE)

  return tf.cond(tf.equal(image_format, "raw"), raw, compressed)


def decode_batch(encoded: tf.Tensor, image_format: tf.Tensor, image_ids: tf.Tensor | None = None) -> tf.Tensor:
  """Decodes a [N] batch of images to uint8 [N, 32, 32, 3].

  A batch of raw records is decoded by one vectorised op; anything else one image at a time.
  """
  if image_ids is None:
    image_ids = tf.fill(tf.shape(encoded), "")

  def all_raw():
    return tf.reshape(tf.io.decode_raw(encoded, tf.uint8), (-1,) + cifar10.IMAGE_SHAPE)

  def one_by_one():
    return tf.map_fn(lambda args: decode_image(*args), (encoded, image_format, image_ids),
                     fn_output_signature=tf.TensorSpec(cifar10.IMAGE_SHAPE, tf.uint8))

  return tf.cond(tf.reduce_all(tf.equal(image_format, "raw")), all_raw, one_by_one)
