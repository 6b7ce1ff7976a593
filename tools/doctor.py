r"""What a user on a new node needs to know before training, in under 2 minutes.

  python -m tools.doctor                                # the deep config
  python -m tools.doctor --config=configs/deep.py:smoke --budget_secs=20

Prints: the software; the CPU and whether it has bf16 kernels; what `mixed_precision="auto"` trains in
here and why (trainer/precision.py: the trainer's own decision); every GPU with its compute capability;
whether TensorFlow was built with CUDA and which CUDA and cuDNN; an
all-reduce over the local GPUs (NCCL) or the logical CPUs; an XLA-compiled function; and the config's
train step timed per precision on a batch of random images (20 steps, or as many as fit in the time
budget after the first, traced step; at least one). Each check ends in OK, NOTE or FAIL; any FAIL makes the
exit status 1 (a broken setup), and the last line says so.
"""

import trainer  # pylint: disable=unused-import  # first: see tools/__init__.py

import os
import platform
import shutil
import sys
import time

from absl import app
from absl import flags
from ml_collections import config_flags
import numpy as np
import tensorflow as tf

from trainer import checks
from trainer import cpu
from trainer import distribute
from trainer import gpus as gpus_lib
from trainer import main as trainer_main
from trainer import models
from trainer import precision
from trainer import steps as steps_lib
from trainer.faults import TrainingError

FLAGS = flags.FLAGS
DEFAULT_CONFIG = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "deep.py")


def define_flags(flag_values: flags.FlagValues = flags.FLAGS):
  """Command-line flags (a test may define them on a FlagValues of its own)."""
  on = {"flag_values": flag_values}
  config_flags.DEFINE_config_file("config", DEFAULT_CONFIG, "The config whose train step is timed.",
                                  lock_config=True, **on)
  flags.DEFINE_integer("steps", 20, "Train steps timed per precision (fewer if the budget runs out).",
                       lower_bound=1, **on)
  flags.DEFINE_float("budget_secs", 60.0, "Seconds for all the step timings together, after each precision's "
                     "first, traced step; at least one step is timed per precision.", lower_bound=1.0, **on)


class Report:
  """Check lines, and whether any failed."""

  def __init__(self):
    self.failed = []

  def line(self, status: str, what: str, detail: str) -> None:
    print(f"{status:<4} {what:<12} {detail}", flush=True)
    if status == "FAIL":
      self.failed.append(what)


def check_devices(report: Report, on_cpu: bool = False) -> list:
  hardware = precision.detect(on_cpu)  # the config's logical_cpus trains on the CPU, as in the trainer
  bf16 = ("bf16 kernels (AMX)" if "amx_bf16" in hardware.cpu_flags else "bf16 kernels (AVX512_BF16)"
          if precision.cpu_has_bf16(hardware.cpu_flags) else "no bf16 kernels: bf16 is converted in software")
  report.line("OK", "cpu", f"{cpu.model()}, {os.cpu_count()} cores; {bf16}")
  policy, why = precision.choose(hardware)
  report.line("OK", "precision", f"mixed_precision=auto trains in {policy} here ({why})")
  gpus = tf.config.list_physical_devices("GPU")
  build = tf.sysconfig.get_build_info()
  cuda = f"CUDA {build.get('cuda_version', '?')}, cuDNN {build.get('cudnn_version', '?')}"
  short = gpus_lib.mismatch(gpus_lib.given(), len(gpus))  # the trainer's own refusal, word for word
  if short:
    report.line("FAIL", "gpu", short)
  if not gpus:
    if short:
      return []
    if os.environ.get("CUDA_VISIBLE_DEVICES") == "":
      report.line("NOTE", "gpu", "CUDA_VISIBLE_DEVICES is empty: every GPU is hidden; training runs on the CPU")
    elif shutil.which("nvidia-smi"):
      report.line("FAIL", "gpu", f"nvidia-smi is here but TensorFlow sees no GPU (built with CUDA: "
                  f"{tf.test.is_built_with_cuda()}; CUDA_VISIBLE_DEVICES={os.environ.get('CUDA_VISIBLE_DEVICES')!r}); "
                  "install tensorflow[and-cuda] or check the driver")
    else:
      report.line("NOTE", "gpu", f"none: training runs on the CPU (TensorFlow built with CUDA: "
                  f"{tf.test.is_built_with_cuda()})")
    return []
  report.line("OK", "cuda", cuda)
  for gpu in gpus:
    details = tf.config.experimental.get_device_details(gpu)
    capability = details.get("compute_capability")
    report.line("OK", "gpu", f"{gpu.name}: {details.get('device_name', '?')}, compute capability "
                f"{'.'.join(map(str, capability)) if capability else '?'}")
  return gpus


