r"""How fast is the input pipeline, and does training wait for it?

  python -m tools.benchmark_input --config=configs/deep.py --config.data_dir=/tmp/c10

Measures, in one run on the same shards:
  1. the configured train pipeline alone (host side), images/s over several windows after a warm-up;
  2. the device-side augmentation alone (what `augment_on=device` adds to each step), on this machine;
  3. a plain per-example pipeline, map(parse_single_example -> decode -> augment) -> batch, and the ratio;
  4. the real train step fed by the pipeline against the same step fed one in-memory batch over and over
     (windows alternate between the two so machine noise hits both alike), and the ratio.
The last line is `images/s: N`, the train pipeline's median.
"""

import trainer  # pylint: disable=unused-import  # first: see tools/__init__.py

import statistics
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import tensorflow as tf

from pipeline import augment
from pipeline import input_pipeline
from pipeline import manifest as manifest_lib
from pipeline import ops
from pipeline import records
from trainer import checks
from trainer import data
from trainer import distribute
from trainer import main as trainer_main
from trainer import steps as steps_lib
from trainer.faults import TrainingError
FLAGS = flags.FLAGS


def define_flags(flag_values: flags.FlagValues = flags.FLAGS):
  """Command-line flags; defined only when run as a program, so modules import side by side (and a test may
  define them on a FlagValues of its own)."""
  on = {"flag_values": flag_values}
  config_flags.DEFINE_config_file("config", None, "A training config, e.g. configs/deep.py.", lock_config=True, **on)
  flags.DEFINE_integer("warmup", 20, "Batches (or steps) run before timing.", lower_bound=0, **on)
  flags.DEFINE_integer("windows", 5, "Timed windows per measurement.", lower_bound=1, **on)
  flags.DEFINE_integer("batches", 50, "Batches per window of the pipeline measurements.", lower_bound=1, **on)
  flags.DEFINE_integer("steps", 4, "Train steps per window of the train-step comparison; 0 skips it.", lower_bound=0,
                       **on)
  flags.mark_flags_as_required(["config"], flag_values=flag_values)


def _windows(next_batch, batch_size: int, warmup: int, windows: int, per_window: int) -> list[float]:
  """images/s of `windows` windows of `per_window` calls of next_batch(), after `warmup` calls."""
  for _ in range(warmup):
    next_batch()
  rates = []
  for _ in range(windows):
    start = time.perf_counter()
    for _ in range(per_window):
      next_batch()
    rates.append(per_window * batch_size / (time.perf_counter() - start))
  return rates


def report(name: str, rates: list[float]) -> float:
  median = statistics.median(rates)
  print(f"{name:<44} median {median:>10,.0f}  min {min(rates):>10,.0f}  max {max(rates):>10,.0f} images/s")
  return median


def report_ratio(base: tuple[str, list[float]], other: tuple[str, list[float]], name: str, digits: int) -> float:
  """Reports the medians of two (name, rates) pairs, then `name: R`, R = other's median / base's; returns R."""
  base_median = report(*base)
  ratio = report(*other) / base_median
  print(f"{name}: {ratio:.{digits}f}")
  return ratio


def _drain(iterator):
  """Pulls one element and waits for it (host pipelines yield tensors already computed)."""
  return lambda: next(iterator)


def per_example_baseline(config, data_dir: str, batch_size: int, mean, std) -> tf.data.Dataset:
  """The plain pipeline the tutorials write: one record at a time through parse, decode, augment."""
  manifest = manifest_lib.load(data_dir)
  shape = manifest_lib.image_shape(manifest)
  files = manifest_lib.split_files(data_dir, manifest, "train")

  def one(index, serialized):
    features = tf.io.parse_single_example(serialized, records.FEATURES)
    image = records.decode_image(features[records.ENCODED], features[records.FORMAT], shape=shape)
    seed = tf.stack([tf.constant(config.seed, tf.int64), index])
    image = ops.random_flip(ops.random_crop(image, seed, config.augment.crop_padding), seed + 1)
    return ops.normalize(image, mean, std), features[records.LABEL]

  return (tf.data.TFRecordDataset(files).repeat().shuffle(config.input.shuffle_buffer, seed=config.seed)
          .enumerate().map(one, num_parallel_calls=tf.data.AUTOTUNE).batch(batch_size, drop_remainder=True)
          .prefetch(tf.data.AUTOTUNE))


