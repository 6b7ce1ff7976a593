r"""Classifies image files (PNG or JPEG, 32x32, local or gs://) with an exported SavedModel.

  python -m tools.predict --model=/tmp/run/export cat.png dog.jpg

Prints one line per file: `<file>\t<class_name>\t<probability>`.
"""

import sys

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from pipeline import cifar10
from trainer import export as export_lib

FLAGS = flags.FLAGS

def define_flags():
  """Command-line flags; defined only when run as a program, so modules import side by side."""
  flags.DEFINE_string("model", None, "Export directory (a SavedModel), local or gs://.")
  flags.mark_flags_as_required(["model"])


class InputError(ValueError):
  """An input file cannot be read or is not a 32x32 image."""


def read_image(path: str) -> bytes:
  """The file's bytes, after checking that it decodes to a 32x32 image."""
  try:
    data = tf.io.gfile.GFile(path, "rb").read()
    shape = tuple(tf.io.decode_image(data, channels=cifar10.CHANNELS, expand_animations=False).shape)
  except tf.errors.OpError as e:
    raise InputError(f"{path}: not a readable PNG/JPEG image ({e.message.splitlines()[0]})") from None
  if shape != cifar10.IMAGE_SHAPE:
    raise InputError(f"{path}: image is {'x'.join(map(str, shape))}, expected 32x32x3")
  return data


def predict(model_dir: str, paths: list[str]) -> list[tuple[str, str, float]]:
  """Returns (file, class name, probability) of the top class for each file."""
  model = export_lib.load(model_dir)
  names = [n.decode() for n in model.class_names.numpy()]
  data = [read_image(p) for p in paths]
  out = model.signatures["serve_bytes"](image_bytes=tf.constant(data))
  probabilities, classes = out["probabilities"].numpy(), out["classes"].numpy()
  return [(p, names[c], float(probabilities[i, c])) for i, (p, c) in enumerate(zip(paths, classes))]


def main(argv):
  paths = argv[1:]
  if not paths:
    raise app.UsageError("give one or more image files")
  try:
    results = predict(FLAGS.model, paths)
  except (InputError, FileNotFoundError) as e:
    print(f"predict: error: {e}", file=sys.stderr)
    sys.exit(1)
  for path, name, probability in results:
    print(f"{path}\t{name}\t{probability:.4f}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
