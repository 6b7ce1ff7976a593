r"""Converts an export (the SavedModel's serving_default: uint8 images in, probabilities and classes out) to
LiteRT (.tflite) or ONNX (.onnx), optionally quantized, and scores the result beside the SavedModel on a
split with the same images. Needs `pip install -e ".[convert]"`.

  python -m tools.convert --model=/tmp/run/export --to=litert --data_dir=/tmp/c10
  python -m tools.convert --model=/tmp/run/export --to=litert --quantize=int8 --data_dir=/tmp/c10
  python -m tools.convert --model=/tmp/run/export --to=onnx --data_dir=/tmp/c10

--quantize: none (float32) | float16 (weights; LiteRT dequantizes them on a CPU) | int8 (weights and
activations, calibrated on --calibration_images train images of --data_dir; float where an op has no int8
kernel). Writes --output (default: beside the export, e.g. /tmp/run/export-int8.tflite) atomically; the
class names go into the model's metadata. With --data_dir, the last line is the converted model's
`accuracy: 0.9408`, after the SavedModel's on the same images and how often the two agree.
"""

import trainer  # pylint: disable=unused-import  # first: see tools/__init__.py

import json
import os
import sys
import tempfile

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from pipeline import fileio
from pipeline import input_pipeline
from pipeline import manifest as manifest_lib
from tools import converted
from tools import evaluate as evaluate_tool
from trainer import main as trainer_main

FLAGS = flags.FLAGS
SUFFIX = {"litert": ".tflite", "onnx": ".onnx"}
ONNX_OPSET = 17  # onnxruntime 1.32 runs up to 23; 17 reaches the older runtimes users serve with


def define_flags(flag_values: flags.FlagValues = flags.FLAGS):
  """Command-line flags; defined only when run as a program, so modules import side by side (and a test may
  define them on a FlagValues of its own)."""
  on = {"flag_values": flag_values}
  flags.DEFINE_string("model", None, "Export directory (a SavedModel), local or gs://.", **on)
  flags.DEFINE_enum("to", None, list(SUFFIX), "litert (.tflite) or onnx (.onnx).", **on)
  flags.DEFINE_enum("quantize", "none", ["none", "float16", "int8"], "none | float16 | int8 (needs --data_dir).",
                    **on)
  flags.DEFINE_string("output", "", "The file to write; default beside the export: EXPORT[-QUANTIZE].tflite|.onnx.",
                      **on)
  flags.DEFINE_string("data_dir", None, "Directory written by make_tfrecords: the split to score on, and "
                      "the train images int8 is calibrated on.", **on)
  flags.DEFINE_string("split", "", "train | validation | test: the split to score on; default validation, or "
                      "test when the data has none.", **on)
  flags.DEFINE_integer("calibration_images", 500, "int8: train images the activations' ranges come from.",
                       lower_bound=1, **on)
  flags.DEFINE_integer("batch_size", 500, "Images per call while scoring.", lower_bound=1, **on)
  trainer_main.require_paths(["model"], flag_values)
  flags.mark_flags_as_required(["to"], flag_values=flag_values)


def default_output(model_dir: str, to: str, quantize: str) -> str:
  return model_dir.rstrip("/") + ("" if quantize == "none" else f"-{quantize}") + SUFFIX[to]