def train_loop_timer(config, strategy, manifest: dict, epoch: int = 0):
  """The config's train loop on a fresh state: returns (run, dataset_fn), where run(iterator, steps) times
  `steps` steps of epoch `epoch` (which decides the variables that train) fed by `iterator` in images/s,
  and dataset_fn is the train input for the strategy."""
  steps_per_epoch = data.steps_per_epoch_for(config, manifest)
  state = steps_lib.make_state(config, strategy, steps_per_epoch, data.model_shape(manifest))
  learner = steps_lib.Learner(config, strategy, state, *data.normalization_for(config, manifest))

  def run(iterator, steps: int) -> float:
    start = time.perf_counter()
    learner.train(iterator, steps, epoch)  # returns once the steps are done (it reads their metrics)
    return steps * config.global_batch_size / (time.perf_counter() - start)

  return run, data.train_dataset_fn(config, manifest, steps_per_epoch, start_step=0)


def cached_batch(strategy, dataset_fn):
  """An iterator yielding the first batch of `dataset_fn` over and over, from memory."""
  return iter(strategy.distribute_datasets_from_function(lambda ctx: dataset_fn(ctx).take(1).cache().repeat()))


def alternating_windows(measures: dict, windows: int) -> dict[str, list[float]]:
  """The rates each of `measures` (name -> a function timing one window) returns over `windows` rounds of
  one window each, in turn, the order rotated by one every round (so that no variant always runs right
  after the same other: a probe that heats the cores, a model that left its memory), so machine noise hits
  them alike; after one untimed round (tracing, warm-up)."""
  names = list(measures)
  rates = {name: [] for name in names}
  for round_ in range(windows + 1):
    shift = round_ % len(names)
    for name in names[shift:] + names[:shift]:
      rate = measures[name]()
      if round_:
        rates[name].append(rate)
  return rates


def train_step_comparison(config, strategy, manifest: dict, steps: int, windows: int) -> float:
  """Ratio of the train step's speed fed by the real pipeline to its speed on one cached batch (medians
  of alternating windows of `steps` steps, after one warm-up window of each)."""
  run, dataset_fn = train_loop_timer(config, strategy, manifest)
  real = iter(strategy.distribute_datasets_from_function(dataset_fn))
  cached = cached_batch(strategy, dataset_fn)
  rates = alternating_windows({"cached": lambda: run(cached, steps), "real": lambda: run(real, steps)}, windows)
  return report_ratio(("train step on one cached batch", rates["cached"]),
                      ("train step fed by the train pipeline", rates["real"]),
                      "train step with the pipeline / on a cached batch", digits=3)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  config = FLAGS.config
  try:  # what the trainer would refuse, in its words, before anything is measured
    # The trainer's strategy (all local GPUs, or the logical CPUs) before TensorFlow's devices start.
    strategy = distribute.make_strategy(config) if FLAGS.steps else None
    manifest, per_epoch = checks.check_config_and_data(config, strategy.num_replicas_in_sync if strategy else 1)
    mean, std = data.normalization_for(config, manifest)
  except (manifest_lib.ManifestError, TrainingError, ValueError) as e:  # ValueError: the cluster's, the GPUs'
    sys.exit(f"benchmark_input: error: {e}")
  batch = config.global_batch_size
  print(f"data_dir {config.data_dir}, batch {batch}, augment_on {config.input.augment_on}, "
        f"cache_in_memory {config.input.cache_in_memory}, deterministic {config.deterministic}")

  host = input_pipeline.build_train_dataset(config, config.data_dir, steps_per_epoch=per_epoch,
                                            global_batch_size=batch, mean=mean, std=std)
  pipeline_rate = report(f"train pipeline (host side, {config.input.augment_on} augmentation)",
                         _windows(_drain(iter(host)), batch, FLAGS.warmup, FLAGS.windows, FLAGS.batches))

  raw_config = config.copy_and_resolve_references()
  raw_config.input.augment_on = "device"
  raw = next(iter(input_pipeline.build_train_dataset(raw_config, config.data_dir, steps_per_epoch=per_epoch,
                                                     global_batch_size=batch, mean=mean, std=std)))
  device_fn = tf.function(lambda b: augment.train_preprocess(b, config.augment, mean, std)["images"])
  device_rate = report("augmentation as a device step (on this CPU)",
                       _windows(lambda: device_fn(raw).numpy(), batch, FLAGS.warmup, FLAGS.windows, FLAGS.batches))

  baseline = iter(per_example_baseline(config, config.data_dir, batch, mean, std))
  baseline_rate = report("plain per-example pipeline (same shards)",
                         _windows(_drain(baseline), batch, FLAGS.warmup, FLAGS.windows, max(FLAGS.batches // 5, 2)))
  print(f"train pipeline / per-example pipeline: {pipeline_rate / baseline_rate:.1f}x")
  if config.input.augment_on == "device":
    print(f"host side and device augmentation: {pipeline_rate:,.0f} and {device_rate:,.0f} images/s")
  if FLAGS.steps:
    train_step_comparison(config, strategy, manifest, FLAGS.steps, FLAGS.windows)
  print(f"images/s: {pipeline_rate:.0f}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=trainer_main.flags_parser("benchmark_input"))
