"""The SavedModel for serving: self-contained (normalisation, class names, image size and test-time
views inside), three signatures, for the dataset's H x W images and K classes (32x32 and 10 for CIFAR-10).

  serving_default(images: uint8 [N, H, W, 3]) -> probabilities float32 [N, K], classes int64 [N]
  serve_bytes(image_bytes: string [N], PNG or JPEG of any size, grey, RGB or RGBA) -> the same; each image
    fitted to H x W as make_tfrecords fits photos (ops.fit_image)
  serve_examples(examples: string [N], serialized records as written by make_tfrecords) -> the same

It computes in the precision chosen for serving (`config.export_precision`, float32 by default), not the
one of training: bf16 is slow or emulated on most CPUs and GPUs that serve, and the converters
(tools/convert.py) take no bf16 op. Besides `workdir/export` (the latest), the trainer keeps numbered
versions in TF Serving's layout, each with warmup requests for the three signatures:

  workdir/serving/<train step>/saved_model.pb, variables/, assets.extra/tf_serving_warmup_requests
"""

import os

from absl import logging
import keras
import numpy as np
import tensorflow as tf
from tensorflow_serving.apis import predict_pb2
from tensorflow_serving.apis import prediction_log_pb2

from pipeline import fileio
from pipeline import ops
from pipeline import records
from trainer import models
from trainer import views

PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}  # Keras policies
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")  # where TF Serving looks for it
WARMUP_BATCHES = (1, 8)  # request sizes in the warmup file, per signature


def serving_model(model: keras.Model, config, data: models.DataShape) -> keras.Model:
  """`model` (trained, its final weights in place) rebuilt to compute in `config.export_precision`, with
  the same weights: the model the final evaluation scores and the export serves. Built with this project's
  layers (layers.py: inference ops the converters take) and plain BatchNorm; under the caller's strategy
  scope, if any."""
  spec = config.model.copy_and_resolve_references()
  spec.fast_kernels, spec.sync_bn = True, False  # the same weights either way; neither matters at inference
  previous = keras.mixed_precision.global_policy()
  keras.mixed_precision.set_dtype_policy(PRECISIONS[config.export_precision])
  try:
    served = models.build(spec, data)
  finally:
    keras.mixed_precision.set_dtype_policy(previous)
  sources = {w.path: w for w in model.weights}
  if sorted(sources) != sorted(w.path for w in served.weights):
    raise ValueError(f"the serving copy of {model.name} has other weights than the trained model")
  for target in served.weights:
    target.assign(sources[target.path].value)
  return served


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


def export(model, path: str, *, mean, std, class_names, tta: str = "none", warmup_records=(),
           versions: str | None = None, version: int = 0, keep_versions: int = 0) -> str:
  """Writes the SavedModel to `path`, replacing what was there only once the new one is complete. With
  `warmup_records` (serialized records as make_tfrecords writes them) it holds TF Serving's warmup file;
  with `versions` and `keep_versions` > 0 it is also published as `versions/<version>`, of which the newest
  `keep_versions` are kept."""
  module = Serving(model, mean, std, class_names, tta)
  tmp = fileio.temp_name(path)
  tf.saved_model.save(module, tmp, signatures=module.signatures())
  if len(warmup_records):
    write_warmup(os.path.join(tmp, WARMUP_FILE), warmup_requests(module, warmup_records))
  if versions and keep_versions:
    publish_version(tmp, versions, version, keep_versions)
  _replace_dir(tmp, path)
  return path


def _replace_dir(new: str, path: str) -> None:
  """Moves the complete directory `new` to `path`; what was at `path` is removed only after."""
  old = fileio.temp_name(path) if tf.io.gfile.exists(path) else None
  if old:
    fileio.rename_dir(path, old, last="saved_model.pb")
  fileio.rename_dir(new, path, last="saved_model.pb")
  if old:
    tf.io.gfile.rmtree(old)


def publish_version(export_dir: str, versions: str, version: int, keep: int) -> str:
  """Copies the complete SavedModel `export_dir` to `versions/<version>`, TF Serving's layout. Locally the
  numbered name appears only once its copy is complete (one rename; TF Serving ignores the temporary name);
  on gs:// its files move one by one, saved_model.pb last. A version already there is left as it is: the
  same step holds the same weights, and TF Serving would not reload a replaced one. Then removes all but
  the newest `keep`."""
  final = os.path.join(versions, str(version))
  if tf.io.gfile.exists(os.path.join(final, "saved_model.pb")):
    logging.info("%s exists: kept (TF Serving does not reload a version it has loaded)", final)
  else:
    tmp = fileio.temp_name(final)
    fileio.copy_dir(export_dir, tmp)
    if tf.io.gfile.exists(final):  # a partial copy left by a crash: never loaded, safe to replace
      tf.io.gfile.rmtree(final)
    fileio.rename_dir(tmp, final, last="saved_model.pb")
  numbered = sorted((int(n.rstrip("/")) for n in tf.io.gfile.listdir(versions) if n.rstrip("/").isdigit()),
                    reverse=True)
  for old in numbered[keep:]:
    tf.io.gfile.rmtree(os.path.join(versions, str(old)))
  return final


def warmup_requests(module: Serving, serialized) -> list[predict_pb2.PredictRequest]:
  """TF Serving warmup requests of real images: for each signature and each size of WARMUP_BATCHES, the
  first images of `serialized` (records as make_tfrecords writes them) in that signature's input form."""
  serialized = np.asarray(list(serialized), dtype=object)
  features = records.parse_batch(tf.constant(serialized))
  images = records.decode_batch(features[records.ENCODED], features[records.FORMAT], shape=module._shape)
  png = np.asarray([tf.io.encode_png(image).numpy() for image in images], dtype=object)
  inputs = {"serving_default": ("images", images.numpy()), "serve_bytes": ("image_bytes", png),
            "serve_examples": ("examples", serialized)}
  requests = []
  for name, (key, values) in inputs.items():
    for size in WARMUP_BATCHES:
      request = predict_pb2.PredictRequest()
      request.model_spec.signature_name = name
      rows = np.resize(values, (size, *values.shape[1:]))  # repeats the records when there are fewer
      request.inputs[key].CopyFrom(tf.make_tensor_proto(rows))
      requests.append(request)
  return requests


def write_warmup(path: str, requests) -> None:
  """TF Serving's warmup file: a TFRecord file of PredictionLog records, one per request."""
  tf.io.gfile.makedirs(os.path.dirname(path))
  with tf.io.TFRecordWriter(path) as writer:
    for request in requests:
      log = prediction_log_pb2.PredictionLog(predict_log=prediction_log_pb2.PredictLog(request=request))
      writer.write(log.SerializeToString())


def load(path: str):
  """Loads an export; raises FileNotFoundError naming the path if there is none, fileio.StorageError if
  its gs:// bucket cannot be used."""
  fileio.check_bucket(path)
  if not tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
    raise FileNotFoundError(f"{path}: no SavedModel here (expected {os.path.join(path, 'saved_model.pb')})")
  return tf.saved_model.load(path)
