r"""Accuracy of an exported SavedModel on a split written by make_tfrecords (reads only the export).

  python -m tools.evaluate --model=/tmp/run/export --data_dir=/tmp/c10 --split=validation

The last line printed is `accuracy: 0.9412`.
"""

import sys

from absl import app
from absl import flags
import numpy as np

from pipeline import fileio
from pipeline import input_pipeline
from pipeline import manifest as manifest_lib
from trainer import export as export_lib

FLAGS = flags.FLAGS

def define_flags():
  """Command-line flags; defined only when run as a program, so modules import side by side."""
  flags.DEFINE_string("model", None, "Export directory (a SavedModel), local or gs://.")
  flags.DEFINE_string("data_dir", None, "Directory written by make_tfrecords.")
  flags.DEFINE_string("split", "test", "train | validation | test")
  flags.DEFINE_integer("batch_size", 1000, "Images per call of the serving signature.", lower_bound=1)
  flags.mark_flags_as_required(["model", "data_dir"])


def evaluate(model_dir: str, data_dir: str, split: str, batch_size: int) -> tuple[int, int]:
  """Returns (correct, total) of the export's `serving_default` on `split`."""
  model = export_lib.load(model_dir)
  serve = model.signatures["serving_default"]
  manifest = manifest_lib.load(data_dir)
  takes, holds = tuple(serve.structured_input_signature[1]["images"].shape[1:]), manifest_lib.image_shape(manifest)
  if takes != holds:
    raise manifest_lib.ManifestError(f"{model_dir} takes {'x'.join(map(str, takes))} images; {data_dir} holds "
                                     f"{'x'.join(map(str, holds))} images")
  names = tuple(n.decode() for n in model.class_names.numpy())
  if names != manifest_lib.class_names(manifest):
    raise manifest_lib.ManifestError(f"{model_dir} was trained on other classes than {data_dir} holds "
                                     f"({len(names)} and {manifest_lib.num_classes(manifest)} classes, "
                                     "or another order): its accuracy there would mean nothing")
  dataset = input_pipeline.build_eval_dataset(data_dir, split, batch_size=batch_size)  # uint8, as served
  correct = total = 0
  for batch in dataset:
    classes = serve(images=batch["images"])["classes"].numpy()
    correct += int(np.sum(classes == batch["labels"].numpy()))
    total += len(classes)
  return correct, total


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    correct, total = evaluate(FLAGS.model, FLAGS.data_dir, FLAGS.split, FLAGS.batch_size)
  except (manifest_lib.ManifestError, FileNotFoundError, fileio.StorageError) as e:
    print(f"evaluate: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"split: {FLAGS.split}  images: {total}  correct: {correct}")
  print(f"accuracy: {correct / max(total, 1):.4f}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
