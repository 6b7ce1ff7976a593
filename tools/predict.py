r"""Classifies image files (PNG, JPEG, BMP or WebP of any size, local or gs://) with an exported SavedModel
or its conversion by tools.convert (.tflite, .onnx), or answers a request in TF Serving's REST JSON format.
Each image is fitted to the size the model was trained at, as make_tfrecords fitted its photos and as the
export's serve_bytes does (ops.fit_image: a central crop of the model's aspect ratio, resized).

  python -m tools.predict --model=/tmp/run/export cat.png dog.jpg
  python -m tools.predict --model=/tmp/run/export --top_k=3 cat.png
  python -m tools.predict --model=/tmp/run/export.tflite cat.png           # the same lines, by LiteRT
  python -m tools.predict --model=/tmp/run/export --output=classes.csv photos/*.jpg   # or .jsonl
  python -m tools.predict --model=/tmp/run/export --json=request.json     # or --json=- for stdin

Prints one line per file, in the order given: `<file>\t<class_name>\t<probability>` (with --top_k, k such
pairs per line). Files are read and classified --batch_size at a time and each line is printed as soon as
its batch is done, so memory does not grow with the number of files. A file that cannot be classified gets
one line on stderr in its place, `predict: error: <file>: <why>`: unreadable, not an image, or declaring
more than ops.MAX_IMAGE_PIXELS pixels (read from its header: such a file is never decoded). The other files
are classified, and the exit status is 1. Errors that are not one file's (the model, a gs:// bucket) stop
the run.

With --output the predictions go to a file instead, which appears once complete: CSV with the columns
`file,class,probability` (then `class_2,probability_2`... with --top_k), or JSON lines
`{"file": ..., "classes": [...], "probabilities": [...]}`.

With --json, prints the response TF Serving's REST API would give for the same request body:
`{"instances": [...]}` (row format) -> `{"predictions": [...]}`, `{"inputs": ...}` (columnar) ->
`{"outputs": ...}`; `"signature_name"` picks a signature (default `serving_default`); binary inputs
(`image_bytes`, `examples`) are given as `{"b64": "..."}`.
"""

import trainer  # pylint: disable=unused-import  # first: see tools/__init__.py

import base64
import contextlib
import csv
import itertools
import json
import sys
from typing import Iterable, Iterator, NamedTuple

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from pipeline import fileio
from pipeline import ops
from tools import converted
from trainer import export as export_lib
from trainer import faults
from trainer import main as trainer_main

FLAGS = flags.FLAGS

BATCH_SIZE = 64  # files read and classified at a time: memory grows with it, not with the number of files
OUTPUT_SUFFIXES = (".csv", ".jsonl")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS):
  """Command-line flags; defined only when run as a program, so modules import side by side (and a test may
  define them on a FlagValues of its own)."""
  on = {"flag_values": flag_values}
  flags.DEFINE_string("model", None, "Export directory (a SavedModel), or a .tflite / .onnx file from "
                      "tools.convert; local or gs://.", **on)
  flags.DEFINE_integer("top_k", 1, "Classes printed per image, most probable first.", lower_bound=1, **on)
  flags.DEFINE_integer("batch_size", BATCH_SIZE, "Files read and classified at a time.", lower_bound=1, **on)
  flags.DEFINE_string("output", None, "A .csv or .jsonl file (local or gs://) to write the predictions to "
                      "instead of printing them; it appears once complete.", **on)
  flags.DEFINE_string("json", None, "A TF Serving REST request body (file, gs:// or - for stdin) to answer.", **on)
  flags.register_validator("output", lambda path: path is None or path.lower().endswith(OUTPUT_SUFFIXES),
                           message="not a .csv or .jsonl file", **on)
  trainer_main.require_paths(["model"], flag_values)


class InputError(ValueError):
  """An input file cannot be read or is not an image."""


class Prediction(NamedTuple):
  """One file's classes, or why it has none."""
  path: str
  top: list[tuple[str, float]]  # (class name, probability), most probable first; empty if `error`
  error: str = ""


