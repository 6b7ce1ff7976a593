"""The SavedModel for serving: self-contained (normalisation, class names, image size and test-time
views inside), three signatures, for the dataset's H x W images and K classes (32x32 and 10 for CIFAR-10).

  serving_default(images: uint8 [N, H, W, 3]) -> probabilities float32 [N, K], classes int64 [N]
  serve_bytes(image_bytes: string [N], PNG or JPEG of any size up to ops.MAX_IMAGE_PIXELS, grey, RGB or
    RGBA) -> the same; each image fitted to H x W as make_tfrecords fits photos (ops.fit_image); a header
    declaring more pixels is refused before decoding
  serve_examples(examples: string [N], serialized records as written by make_tfrecords) -> the same

It computes in the precision chosen for serving (`config.export_precision`, float32 by default), not the
one of training: bf16 is slow or emulated on most CPUs and GPUs that serve, and the converters
(tools/convert.py) take no bf16 op. Besides `workdir/export` (the latest), the trainer keeps numbered
versions in TF Serving's layout. Each export holds warmup requests for the three signatures, of synthetic
images (none of the data's: the file ships with the model), and a description of itself (describe):

  workdir/serving/<train step>/saved_model.pb, variables/, assets.extra/tf_serving_warmup_requests,
                               assets.extra/export.json

A finished run exported again with other settings (export_precision, tta) gets a version number above every
one, as TF Serving serves the highest (publish_version).
"""

import functools
import hashlib
import json
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
from trainer import layers
from trainer import models
from trainer import views

PRECISIONS = {"float32": "float32", "bfloat16": "mixed_bfloat16", "float16": "mixed_float16"}  # Keras policies
WARMUP_FILE = os.path.join("assets.extra", "tf_serving_warmup_requests")  # where TF Serving looks for it
WARMUP_BATCHES = (1, 8)  # request sizes in the warmup file, per signature
DESCRIPTION_FILE = os.path.join("assets.extra", "export.json")  # what the export is (describe)


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
  for layer in served.layers:
    if isinstance(layer, (layers.Conv2D, layers.MaxPool2D)):
      layer.own_gradients = False  # it never trains: its graph, and the export's, need no gradient function
  sources = {w.path: w for w in model.weights}
  if sorted(sources) != sorted(w.path for w in served.weights):
    raise ValueError(f"the serving copy of {model.name} has other weights than the trained model")
  for target in served.weights:
    target.assign(sources[target.path].value)
  return served


class Serving(tf.Module):
  """Wraps a trained Keras model with the normalisation it was trained with, the class names and the
  image shape of its data.

  It tracks the model's tf.Variables, not the Keras model: a Keras 3 variable writes itself into a SavedModel
  as a second tf.Variable, initialised from the one the signatures read (its `_export_to_saved_model_graph`),
  and the SavedModel's restore op fills only that second one. Python's tf.saved_model.load did not mind;
  every loader of the graph did: TF Serving and saved_model_cli ("Could not find variable"), and the stock
  TFLite converter (the variables left unfrozen, NaN probabilities). Tracked directly, each variable is
  written once, and the one the signatures read is the one restored.
  """

  def __init__(self, model, mean, std, class_names, tta: str = "none"):
    super().__init__(name="serving")
    self.weights = [variable.value for variable in model.variables]  # the tf.Variable inside each Keras one
    self._logits = functools.partial(views.logits, model, views=tta)  # not tracked: a function, not the model
    self._mean, self._std = tuple(mean), tuple(std)
    self._shape = tuple(model.inputs[0].shape[1:])
    self.class_names = tf.Variable(list(class_names), trainable=False, name="class_names")
    self.normalization = tf.Variable([self._mean, self._std], trainable=False, name="normalization")
    self.serve_images = tf.function(self._predict, autograph=False, input_signature=[
        tf.TensorSpec([None, *self._shape], tf.uint8, name="images")])
    self.serve_bytes = tf.function(self._predict_bytes, autograph=False, input_signature=[
        tf.TensorSpec([None], tf.string, name="image_bytes")])
    self.serve_examples = tf.function(self._predict_examples, autograph=False, input_signature=[
        tf.TensorSpec([None], tf.string, name="examples")])

  def _predict(self, images):  # the other signatures call its traced function: the model is traced once
    probabilities = tf.nn.softmax(self._logits(ops.normalize(images, self._mean, self._std)))
    return {"probabilities": probabilities, "classes": tf.argmax(probabilities, axis=-1, output_type=tf.int64)}

  def _predict_bytes(self, image_bytes):
    fit = lambda b: ops.decode_and_fit(b, self._shape)
    return self.serve_images(tf.map_fn(fit, image_bytes, fn_output_signature=tf.TensorSpec(self._shape, tf.uint8)))

  def _predict_examples(self, examples):
    features = records.parse_batch(examples)
    return self.serve_images(records.decode_batch(features[records.ENCODED], features[records.FORMAT],
                                                  features[records.ID], shape=self._shape))

  def signatures(self) -> dict:
    return {"serving_default": self.serve_images, "serve_bytes": self.serve_bytes,
            "serve_examples": self.serve_examples}


