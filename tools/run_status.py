r"""Prints a run's status from its run.json (local or gs://): `running`, `finished`, `failed`, or `stopped by
SIGTERM` (a stop request: the same command resumes). Exit 1 when the workdir holds no run.json.

  python -m tools.run_status --workdir=gs://BUCKET/runs/deep

deploy/slurm/train.sbatch asks it whether to requeue the job after the trainer exits 0.
"""

import json
import os
import sys

from absl import app
from absl import flags

from trainer import main as trainer_main

FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS):
  """Command-line flags (a test may define them on a FlagValues of its own)."""
  flags.DEFINE_string("workdir", None, "The run's --workdir.", flag_values=flag_values)
  trainer_main.require_paths(["workdir"], flag_values)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  path = os.path.join(FLAGS.workdir, "run.json")
  try:
    print(_read(path)["status"])
  except (OSError, ValueError, KeyError, TypeError) as e:
    print(f"run_status: error: {path}: no run status ({type(e.__cause__ or e).__name__})", file=sys.stderr)
    sys.exit(1)


def _read(path: str) -> dict:
  """run.json; TensorFlow (its filesystems) imported only for a remote path: a local read after every SLURM
  job start then costs no TensorFlow start-up (~4 s of CPU)."""
  if "://" not in path:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  import trainer  # pylint: disable=g-import-not-at-top,unused-import  # first: see tools/__init__.py
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from pipeline import fileio  # pylint: disable=g-import-not-at-top
  try:
    return fileio.read_json(path)
  except tf.errors.OpError as e:
    raise OSError(str(e)) from e


if __name__ == "__main__":
  define_flags()
  app.run(main)