def check_all_reduce(report: Report, gpus: list) -> None:
  """A sum inside the replicas, as the train step's gradient sum runs: NCCL over the local GPUs when there
  are 2 or more, else over 2 logical CPUs; every replica must get the total."""
  devices = [f"/gpu:{i}" for i in range(len(gpus))] if len(gpus) > 1 else ["/cpu:0", "/cpu:1"]
  what = f"NCCL over {len(gpus)} GPUs" if len(gpus) > 1 else "2 logical CPUs (no NCCL: fewer than 2 GPUs)"
  try:
    strategy = tf.distribute.MirroredStrategy(devices)

    def replica_sum():
      ctx = tf.distribute.get_replica_context()
      return ctx.all_reduce(tf.distribute.ReduceOp.SUM, tf.cast(ctx.replica_id_in_sync_group, tf.float32) + 1.0)

    sums = [float(t) for t in strategy.experimental_local_results(tf.function(lambda: strategy.run(replica_sum))())]
    expected = len(devices) * (len(devices) + 1) / 2
    if sums != [expected] * len(devices):
      report.line("FAIL", "all-reduce", f"{what}: the replicas got {sums}, expected {expected} on each")
    else:
      report.line("OK", "all-reduce", f"{what}: every replica got the sum")
  except (tf.errors.OpError, RuntimeError, ValueError) as e:
    report.line("FAIL", "all-reduce", f"{what}: {str(e).strip().splitlines()[0]}")


def check_xla(report: Report, gpus: list) -> None:
  device = "/gpu:0" if gpus else "/cpu:0"
  try:
    with tf.device(device):
      x = tf.random.normal([64, 64])
      out = tf.function(lambda x: tf.nn.relu(x @ x) + 1.0, jit_compile=True)(x)
      ok = np.allclose(out.numpy(), tf.nn.relu(x @ x).numpy() + 1.0, atol=1e-2)
    advice = "" if gpus else " (on a CPU XLA usually runs the step slower: leave jit_compile off)"
    report.line("OK" if ok else "FAIL", "xla", f"a compiled function on {device} {'agrees' if ok else 'differs'}"
                f" with the plain one{advice}")
  except (tf.errors.OpError, RuntimeError, ValueError) as e:
    report.line("FAIL" if gpus else "NOTE", "xla", f"cannot compile on {device}: {str(e).strip().splitlines()[0]}")


def precisions_to_time(gpus: list, config) -> tuple[list[str], dict[str, str]]:
  """(precisions to time, {precision: why it is not timed}): float32 always, the config's own (what "auto"
  picks here) and on a GPU mixed_float16 too; mixed_bfloat16 only where precision.fast_bf16 says it has
  kernels (elsewhere one step of a real config takes minutes); mixed_float16 never on a CPU."""
  hardware = precision.detect(on_cpu=not gpus or bool(config.logical_cpus))
  own = precision.choose(hardware)[0] if config.mixed_precision == "auto" else config.mixed_precision
  names, skipped = list(dict.fromkeys(["float32", own] + (["mixed_float16"] if gpus else []))), {}
  if "mixed_bfloat16" in names and not precision.fast_bf16(hardware):
    skipped["mixed_bfloat16"] = ("no bf16 tensor cores below compute capability 8.0" if gpus else
                                 "this CPU has no bf16 kernels (AVX512_BF16 or AMX); train in float32 here")
  if "mixed_float16" in names and not gpus:
    skipped["mixed_float16"] = "float16 is for GPUs"
  return [n for n in names if n not in skipped], skipped