def export(model, path: str, *, mean, std, class_names, tta: str = "none", versions: str | None = None,
           version: int = 0, keep_versions: int = 0) -> str:
  """Writes the SavedModel to `path`, replacing what was there only once the new one is complete, with TF
  Serving's warmup file (of synthetic images: it ships with the model) and what it is (DESCRIPTION_FILE).
  With `versions` and `keep_versions` > 0 it is also published under `versions` (publish_version), of which
  the newest `keep_versions` are kept. `version` is the train step of the weights."""
  module = Serving(model, mean, std, class_names, tta)
  tmp = fileio.temp_name(path)
  tf.saved_model.save(module, tmp, signatures=module.signatures())
  write_warmup(os.path.join(tmp, WARMUP_FILE), warmup_requests(module))
  with tf.io.gfile.GFile(os.path.join(tmp, DESCRIPTION_FILE), "w") as f:
    json.dump(describe(model, version, mean=mean, std=std, tta=tta), f, indent=2, sort_keys=True)
  if versions and keep_versions:
    publish_version(tmp, versions, version, keep_versions)
  _replace_dir(tmp, path)
  return path


def describe(model: keras.Model, step: int, *, mean, std, tta: str) -> dict:
  """What the export of `model` serves, to tell two exports apart: the step, what changes its graph at the
  same step (the precision, the test-time views, the normalisation, the image shape) and a digest of its
  weights (precise BatchNorm statistics may change them at the same step). Nothing of the data."""
  digest = hashlib.sha256()
  for weight in sorted(model.weights, key=lambda w: w.path):
    digest.update(weight.path.encode() + weight.numpy().tobytes())
  return {"step": step, "export_precision": model.dtype_policy.compute_dtype, "tta": tta,
          "normalization": {"mean": list(mean), "std": list(std)}, "image_shape": list(model.inputs[0].shape[1:]),
          "weights_sha256": digest.hexdigest()}


def read_description(export_dir: str) -> dict | None:
  """An export's description (DESCRIPTION_FILE); None for one written before exports had it."""
  path = os.path.join(export_dir, DESCRIPTION_FILE)
  if not tf.io.gfile.exists(path):
    return None
  with tf.io.gfile.GFile(path) as f:
    return json.load(f)


def _replace_dir(new: str, path: str) -> None:
  """Moves the complete directory `new` to `path`; what was at `path` is removed only after."""
  old = fileio.temp_name(path) if tf.io.gfile.exists(path) else None
  if old:
    fileio.rename_dir(path, old, last="saved_model.pb")
  fileio.rename_dir(new, path, last="saved_model.pb")
  if old:
    tf.io.gfile.rmtree(old)


