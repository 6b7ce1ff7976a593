r"""Classifies image files (PNG or JPEG of any size, local or gs://) with an exported SavedModel or its
conversion by tools.convert (.tflite, .onnx), or answers a request in TF Serving's REST JSON format. Each image is fitted to the size the model was
trained at, as make_tfrecords fitted its photos (the export's serve_bytes: a central crop of the
model's aspect ratio, resized).

  python -m tools.predict --model=/tmp/run/export cat.png dog.jpg
  python -m tools.predict --model=/tmp/run/export --top_k=3 cat.png
  python -m tools.predict --model=/tmp/run/export.tflite cat.png           # the same lines, by LiteRT
  python -m tools.predict --model=/tmp/run/export --json=request.json     # or --json=- for stdin

Prints one line per file: `<file>\t<class_name>\t<probability>` (with --top_k, k such pairs per line).
With --json, prints the response TF Serving's REST API would give for the same request body:
`{"instances": [...]}` (row format) -> `{"predictions": [...]}`, `{"inputs": ...}` (columnar) ->
`{"outputs": ...}`; `"signature_name"` picks a signature (default `serving_default`); binary inputs
(`image_bytes`, `examples`) are given as `{"b64": "..."}`.
"""

import base64
import json
import sys

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from pipeline import fileio
from pipeline import ops
from tools import converted
from trainer import export as export_lib
from trainer import faults

FLAGS = flags.FLAGS

def define_flags():
  """Command-line flags; defined only when run as a program, so modules import side by side."""
  flags.DEFINE_string("model", None, "Export directory (a SavedModel), or a .tflite / .onnx file from "
                      "tools.convert; local or gs://.")
  flags.DEFINE_integer("top_k", 1, "Classes printed per image, most probable first.", lower_bound=1)
  flags.DEFINE_string("json", None, "A TF Serving REST request body (file, gs:// or - for stdin) to answer.")
  flags.mark_flags_as_required(["model"])


class InputError(ValueError):
  """An input file cannot be read or is not an image."""


def read_image(path: str) -> bytes:
  """The file's bytes, after checking that it decodes as an image."""
  try:
    fileio.check_bucket(path)
  except fileio.StorageError as e:
    raise InputError(str(e)) from None
  try:
    data = tf.io.gfile.GFile(path, "rb").read()
    tf.io.decode_image(data, channels=3, expand_animations=False)
  except tf.errors.OpError as e:
    raise InputError(f"{path}: not a readable PNG/JPEG image ({faults.first_line(e.message)})") from None
  return data


def predict(model_path: str, paths: list[str], top_k: int = 1) -> list[tuple[str, list[tuple[str, float]]]]:
  """Returns, for each file, its `top_k` (class name, probability) pairs, most probable first."""
  data = [read_image(p) for p in paths]
  if converted.is_converted(model_path):
    model = converted.load(model_path)
    names, (height, width, channels) = model.class_names, model.image_shape
    images = np.stack([ops.fit_image(tf.io.decode_image(d, channels=channels, expand_animations=False),
                                     height, width).numpy() for d in data])  # as the export's serve_bytes
    probabilities = model.probabilities(images)
  else:
    model = export_lib.load(model_path)
    names = [n.decode() for n in model.class_names.numpy()]
    probabilities = model.signatures["serve_bytes"](image_bytes=tf.constant(data))["probabilities"].numpy()
  top = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
  return [(p, [(names[c], float(probabilities[i, c])) for c in top[i]]) for i, p in enumerate(paths)]


def _decode_json_value(value):
  """TF Serving's convention: {"b64": "..."} is binary data; lists nest."""
  if isinstance(value, dict) and set(value) == {"b64"}:
    return base64.b64decode(value["b64"])
  if isinstance(value, list):
    return [_decode_json_value(v) for v in value]
  return value


def _to_json(array: np.ndarray):
  if array.dtype == object:
    return [_to_json(a) for a in array] if array.ndim else array.item().decode("latin-1")
  return array.tolist()


def rest_predict(model, request: dict) -> dict:
  """Answers a TF Serving REST `:predict` request body with the loaded export `model`."""
  name = request.get("signature_name", "serving_default")
  if name not in model.signatures:
    raise InputError(f"signature_name {name!r} is not one of: {', '.join(sorted(model.signatures))}")
  signature = model.signatures[name]
  specs = signature.structured_input_signature[1]
  if ("instances" in request) == ("inputs" in request):
    raise InputError('the request needs exactly one of "instances" (row format) or "inputs" (columnar)')
  if "instances" in request:
    rows = request["instances"]
    if not isinstance(rows, list) or not rows:
      raise InputError('"instances" must be a non-empty list')
    if all(isinstance(r, dict) and not set(r) == {"b64"} for r in rows):
      inputs = {k: [r.get(k) for r in rows] for k in rows[0]}
    else:
      inputs = {next(iter(specs)): rows} if len(specs) == 1 else rows
  else:
    columns = request["inputs"]
    inputs = columns if isinstance(columns, dict) and set(columns) != {"b64"} else {next(iter(specs)): columns}
  unknown = set(inputs) - set(specs)
  if unknown or set(specs) - set(inputs):
    raise InputError(f"signature {name} takes input(s) {', '.join(sorted(specs))}; the request has "
                     f"{', '.join(sorted(inputs)) or 'none'}")
  tensors = {}
  for key, spec in specs.items():
    try:
      tensors[key] = tf.constant(_decode_json_value(inputs[key]), dtype=spec.dtype)
    except (ValueError, TypeError) as e:
      raise InputError(f"input {key!r}: cannot be read as {spec.dtype.name} ({e})") from None
    if not spec.shape.is_compatible_with(tensors[key].shape):
      raise InputError(f"input {key!r}: shape {tensors[key].shape.as_list()}, signature {name} expects "
                       f"{spec.shape.as_list()}")
  outputs = {k: v.numpy() for k, v in signature(**tensors).items()}
  if "inputs" in request:
    return {"outputs": {k: _to_json(v) for k, v in outputs.items()}}
  rows = len(next(iter(outputs.values())))
  return {"predictions": [{k: _to_json(v[i]) for k, v in outputs.items()} for i in range(rows)]}


def main(argv):
  paths = argv[1:]
  if bool(paths) == bool(FLAGS.json):
    raise app.UsageError("give one or more image files, or --json=REQUEST")
  try:
    if FLAGS.json:
      if converted.is_converted(FLAGS.model):
        raise InputError(f"--json answers requests with a SavedModel (what TF Serving serves), not {FLAGS.model}")
      text = sys.stdin.read() if FLAGS.json == "-" else tf.io.gfile.GFile(FLAGS.json).read()
      try:
        request = json.loads(text)
      except json.JSONDecodeError as e:
        raise InputError(f"{FLAGS.json}: not JSON ({e})") from None
      if not isinstance(request, dict):
        raise InputError(f"{FLAGS.json}: a request body is a JSON object")
      print(json.dumps(rest_predict(export_lib.load(FLAGS.model), request)))
      return
    results = predict(FLAGS.model, paths, FLAGS.top_k)
  except (InputError, converted.ModelError, FileNotFoundError, fileio.StorageError, tf.errors.NotFoundError) as e:
    print(f"predict: error: {getattr(e, 'message', e)}", file=sys.stderr)
    sys.exit(1)
  for path, top in results:
    print("\t".join([path] + [f"{name}\t{probability:.4f}" for name, probability in top]))


if __name__ == "__main__":
  define_flags()
  app.run(main)