def calibration_images(data_dir: str, count: int) -> np.ndarray:
  """The first `count` train images of `data_dir` (make_tfrecords shuffles the split), uint8 as served."""
  batches = input_pipeline.build_eval_dataset(data_dir, "train", batch_size=min(count, 1000))
  images = np.concatenate([b["images"].numpy() for b in batches.take(-(-count // min(count, 1000)))])
  return images[:count]


def to_litert(model_dir: str, quantize: str, class_names, calibration: np.ndarray | None) -> bytes:
  """The serving_default signature as a LiteRT flatbuffer, with the class names in its metadata."""
  from tensorflow.lite.tools import flatbuffer_utils  # pylint: disable=g-import-not-at-top
  from tensorflow.lite.python import schema_py_generated as schema  # pylint: disable=g-import-not-at-top
  converter = tf.lite.TFLiteConverter.from_saved_model(model_dir, signature_keys=["serving_default"])
  if quantize != "none":
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
  if quantize == "float16":
    converter.target_spec.supported_types = [tf.float16]
  if quantize == "int8":
    converter.representative_dataset = lambda: ({"images": calibration[i:i + 1]} for i in range(len(calibration)))
  model = flatbuffer_utils.read_model_from_bytearray(converter.convert())
  # The converter answers an export written before export.Serving tracked the model's tf.Variables (see
  # trainer/export.py) without an error, with a model whose weights are variables nothing initialises: it
  # computes on whatever their memory holds (NaN, often).
  codes = {max(code.builtinCode, code.deprecatedBuiltinCode) for code in model.operatorCodes}
  if schema.BuiltinOperator.VAR_HANDLE in codes:
    raise converted.ModelError(f"{model_dir}: its weights do not convert to LiteRT (an export from before "
                               "trainer/export.py tracked them as tf.Variables): run its training command again")
  buffer = schema.BufferT()
  buffer.data = np.frombuffer(json.dumps(list(class_names)).encode(), np.uint8)
  model.buffers.append(buffer)
  entry = schema.MetadataT()
  entry.name, entry.buffer = converted.CLASS_NAMES_KEY, len(model.buffers) - 1
  model.metadata = (model.metadata or []) + [entry]
  return bytes(flatbuffer_utils.convert_object_to_bytearray(model))


def to_onnx(model_dir: str, quantize: str, class_names, calibration: np.ndarray | None) -> bytes:
  """The serving_default signature as an ONNX model (tf2onnx), with the class names in its metadata_props;
  int8 by onnxruntime's static quantization (QDQ, per channel), float16 by its float16 pass."""
  import onnx  # pylint: disable=g-import-not-at-top
  import tf2onnx  # pylint: disable=g-import-not-at-top
  loaded = tf.saved_model.load(model_dir)  # held: the signature reads its variables
  serve = loaded.signatures["serving_default"]
  spec = serve.structured_input_signature[1]["images"]
  model, _ = tf2onnx.convert.from_function(tf.function(lambda images: serve(images=images)), opset=ONNX_OPSET,
                                           input_signature=[tf.TensorSpec(spec.shape, spec.dtype, "images")])
  if quantize == "float16":
    from onnxruntime.transformers import float16  # pylint: disable=g-import-not-at-top
    model = float16.convert_float_to_float16(model, keep_io_types=True)
  if quantize == "int8":
    model = _onnx_int8(model, calibration)
  onnx.helper.set_model_props(model, {converted.CLASS_NAMES_KEY: json.dumps(list(class_names))})
  return model.SerializeToString()


def _onnx_int8(model, calibration: np.ndarray):
  import onnx  # pylint: disable=g-import-not-at-top
  from onnxruntime import quantization  # pylint: disable=g-import-not-at-top

  class Reader(quantization.CalibrationDataReader):
    def __init__(self):
      self._batches = iter(calibration[i:i + 1] for i in range(len(calibration)))

    def get_next(self):
      batch = next(self._batches, None)
      return None if batch is None else {"images": batch}

  with tempfile.TemporaryDirectory() as tmp:
    source, target = os.path.join(tmp, "float.onnx"), os.path.join(tmp, "int8.onnx")
    onnx.save(model, source)
    quantization.quantize_static(source, target, Reader(), quant_format=quantization.QuantFormat.QDQ,
                                 per_channel=True, activation_type=quantization.QuantType.QInt8,
                                 weight_type=quantization.QuantType.QInt8)
    return onnx.load(target)


def agreement(saved: converted.Classifier, other: converted.Classifier, data_dir: str, split: str,
              batch_size: int) -> dict:
  """Both models on the same images of `split`: the count, each one's correct classes, and how many
  classes they agree on."""
  counts = {"images": 0, "saved_correct": 0, "converted_correct": 0, "agree": 0}
  for batch in input_pipeline.build_eval_dataset(data_dir, split, batch_size=batch_size):
    images, labels = batch["images"].numpy(), batch["labels"].numpy()
    a, b = saved.probabilities(images).argmax(-1), other.probabilities(images).argmax(-1)
    counts["images"] += len(labels)
    counts["saved_correct"] += int(np.sum(a == labels))
    counts["converted_correct"] += int(np.sum(b == labels))
    counts["agree"] += int(np.sum(a == b))
  return counts


def _check_installed(to: str) -> None:
  """Refuses in one line, before any work, when the converter or its runtime is not installed."""
  import importlib.util  # pylint: disable=g-import-not-at-top
  needed = ("ai_edge_litert",) if to == "litert" else ("tf2onnx", "onnx", "onnxruntime")
  missing = [m for m in needed if importlib.util.find_spec(m) is None]
  if missing:
    raise converted.ModelError(f"--to={to} needs {', '.join(missing)}: pip install -e \".[convert]\"")


def convert(model_dir: str, to: str, quantize: str = "none", output: str = "", data_dir: str | None = None,
            calibration_count: int = 500) -> str:
  """Writes the conversion of `model_dir` to `output` (default_output when empty); returns its path."""
  output = output or default_output(model_dir, to, quantize)
  _check_installed(to)
  fileio.check_bucket(output)
  if quantize == "int8" and not data_dir:
    raise converted.ModelError("--quantize=int8 calibrates on train images: give --data_dir")
  if tf.io.gfile.isdir(output):
    raise converted.ModelError(f"--output={output} is a directory; give a file name")
  if not output.lower().endswith(SUFFIX[to]):  # the tools tell a model's format by its suffix
    raise converted.ModelError(f"--output={output}: a --to={to} file must end in {SUFFIX[to]}")
  saved = converted.SavedModel(model_dir)
  calibration = None
  if data_dir:
    evaluate_tool.check_fits(saved, model_dir, data_dir)
    if quantize == "int8":
      calibration = calibration_images(data_dir, calibration_count)
  content = (to_litert if to == "litert" else to_onnx)(model_dir, quantize, saved.class_names, calibration)
  fileio.atomic_write(output, content)
  return output


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    split = FLAGS.split
    if FLAGS.data_dir:  # the split is checked before the work
      splits = manifest_lib.load(FLAGS.data_dir)["splits"]
      split = split or ("validation" if "validation" in splits else "test")
      if split not in splits:
        raise converted.ModelError(f"--split={split}: {FLAGS.data_dir} has {', '.join(splits)}")
    output = convert(FLAGS.model, FLAGS.to, FLAGS.quantize, FLAGS.output, FLAGS.data_dir, FLAGS.calibration_images)
    model = converted.load(output)  # loads in its runtime, or says why not
    size = tf.io.gfile.stat(output).length
    variables = sum(tf.io.gfile.stat(os.path.join(d, f)).length
                    for d, _, files in tf.io.gfile.walk(os.path.join(FLAGS.model, "variables")) for f in files)
    print(f"wrote {output}: {model.kind}, quantize={FLAGS.quantize}, {size / 1e6:.2f} MB "
          f"(the SavedModel's variables: {variables / 1e6:.2f} MB)")
    if not FLAGS.data_dir:
      return
    counts = agreement(converted.SavedModel(FLAGS.model), model, FLAGS.data_dir, split, FLAGS.batch_size)
  except (converted.ModelError, manifest_lib.ManifestError, FileNotFoundError, fileio.StorageError) as e:
    print(f"convert: error: {e}", file=sys.stderr)
    sys.exit(1)
  n = max(counts["images"], 1)
  print(f"split: {split}  images: {counts['images']}")
  print(f"SavedModel accuracy: {counts['saved_correct'] / n:.4f}")
  print(f"same class as the SavedModel: {counts['agree'] / n:.4f} ({counts['images'] - counts['agree']} differ)")
  print(f"accuracy: {counts['converted_correct'] / n:.4f}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