def publish_version(export_dir: str, versions: str, version: int, keep: int) -> str:
  """Publishes the complete SavedModel `export_dir` in TF Serving's layout, `versions/<number>`, of which TF
  Serving serves the highest; returns that version's path. The number is `version` (the train step),
  unless a version at or above it is there already: a version once written is never replaced (TF Serving
  would not reload it), so when the highest one holds another export (DESCRIPTION_FILE: say, a finished
  run exported again with another export_precision), this one is published above every version; when the
  highest holds the same export, nothing is copied. Then removes all but the newest `keep`."""
  described = read_description(export_dir)
  numbers = _version_numbers(versions)
  complete = [n for n in numbers if _complete(versions, n)]
  newest = read_description(os.path.join(versions, str(complete[-1]))) if complete else None
  if complete and newest == described:
    final = os.path.join(versions, str(complete[-1]))
    logging.info("%s holds this export already: kept (TF Serving does not reload a version it has loaded)", final)
  else:
    number = version if version > max(complete, default=-1) else numbers[-1] + 1
    final = os.path.join(versions, str(number))
    if number != version:
      logging.info("%s/%d holds another export (%s): this one is published as %s, the highest, which TF "
                   "Serving serves", versions, complete[-1], _differences(newest, described), final)
    _copy_version(export_dir, final)
  numbers = _version_numbers(versions)
  kept = [n for n in numbers if _complete(versions, n)][-keep:]
  for old in [n for n in numbers if n not in kept]:  # and partial copies a crash left
    tf.io.gfile.rmtree(os.path.join(versions, str(old)))
  return final


def _complete(versions: str, number: int) -> bool:
  return tf.io.gfile.exists(os.path.join(versions, str(number), "saved_model.pb"))  # written last


def _version_numbers(versions: str) -> list[int]:
  """The numbered subdirectories of `versions`, in increasing order."""
  if not tf.io.gfile.isdir(versions):
    return []
  return sorted(int(n.rstrip("/")) for n in tf.io.gfile.listdir(versions) if n.rstrip("/").isdigit())


def _differences(before: dict | None, after: dict) -> str:
  """How two descriptions differ, for the log: `key: before -> after`, one per differing key."""
  if before is None:
    return "written before exports described themselves"
  keys = sorted(k for k in set(before) | set(after) if before.get(k) != after.get(k))
  return ", ".join(f"{k}: {before.get(k)} -> {after.get(k)}" for k in keys)


def _copy_version(export_dir: str, final: str) -> None:
  """Locally the numbered name appears only once its copy is complete (one rename; TF Serving ignores the
  temporary name); on gs:// its files move one by one, saved_model.pb last."""
  tmp = fileio.temp_name(final)
  fileio.copy_dir(export_dir, tmp)
  if tf.io.gfile.exists(final):  # a partial copy left by a crash: never loaded, safe to replace
    tf.io.gfile.rmtree(final)
  fileio.rename_dir(tmp, final, last="saved_model.pb")


def warmup_images(shape: tuple[int, int, int], count: int) -> np.ndarray:
  """`count` uint8 images of `shape` that show nothing and no one: a diagonal gradient under seeded noise,
  the same in every export. The warmup file ships with every export and version, so it holds none of the
  data's images."""
  height, width, channels = shape
  gradient = np.add.outer(np.linspace(0, 127, height), np.linspace(0, 127, width))[None, :, :, None]
  noise = np.random.default_rng(0).integers(-32, 33, (count, height, width, channels))
  return np.clip(gradient + noise, 0, 255).astype(np.uint8)


def warmup_requests(module: Serving) -> list[predict_pb2.PredictRequest]:
  """TF Serving's warmup requests: for each signature and each size of WARMUP_BATCHES, the first
  warmup_images in that signature's input form (pixels; PNG files; raw records as make_tfrecords writes
  them, label 0 and id `warmup-N`)."""
  images = warmup_images(module._shape, max(WARMUP_BATCHES))
  png = np.asarray([tf.io.encode_png(image).numpy() for image in images], dtype=object)
  examples = np.asarray([records.serialize_example(image.tobytes(), "raw", 0, f"warmup-{n}", image.shape)
                         for n, image in enumerate(images)], dtype=object)
  inputs = {"serving_default": ("images", images), "serve_bytes": ("image_bytes", png),
            "serve_examples": ("examples", examples)}
  requests = []
  for name, (key, values) in inputs.items():
    for size in WARMUP_BATCHES:
      request = predict_pb2.PredictRequest()
      request.model_spec.signature_name = name
      request.inputs[key].CopyFrom(tf.make_tensor_proto(values[:size]))
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
