r"""Accuracy and wall time of a config on the shared CIFAR-10 data, over several runs.

  python -m tools.benchmark_accuracy --config=configs/deep.py --runs=2

Makes the shards from --source into --data_dir if they are missing (45,000 train / 5,000 validation),
then for each run trains the config with `python -m trainer.main` (seed = run number) in --workdir/runN
(its log beside it, as runN.log),
evaluates the run's export with tools.evaluate, and prints mean ± std of the validation accuracy (from the
export) and of the wall time of the training command, and each run's training compute in PFLOP (the train
step's FLOPs per image as tools.benchmark_step counts them, x the images the run's steps train on). Long
runs are fine here; they are not in CI.

Run again with the same --workdir after a kill or a preemption, it resumes: each run continues from its
last checkpoint, its log grows, and its wall time (this invocation's only) is marked "resumed".
"""

import trainer  # pylint: disable=unused-import  # first: see tools/__init__.py

import os
import statistics
import subprocess
import sys
import tempfile
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import tensorflow as tf

from pipeline import fileio
from pipeline import manifest as manifest_lib
from tools import benchmark_step
from tools import evaluate
from tools import make_tfrecords
from tools import sources
from trainer import checks
from trainer import distribute
from trainer import main as trainer_main
from trainer.faults import TrainingError

FLAGS = flags.FLAGS
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def define_flags(flag_values: flags.FlagValues = flags.FLAGS):
  """Command-line flags; defined only when run as a program, so modules import side by side (and a test may
  define them on a FlagValues of its own)."""
  on = {"flag_values": flag_values}
  config_flags.DEFINE_config_file("config", None, "A training config, e.g. configs/deep.py.", **on)
  flags.DEFINE_integer("runs", 2, "Training runs, seeds first_seed..first_seed+runs-1.", lower_bound=1, **on)
  flags.DEFINE_integer("first_seed", 0, "Seed of the first run (to add runs to an earlier measurement).",
                       lower_bound=0, **on)
  flags.DEFINE_string("source", os.path.join(ROOT, "..", "shared", "data", "cifar10-jpeg-train.tar.gz"),
                      "make_tfrecords source used when --data_dir has no manifest.", **on)
  flags.DEFINE_string("data_dir", os.path.join(tempfile.gettempdir(), "cifar10-shared"), "Shards.", **on)
  flags.DEFINE_string("workdir", None, "Where the runs go; a temporary directory if unset.", **on)
  flags.mark_flags_as_required(["config"], flag_values=flag_values)


def _mean_std(values: list[float]) -> str:
  spread = statistics.stdev(values) if len(values) > 1 else 0.0
  return f"{statistics.mean(values):.4f} ± {spread:.4f}"


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config_arg, overrides = trainer_main.config_arguments(sys.argv[1:])
  config = FLAGS.config.copy_and_resolve_references()
  config.data_dir = FLAGS.data_dir
  for flag in ("workdir", "data_dir"):
    if FLAGS[flag].value and tf.io.gfile.exists(FLAGS[flag].value) and not tf.io.gfile.isdir(FLAGS[flag].value):
      sys.exit(f"benchmark_accuracy: error: --{flag}={FLAGS[flag].value} is a file, not a directory")
  if not FLAGS.data_dir:  # os.path.join("", ...) would write the shards into the current directory
    sys.exit("benchmark_accuracy: error: --data_dir is empty: give the shards' directory (written from --source "
             "if new)")
  distribute.share_gpus(tf.config.list_physical_devices("GPU"))  # the runs are other processes on the same GPUs
  try:
    checks.check_config(config, 1)  # before minutes of shards; each run's trainer checks its own replicas
    if not tf.io.gfile.exists(os.path.join(FLAGS.data_dir, manifest_lib.FILENAME)):
      make_tfrecords.make(FLAGS.source, FLAGS.data_dir)
    pflop = benchmark_step.training_flops(config, manifest_lib.load(FLAGS.data_dir)) / 1e15
    root = FLAGS.workdir or tempfile.mkdtemp(prefix="benchmark_accuracy_")
    os.makedirs(root, exist_ok=True)
  except (TrainingError, ValueError, sources.SourceError, manifest_lib.ManifestError, fileio.StorageError,
          OSError, tf.errors.OpError) as e:  # a config the trainer would refuse; a source or folder unusable
    sys.exit(f"benchmark_accuracy: error: {e}")
  print(f"training compute: {pflop:.3g} PFLOP per run (tools.benchmark_step's count)", flush=True)
  accuracies, times, any_resumed = [], [], False
  for run in range(FLAGS.first_seed, FLAGS.first_seed + FLAGS.runs):
    workdir = os.path.join(root, f"run{run}")
    command = trainer_main.command(config_arg, workdir, dict(overrides, data_dir=FLAGS.data_dir, seed=run))
    log = f"{workdir}.log"  # beside the workdir: the trainer refuses foreign files in its workdir
    resumed = bool(tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints")))
    start = time.time()
    with open(log, "a") as f:
      f.write(f"benchmark_accuracy: {'resuming' if resumed else 'starting'} run {run} at "
              f"{time.strftime('%Y-%m-%d %H:%M:%S')}: {' '.join(command)}\n")
      f.flush()
      result = subprocess.run(command, cwd=ROOT, stdout=f, stderr=subprocess.STDOUT)
    elapsed = time.time() - start
    if result.returncode:
      sys.exit(f"benchmark_accuracy: error: run {run} failed (exit {result.returncode}); its log: {log}")
    correct, total = evaluate.evaluate(os.path.join(workdir, "export"), FLAGS.data_dir, "validation", 1000)
    accuracies.append(correct / total)
    any_resumed |= resumed
    times.append(elapsed)
    print(f"run {run}: validation accuracy {correct / total:.4f} ({correct}/{total}, from the export), "
          f"wall time {elapsed:.0f} s{' (resumed: this invocation only)' if resumed else ''}", flush=True)
  print(f"config {config_arg} {' '.join(f'{k}={v}' for k, v in overrides.items())}: {FLAGS.runs} run(s)")
  print(f"wall time (s): {_mean_std(times)}{' (some runs resumed)' if any_resumed else ''}")
  print(f"validation accuracy: {_mean_std(accuracies)}")
  print(f"training compute: {pflop:.3g} PFLOP per run")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=trainer_main.flags_parser("benchmark_accuracy"))
