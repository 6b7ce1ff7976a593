"""The SavedModel for serving: self-contained (normalisation, class names, image size and test-time
views inside), three signatures, for the dataset's H x W images and K classes (32x32 and 10 for CIFAR-10).

  serving_default(images: uint8 [N, H, W, 3]) -> probabilities float32 [N, K], classes int64 [N]
  serve_bytes(image_bytes: string [N], PNG or JPEG of any size, grey, RGB or RGBA) -> the same; each image
    fitted to H x W as make_tfrecords fits photos (ops.fit_image)
  serve_examples(examples: string [N], serialized records as written by make_tfrecords) -> the same
"""

import os

import tensorflow as tf

from pipeline import fileio
from pipeline import ops
from pipeline import records
from trainer import views


class Serving(tf.Module):
  """Wraps a trained Keras model with the normalisation it was trained with, the class names and the
  image shape of its data."""

  def __init__(self, model, mean, std, class_names, tta: str = "none"):
    super().__init__(name="serving")
    self.model = model
    self._tta = tta
    self._mean, self._std = tuple(mean), tuple(std)
    self._shape = tuple(model.inputs[0].shape[1:])
    self.class_names = tf.Variable(list(class_names), trainable=False, name="class_names")
    self.normalization = tf.Variable([self._mean, self._std], trainable=False, name="normalization")
    self.serve_images = tf.function(self._predict, input_signature=[
        tf.TensorSpec([None, *self._shape], tf.uint8, name="images")])
    self.serve_bytes = tf.function(self._predict_bytes, input_signature=[
        tf.TensorSpec([None], tf.string, name="image_bytes")])
    self.serve_examples = tf.function(self._predict_examples, input_signature=[
        tf.TensorSpec([None], tf.string, name="examples")])

  def _predict(self, images):  # the other signatures call its traced function: the model is traced once
    probabilities = tf.nn.softmax(views.logits(self.model, ops.normalize(images, self._mean, self._std), self._tta))
    return {"probabilities": probabilities, "classes": tf.argmax(probabilities, axis=-1, output_type=tf.int64)}

  def _predict_bytes(self, image_bytes):
    height, width, channels = self._shape
    fit = lambda b: ops.fit_image(tf.io.decode_image(b, channels=channels, expand_animations=False), height, width)
    return self.serve_images(tf.map_fn(fit, image_bytes, fn_output_signature=tf.TensorSpec(self._shape, tf.uint8)))

  def _predict_examples(self, examples):
    features = records.parse_batch(examples)
    return self.serve_images(records.decode_batch(features[records.ENCODED], features[records.FORMAT],
                                                  shape=self._shape))

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
