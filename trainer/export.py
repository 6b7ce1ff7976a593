"""The SavedModel for serving: self-contained (normalisation, class names and test-time augmentation inside),
three signatures.

  serving_default(images: uint8 [N, 32, 32, 3]) -> probabilities float32 [N, 10], classes int64 [N]
  serve_bytes(image_bytes: string [N], PNG or JPEG)  -> the same
  serve_examples(examples: string [N], serialized records as written by make_tfrecords) -> the same
"""

import os

import tensorflow as tf

from pipeline import cifar10
from pipeline import fileio
from pipeline import ops
from pipeline import records
from trainer import views

_IMAGES = tf.TensorSpec([None, *cifar10.IMAGE_SHAPE], tf.uint8, name="images")
_BYTES = tf.TensorSpec([None], tf.string, name="image_bytes")
_EXAMPLES = tf.TensorSpec([None], tf.string, name="examples")


class Serving(tf.Module):
  """Wraps a trained Keras model with the normalisation it was trained with and the class names."""

  def __init__(self, model, mean, std, class_names, tta: str = "none"):
    super().__init__(name="serving")
    self.model = model
    self._tta = tta
    self._mean, self._std = tuple(mean), tuple(std)
    names = list(class_names) + [f"class_{i}" for i in range(len(class_names), cifar10.NUM_CLASSES)]
    self.class_names = tf.Variable(names, trainable=False, name="class_names")
    self.normalization = tf.Variable([self._mean, self._std], trainable=False, name="normalization")

  def _predict(self, images):
    probabilities = tf.nn.softmax(views.logits(self.model, ops.normalize(images, self._mean, self._std), self._tta))
    return {"probabilities": probabilities, "classes": tf.argmax(probabilities, axis=-1, output_type=tf.int64)}

  @tf.function(input_signature=[_IMAGES])
  def serve_images(self, images):
    return self._predict(images)

  @tf.function(input_signature=[_BYTES])
  def serve_bytes(self, image_bytes):
    images = tf.map_fn(lambda b: records.decode_image(b, tf.constant("encoded")), image_bytes,
                       fn_output_signature=tf.TensorSpec(cifar10.IMAGE_SHAPE, tf.uint8))
    return self._predict(images)

  @tf.function(input_signature=[_EXAMPLES])
  def serve_examples(self, examples):
    features = records.parse_batch(examples)
    return self._predict(records.decode_batch(features[records.ENCODED], features[records.FORMAT]))

  def signatures(self) -> dict:
    return {"serving_default": self.serve_images, "serve_bytes": self.serve_bytes,
            "serve_examples": self.serve_examples}


def export(model, path: str, *, mean, std, class_names, tta: str = "none") -> str:
  """Writes the SavedModel to `path`, replacing what was there only once the new one is complete."""
  module = Serving(model, mean, std, class_names, tta)
  tmp = fileio.temp_name(path)
  tf.saved_model.save(module, tmp, signatures=module.signatures())
  old = fileio.temp_name(path) if tf.io.gfile.exists(path) else None
  if old:
    fileio.rename_dir(path, old, last="saved_model.pb")
  fileio.rename_dir(tmp, path, last="saved_model.pb")
  if old:
    tf.io.gfile.rmtree(old)
  return path


def load(path: str):
  """Loads an export; raises FileNotFoundError naming the path if there is none, fileio.StorageError if
  its gs:// bucket cannot be used."""
  fileio.check_bucket(path)
  if not tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
    raise FileNotFoundError(f"{path}: no SavedModel here (expected {os.path.join(path, 'saved_model.pb')})")
  return tf.saved_model.load(path)