def image_reader(image_shape: tuple[int, int, int]):
  """A function: image files' paths -> (their pixels fitted to `image_shape` (H, W, C), uint8, as the
  export's serve_bytes fits them, by path; the error, naming the file, by path for each file that cannot be
  read, is not an image, or declares more than ops.MAX_IMAGE_PIXELS pixels, refused before decoding). It
  raises fileio.StorageError if a gs:// bucket cannot be used."""
  channels = image_shape[2]
  fit = lambda data: ops.decode_and_fit(data, image_shape)

  @tf.function(input_signature=[tf.TensorSpec([None], tf.string)], autograph=False)  # tf ops only: traces faster
  def fitted(files):  # a graph call per batch: one per file took twice as long, eager ops several times
    return tf.map_fn(fit, files, fn_output_signature=tf.TensorSpec(image_shape, tf.uint8))

  def read(paths: list[str]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    files, errors = {}, {}
    for path in paths:
      fileio.check_bucket(path)
      try:
        with tf.io.gfile.GFile(path, "rb") as f:
          files[path] = f.read()
      except tf.errors.OpError as e:
        errors[path] = f"{path}: cannot be read ({faults.first_line(e.message)})"
    try:
      return dict(zip(files, fitted(list(files.values())).numpy() if files else [])), errors
    except tf.errors.InvalidArgumentError:  # a file is no image: find which, one by one
      images = {}
      for path, data in files.items():
        try:
          images[path] = fitted([data]).numpy()[0]
        except tf.errors.InvalidArgumentError:
          errors[path] = f"{path}: {_why_unreadable(data, channels)}"
      return images, errors
  return read


def _why_unreadable(data: bytes, channels: int) -> str:
  """Why the image `data` failed to decode, from the same ops run eagerly: a graph's message is pages long."""
  try:
    height, width = ops.declared_image_size(data).numpy()
  except tf.errors.OpError as e:  # not an image of a format whose size is read, or a broken JPEG header
    return faults.first_line(e.message).rstrip(". ")
  if height * width > ops.MAX_IMAGE_PIXELS:
    return f"{width}x{height} pixels, more than the limit of {ops.MAX_IMAGE_PIXELS:,}: refused before decoding"
  try:
    tf.io.decode_image(data, channels=channels, expand_animations=False)
  except tf.errors.OpError as e:
    return f"not a readable image ({faults.first_line(e.message)})"
  return "not a readable image"


def predictions(model: converted.Classifier, paths: Iterable[str], top_k: int = 1,
                batch_size: int = BATCH_SIZE) -> Iterator[Prediction]:
  """Yields each file's Prediction, in the order of `paths`, reading and classifying `batch_size` files at a
  time: the first come before the last file is read."""
  read = image_reader(model.image_shape)
  paths = iter(paths)
  while batch := list(itertools.islice(paths, batch_size)):
    images, errors = read(batch)
    tops = dict(zip(images, top_classes(model, np.stack(list(images.values())), top_k))) if images else {}
    for path in batch:
      yield Prediction(path, [], errors[path]) if path in errors else Prediction(path, tops[path])


def top_classes(model: converted.Classifier, images: np.ndarray, top_k: int) -> list[list[tuple[str, float]]]:
  """For each image, the model's `top_k` (class name, probability) pairs, most probable first."""
  probabilities = model.probabilities(images)
  top = np.argsort(-probabilities, axis=1, kind="stable")[:, :top_k]
  return [[(model.class_names[c], float(probabilities[i, c])) for c in top[i]] for i in range(len(images))]


def predict(model_path: str, paths: list[str], top_k: int = 1,
            batch_size: int = BATCH_SIZE) -> list[tuple[str, list[tuple[str, float]]]]:
  """Returns, for each file, its `top_k` (class name, probability) pairs, most probable first. Raises
  InputError for the first file that cannot be classified."""
  results = []
  for prediction in predictions(converted.load(model_path), paths, top_k, batch_size):
    if prediction.error:
      raise InputError(prediction.error)
    results.append((prediction.path, prediction.top))
  return results


@contextlib.contextmanager
def prediction_writer(output: str | None, top_k: int):
  """A function that writes one Prediction: a printed line (flushed: a reader sees it at once), or with
  `output` a row of that .csv or .jsonl file, written under a temporary name and renamed once all are."""
  if output is None:
    yield lambda p: print("\t".join([p.path] + [f"{name}\t{prob:.4f}" for name, prob in p.top]), flush=True)
    return
  tmp = fileio.temp_name(output)
  try:
    with tf.io.gfile.GFile(tmp, "w") as f:
      if output.lower().endswith(".csv"):
        rows = csv.writer(f, lineterminator="\n")
        rows.writerow(["file", "class", "probability"] + [f"{column}_{rank}" for rank in range(2, top_k + 1)
                                                          for column in ("class", "probability")])
        yield lambda p: rows.writerow([p.path] + [value for pair in p.top for value in pair])
      else:
        yield lambda p: f.write(json.dumps({"file": p.path, "classes": [name for name, _ in p.top],
                                            "probabilities": [prob for _, prob in p.top]}) + "\n")
    tf.io.gfile.rename(tmp, output, overwrite=True)
  finally:
    if tf.io.gfile.exists(tmp):  # the run stopped: no partial file is left behind
      tf.io.gfile.remove(tmp)


def write_predictions(results: Iterable[Prediction], output: str | None = None, top_k: int = 1) -> int:
  """Prints (or writes to `output`, see `prediction_writer`) each Prediction as it comes; a file's error goes
  to stderr in its place. Returns how many files had an error."""
  failed = 0
  with prediction_writer(output, top_k) as write:
    for prediction in results:
      if prediction.error:
        failed += 1
        print(f"predict: error: {prediction.error}", file=sys.stderr, flush=True)
      else:
        write(prediction)
  return failed


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
  if FLAGS.json and FLAGS.output:
    raise app.UsageError("--output takes the predictions for image files; --json prints a REST response")
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
    model = converted.load(FLAGS.model)
    top_k = min(FLAGS.top_k, len(model.class_names))
    failed = write_predictions(predictions(model, paths, top_k, FLAGS.batch_size), FLAGS.output, top_k)
  except (InputError, converted.ModelError, FileNotFoundError, fileio.StorageError, tf.errors.NotFoundError) as e:
    print(f"predict: error: {getattr(e, 'message', e)}", file=sys.stderr)
    sys.exit(1)
  if FLAGS.output:
    print(f"wrote {FLAGS.output}: {len(paths) - failed} of {len(paths)} files classified")
  if failed:
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
