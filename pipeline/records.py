"""The TFRecord schema (docs/interfaces.md): one writer and one parser for the whole project.

A record is a `tf.train.Example` holding one HxWx3 image (32x32x3 for CIFAR-10; the dataset's manifest
says), either as raw HWC uint8 bytes (`raw`, the fastest to read) or as an encoded PNG/JPEG, plus its
label and a unique id. The readers take the dataset's shape and class count; CIFAR-10's by default.
"""

import tensorflow as tf

from pipeline import cifar10
from pipeline import ops

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


def serialize_example(encoded: bytes, image_format: str, label: int, image_id: str,
                      shape: tuple[int, int, int] = cifar10.IMAGE_SHAPE) -> bytes:
  """Returns one serialized record.

  Args:
    encoded: the image: H*W*3 raw HWC uint8 bytes, or a PNG/JPEG file's bytes.
    image_format: one of FORMATS.
    label: class id in [0, number of classes).
    image_id: unique name of the record, e.g. `train_00042`.
    shape: the image's (height, width, channels).
  """
  height, width, channels = shape
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


def _text(shape) -> str:
  return "x".join(map(str, shape))


def check_batch(features: dict[str, tf.Tensor], shape: tuple[int, int, int] = cifar10.IMAGE_SHAPE,
                num_classes: int = cifar10.NUM_CLASSES) -> dict[str, tf.Tensor]:
  """Fails on the first record of a parsed batch that breaks the schema, naming it by its id.

  Checks the declared shape (the dataset's `shape`), the format, the raw byte count and the label range
  [0, num_classes); returns the features (gated on the checks, so they run inside tf.data and
  tf.function alike).
  """
  raw_bytes = shape[0] * shape[1] * shape[2]
  ids, labels, fmt = features[ID], features[LABEL], features[FORMAT]
  declared = tf.stack([features[HEIGHT], features[WIDTH], features[CHANNELS]], axis=1)
  size = tf.strings.length(features[ENCODED])
  bad_shape = tf.reduce_any(tf.not_equal(declared, tf.constant(shape, tf.int64)), axis=1)
  bad_format = tf.logical_not(tf.reduce_any(tf.equal(fmt[:, None], tf.constant(FORMATS)[None, :]), axis=1))
  bad_size = tf.equal(fmt, "raw") & tf.not_equal(size, raw_bytes)
  bad_label = (labels < 0) | (labels >= num_classes)
  first = lambda bad: tf.argmax(tf.cast(bad, tf.int32))
  i, j, k, m = first(bad_shape), first(bad_format), first(bad_size), first(bad_label)
  checks = [
      _fail_unless(~tf.reduce_any(bad_shape), "record ", ids[i], ": image/height x image/width x "
                   "image/channels is ", _dims(declared[i]), f", expected {_text(shape)}"),
      _fail_unless(~tf.reduce_any(bad_format), "record ", ids[j], ": image/format ", fmt[j],
                   " is not one of raw, png, jpeg"),
      _fail_unless(~tf.reduce_any(bad_size), "record ", ids[k], ": raw image is ", tf.strings.as_string(size[k]),
                   f" bytes, expected {raw_bytes} ({_text(shape)} uint8)"),
      _fail_unless(~tf.reduce_any(bad_label), "record ", ids[m], ": label ", tf.strings.as_string(labels[m]),
                   f" is outside 0..{num_classes - 1}"),
  ]
  with tf.control_dependencies(checks):
    return {key: tf.identity(value) for key, value in features.items()}


def decode_image(encoded: tf.Tensor, image_format: tf.Tensor, image_id: tf.Tensor | str = "",
                 shape: tuple[int, int, int] = cifar10.IMAGE_SHAPE) -> tf.Tensor:
  """Decodes one image of any of FORMATS to uint8 `shape`; a wrong size names `image_id`."""
  def raw():
    return tf.reshape(tf.io.decode_raw(encoded, tf.uint8), shape)

  def compressed():
    # The header's size first: decoding takes what the header declares, however small the record (a
    # request to the export's serve_examples, a shard written elsewhere).
    declared = ops.declared_image_size(encoded)
    fits = _fail_unless(tf.reduce_all(tf.equal(declared, tf.constant(shape[:2], tf.int64))), "record ", image_id,
                        ": image declares ", _dims(declared), f", expected {_text(shape[:2])}")
    with tf.control_dependencies([fits]):
      image = tf.io.decode_image(tf.identity(encoded), channels=shape[2], expand_animations=False)
    check = _fail_unless(tf.reduce_all(tf.equal(tf.shape(image), shape)), "record ", image_id,
                         ": image decodes to ", _dims(tf.shape(image)), f", expected {_text(shape)}")
    with tf.control_dependencies([check]):
      return tf.ensure_shape(image, shape)

  return tf.cond(tf.equal(image_format, "raw"), raw, compressed)


def decode_batch(encoded: tf.Tensor, image_format: tf.Tensor, image_ids: tf.Tensor | None = None,
                 shape: tuple[int, int, int] = cifar10.IMAGE_SHAPE) -> tf.Tensor:
  """Decodes a [N] batch of images to uint8 [N, *shape].

  A batch of raw records is decoded by one vectorised op; anything else one image at a time.
  """
  if image_ids is None:
    image_ids = tf.fill(tf.shape(encoded), "")

  def all_raw():
    return tf.reshape(tf.io.decode_raw(encoded, tf.uint8), (-1, *shape))

  def one_by_one():
    return tf.map_fn(lambda args: decode_image(*args, shape=shape), (encoded, image_format, image_ids),
                     fn_output_signature=tf.TensorSpec(shape, tf.uint8))

  return tf.cond(tf.reduce_all(tf.equal(image_format, "raw")), all_raw, one_by_one)