def time_step(config, strategy, policy: str, steps: int, budget: float) -> tuple[int, float, float, float]:
  """The config's train step in `policy` under `strategy` (one device) over a held batch of random
  images: (steps timed, images/s, seconds of the first step with its tracing, last loss). After that first
  step it times at least one more, and none that the last one's duration says would end over `budget`
  seconds; the building and tracing are not in the budget: on a slow or loaded host they took all of it."""
  variant = config.copy_and_resolve_references()
  variant.mixed_precision = policy
  variant.input.augment_on = "host"  # the batch below is ready to train on
  state = steps_lib.make_state(variant, strategy, steps_per_epoch=max(steps, 1), data=models.CIFAR10)
  learner = steps_lib.Learner(variant, strategy, state)
  rng = np.random.default_rng(0)
  batch = {"images": tf.constant(rng.normal(size=(variant.global_batch_size, *models.CIFAR10.image_shape)), tf.float32),
           "labels": tf.constant(rng.integers(0, models.CIFAR10.num_classes, variant.global_batch_size), tf.int64),
           "keys": tf.range(variant.global_batch_size, dtype=tf.int64)}
  iterator = iter(strategy.distribute_datasets_from_function(lambda ctx: tf.data.Dataset.from_tensors(batch).repeat()))
  start = time.perf_counter()
  metrics = learner.train(iterator, 1, 0)
  first = time.perf_counter() - start
  done, start, last = 0, time.perf_counter(), 0.0
  while done < steps and time.perf_counter() + last <= start + budget:  # no step that would end past the budget
    step_start = time.perf_counter()
    metrics = learner.train(iterator, 1, 0)
    done, last = done + 1, time.perf_counter() - step_start
  return done, done * variant.global_batch_size / max(time.perf_counter() - start, 1e-9), first, metrics["loss"]


def check_steps(report: Report, config, gpus: list, steps: int, budget: float) -> None:
  strategy = tf.distribute.MirroredStrategy(["/gpu:0" if gpus else "/cpu:0"])
  precisions, skipped = precisions_to_time(gpus, config)
  for policy, why in skipped.items():
    report.line("NOTE", f"step {policy}", f"not timed: {why}")
  for policy in precisions:
    what = f"step {policy}"
    try:
      done, rate, first, loss = time_step(config, strategy, policy, steps, budget / len(precisions))
    except (tf.errors.OpError, RuntimeError, ValueError, KeyError) as e:
      report.line("FAIL", what, f"{type(e).__name__}: {str(e).strip().splitlines()[0]}")
      continue
    if not np.isfinite(loss):
      report.line("FAIL", what, f"loss is {loss} after {done + 1} steps")
    else:
      short = f" (the budget allowed {done} of {steps})" if done < steps else ""
      report.line("OK", what, f"{rate:,.1f} images/s over {done} steps of {config.global_batch_size} on "
                  f"{strategy.extended.worker_devices[0].split('/')[-1]}{short}; the first, with tracing, {first:.1f} s")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:  # a config the trainer would refuse is refused first, in the trainer's words, not as a failed check
    checks.check_config(FLAGS.config, 1)
  except TrainingError as e:
    sys.exit(f"doctor: error: {e}")
  tf.get_logger().setLevel("ERROR")
  start = time.perf_counter()
  report = Report()
  report.line("OK", "software", f"Python {platform.python_version()}, TensorFlow {tf.__version__}, "
              f"Keras {__import__('keras').__version__}, {platform.system()} {platform.release()}")
  gpus = tf.config.list_physical_devices("GPU")
  distribute.share_gpus(gpus)
  if len(gpus) < 2:
    distribute.configure_devices(2)  # for the all-reduce check
  gpus = check_devices(report, on_cpu=bool(FLAGS.config.logical_cpus))
  check_all_reduce(report, gpus)
  check_xla(report, gpus)
  check_steps(report, FLAGS.config, gpus, FLAGS.steps, FLAGS.budget_secs)
  seconds = time.perf_counter() - start
  if report.failed:
    print(f"doctor: {len(report.failed)} check(s) failed ({', '.join(report.failed)}) in {seconds:.0f} s")
    sys.exit(1)
  print(f"doctor: all checks passed in {seconds:.0f} s")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=trainer_main.flags_parser("doctor"))
