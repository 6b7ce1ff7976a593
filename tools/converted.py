"""Every form of a trained model behind one interface: the SavedModel export (TensorFlow), and its
conversions by tools.convert: `.tflite` (run by LiteRT, `ai-edge-litert`: TensorFlow's own tf.lite
interpreter is deprecated) and `.onnx` (run by onnxruntime). tools.evaluate and tools.predict take any
of them; the runtimes are imported only when such a file is given (`pip install -e ".[convert]"`).

A converted model carries what the SavedModel holds besides its graph (the class names) in its own
metadata: LiteRT's model metadata and ONNX's metadata_props, under CLASS_NAMES_KEY, as JSON.
"""

import trainer  # pylint: disable=unused-import  # first: see tools/__init__.py

import json
import os

import numpy as np
import tensorflow as tf

from pipeline import cpus
from pipeline import fileio
from trainer import export as export_lib

CLASS_NAMES_KEY = "class_names"
SUFFIXES = (".tflite", ".onnx")
_EXTRA = 'pip install -e ".[convert]"'


class ModelError(ValueError):
  """A model file that cannot be used: missing, of an unknown kind, or without what a model here holds."""


class Classifier:
  """images uint8 [N, H, W, C] -> probabilities float32 [N, K], with the model's class names and input shape."""

  kind = ""
  class_names: tuple[str, ...]
  image_shape: tuple[int, int, int]

  def probabilities(self, images: np.ndarray) -> np.ndarray:
    raise NotImplementedError


class SavedModel(Classifier):
  kind = "SavedModel"

  def __init__(self, path: str):
    self.loaded = export_lib.load(path)
    self._serve = self.loaded.signatures["serving_default"]
    self.class_names = tuple(n.decode() for n in self.loaded.class_names.numpy())
    self.image_shape = tuple(self._serve.structured_input_signature[1]["images"].shape[1:])

  def probabilities(self, images):
    return self._serve(images=tf.constant(images))["probabilities"].numpy()


class LiteRT(Classifier):
  kind = "LiteRT"

  def __init__(self, path: str, content: bytes):
    try:
      from ai_edge_litert import interpreter as litert  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ModelError(f"{path}: running a .tflite model needs LiteRT: {_EXTRA}") from None
    try:
      self._interpreter = litert.Interpreter(model_content=content, num_threads=cpus.usable().count)  # default: 1
    except ValueError as e:
      raise ModelError(f"{path}: not a LiteRT model ({str(e).splitlines()[0]})") from None
    if "serving_default" not in self._interpreter.get_signature_list():
      raise ModelError(f"{path}: no serving_default signature (not written by tools.convert)")
    self._run = self._interpreter.get_signature_runner("serving_default")
    self.class_names = tuple(_class_names(path, litert_metadata(content)))
    self.image_shape = tuple(int(d) for d in self._run.get_input_details()["images"]["shape"][1:])

  def probabilities(self, images):
    return self._run(images=np.ascontiguousarray(images, np.uint8))["probabilities"]


class Onnx(Classifier):
  kind = "ONNX"

  def __init__(self, path: str, content: bytes):
    try:
      import onnxruntime  # pylint: disable=g-import-not-at-top
    except ImportError:
      raise ModelError(f"{path}: running an .onnx model needs onnxruntime: {_EXTRA}") from None
    try:
      self._session = onnxruntime.InferenceSession(content, providers=["CPUExecutionProvider"])
    except Exception as e:  # pylint: disable=broad-except  (onnxruntime raises its own untyped errors)
      raise ModelError(f"{path}: not an ONNX model onnxruntime can run ({str(e).splitlines()[0]})") from None
    metadata = self._session.get_modelmeta().custom_metadata_map
    self.class_names = tuple(_class_names(path, metadata))
    shape = self._session.get_inputs()[0].shape
    self.image_shape = tuple(int(d) for d in shape[1:])

  def probabilities(self, images):
    feed = {self._session.get_inputs()[0].name: np.ascontiguousarray(images, np.uint8)}
    return self._session.run(["probabilities"], feed)[0]


def _class_names(path: str, metadata: dict) -> list[str]:
  if CLASS_NAMES_KEY not in metadata:
    raise ModelError(f"{path}: no class names in its metadata (not written by tools.convert)")
  value = metadata[CLASS_NAMES_KEY]
  return json.loads(value.decode() if isinstance(value, bytes) else value)


def litert_metadata(content: bytes) -> dict[str, bytes]:
  """A LiteRT flatbuffer's metadata entries: name -> the bytes of its buffer."""
  from tensorflow.lite.python import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  model = schema.Model.GetRootAs(content, 0)
  entries = {}
  for i in range(model.MetadataLength()):
    entry = model.Metadata(i)
    entries[entry.Name().decode()] = model.Buffers(entry.Buffer()).DataAsNumpy().tobytes()
  return entries


def is_converted(path: str) -> bool:
  return path.lower().endswith(SUFFIXES)


def load(path: str) -> Classifier:
  """The model at `path`: a `.tflite` or `.onnx` file, else a SavedModel directory. Raises ModelError (or
  export.load's FileNotFoundError / fileio.StorageError) naming the path."""
  if not is_converted(path):
    return SavedModel(path)
  fileio.check_bucket(path)
  if not tf.io.gfile.exists(path) or tf.io.gfile.isdir(path):
    raise ModelError(f"{path}: no such model file")
  with tf.io.gfile.GFile(path, "rb") as f:
    content = f.read()
  return LiteRT(path, content) if path.lower().endswith(".tflite") else Onnx(path, content)
