r"""How much the fast kernels (trainer/models.py: fused BatchNorm, XLA-compiled GELU) speed up the train step.

  python -m tools.benchmark_step --config=configs/deep.py --config.data_dir=/tmp/c10

Builds the config's model, optimizer and train loop twice in one process, `model.fast_kernels` off (Keras's
own BatchNormalization and Activation) and on, feeds each one cached batch of the real train pipeline, and
times windows of `--steps` steps that alternate between the two, so machine noise hits both alike. The
last line is `fast / keras: R`, the ratio of the medians.
"""

import functools

from absl import app
from absl import flags
from ml_collections import config_flags

from pipeline import manifest as manifest_lib
from tools import benchmark_input
from trainer import distribute
from trainer import main as trainer_main

FLAGS = flags.FLAGS


def define_flags():
  """Command-line flags; defined only when run as a program, so modules import side by side."""
  config_flags.DEFINE_config_file("config", None, "A training config, e.g. configs/deep.py.", lock_config=True)
  flags.DEFINE_integer("steps", 2, "Train steps per timed window.")
  flags.DEFINE_integer("windows", 5, "Timed windows per variant, after one warm-up window each.")
  flags.mark_flags_as_required(["config"])


def compare(config, steps: int, windows: int) -> float:
  """Median images/s of the train step with `model.fast_kernels` on over off."""
  manifest = manifest_lib.load(config.data_dir)
  strategy = distribute.make_strategy(config)
  measures = {}
  for name, fast in (("keras", False), ("fast", True)):
    variant = config.copy_and_resolve_references()
    variant.model.fast_kernels = fast
    run, dataset_fn = benchmark_input.train_loop_timer(variant, strategy, manifest)
    measures[name] = functools.partial(run, benchmark_input.cached_batch(strategy, dataset_fn), steps)
  rates = benchmark_input.alternating_windows(measures, windows)
  return benchmark_input.report_ratio(("train step, Keras's BatchNorm and GELU", rates["keras"]),
                                      ("train step, fast kernels", rates["fast"]), "fast / keras", digits=2)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = FLAGS.config
  print(f"data_dir {config.data_dir}, batch {config.global_batch_size}, widths {config.model.widths}, "
        f"{config.mixed_precision}")
  compare(config, FLAGS.steps, FLAGS.windows)


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=trainer_main.flags_parser("benchmark_step"))
