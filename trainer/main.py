r"""Trains a config and exports a SavedModel.

  python -m trainer.main --config=configs/deep.py --workdir=/tmp/deep --config.data_dir=/tmp/c10
"""

import sys

from absl import app
from absl import flags
from ml_collections import config_flags
import tensorflow as tf

from pipeline import manifest
from trainer import train

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "A config file, e.g. configs/deep.py or configs/deep.py:smoke.",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "Checkpoints, summaries and the export go here (local or gs://).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  tf.get_logger().setLevel("WARNING")  # tf.distribute logs every all-reduce it builds at INFO
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except (manifest.ManifestError, train.TrainingError, ValueError) as e:
    print(f"trainer: error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
