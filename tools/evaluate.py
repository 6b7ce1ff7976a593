r"""Accuracy of an exported SavedModel, or of its conversion by tools.convert (.tflite, .onnx), on a split
written by make_tfrecords (reads only the model).

  python -m tools.evaluate --model=/tmp/run/export --data_dir=/tmp/c10 --split=validation
  python -m tools.evaluate --model=/tmp/run/export-int8.tflite --data_dir=/tmp/c10 --split=validation

The last line printed is `accuracy: 0.9412`.
"""

import trainer  # pylint: disable=unused-import  # first: see tools/__init__.py

import sys

from absl import app
from absl import flags
import numpy as np

from pipeline import fileio
from pipeline import input_pipeline
from pipeline import manifest as manifest_lib
from tools import converted
from trainer import main as trainer_main

FLAGS = flags.FLAGS

def define_flags(flag_values: flags.FlagValues = flags.FLAGS):
  """Command-line flags; defined only when run as a program, so modules import side by side (and a test may
  define them on a FlagValues of its own)."""
  on = {"flag_values": flag_values}
  flags.DEFINE_string("model", None, "Export directory (a SavedModel), or a .tflite / .onnx file from "
                      "tools.convert; local or gs://.", **on)
  flags.DEFINE_string("data_dir", None, "Directory written by make_tfrecords.", **on)
  flags.DEFINE_string("split", "test", "train | validation | test", **on)
  flags.DEFINE_integer("batch_size", 1000, "Images per call of the serving signature.", lower_bound=1, **on)
  trainer_main.require_paths(["model", "data_dir"], flag_values)


def check_fits(model: converted.Classifier, model_path: str, data_dir: str) -> None:
  """Refuses data of another image shape or other classes than `model` was trained on, naming both."""
  manifest = manifest_lib.load(data_dir)
  holds = manifest_lib.image_shape(manifest)
  if model.image_shape != holds:
    raise manifest_lib.ManifestError(f"{model_path} takes {'x'.join(map(str, model.image_shape))} images; "
                                     f"{data_dir} holds {'x'.join(map(str, holds))} images")
  if model.class_names != manifest_lib.class_names(manifest):
    raise manifest_lib.ManifestError(f"{model_path} was trained on other classes than {data_dir} holds "
                                     f"({len(model.class_names)} and {manifest_lib.num_classes(manifest)} classes, "
                                     "or another order): its accuracy there would mean nothing")


def predicted_classes(model: converted.Classifier, data_dir: str, split: str, batch_size: int):
  """Yields (predicted classes, labels) per batch of `split`, as numpy arrays."""
  for batch in input_pipeline.build_eval_dataset(data_dir, split, batch_size=batch_size):  # uint8, as served
    yield model.probabilities(batch["images"].numpy()).argmax(-1), batch["labels"].numpy()


def evaluate(model_path: str, data_dir: str, split: str, batch_size: int) -> tuple[int, int]:
  """Returns (correct, total) of the model's classes on `split`."""
  model = converted.load(model_path)
  check_fits(model, model_path, data_dir)
  correct = total = 0
  for classes, labels in predicted_classes(model, data_dir, split, batch_size):
    correct += int(np.sum(classes == labels))
    total += len(classes)
  return correct, total


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    correct, total = evaluate(FLAGS.model, FLAGS.data_dir, FLAGS.split, FLAGS.batch_size)
  except (manifest_lib.ManifestError, converted.ModelError, FileNotFoundError, fileio.StorageError) as e:
    print(f"evaluate: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"split: {FLAGS.split}  images: {total}  correct: {correct}")
  print(f"accuracy: {correct / max(total, 1):.4f}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
