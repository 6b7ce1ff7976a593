r"""The train step against this machine's limit and against `model.fit`.

  python -m tools.benchmark_step --config=configs/deep.py --config.data_dir=/tmp/c10
  python -m tools.benchmark_step ... --layers    # and where the step's time goes, layer by layer
  python -m tools.benchmark_step ... --ops       # and where the real step's time goes, op by op
  python -m tools.benchmark_step ... --kernels   # and model.fast_kernels against Keras's own layers

In one process, every train step fed one batch of the real train pipeline held in memory:
  1. FLOPs per image of the train step: the forward pass counted by TensorFlow's profiler on the model's
     graph (the ops with a registered count: convolutions, matmuls, bias adds, pooling...), times 3 for
     forward and backward (the backward pass makes two products per forward one), less the products the
     step does not make: a conv or dense layer's kernel gradient where its kernel does not train (deep.py's
     frozen whitening conv), its input gradient where no layer before it trains (the first layer's; in
     deep.py group0_conv0's too once the whitening bias freezes), plus the optimizer's Newton-Schulz
     matmuls (Muon) counted from the kernels' shapes, per image at the run's batch;
  2. the machine's peak at the run's compute precision: probes of a 3x3 convolution, a square matmul and
     the forward conv of each of the model's conv layers (its own shapes), each one's rate sustained over
     `--probe_secs` of calls back to back, timed in this process in each window beside the steps (the
     machine's rate drifts); the peak is the probe of the highest median over the windows, in each window
     (the fastest probe of each window, a maximum of noisy rates, reads higher than any probe sustains);
  3. the custom loop (trainer/steps.Learner) and `model.compile` + `model.fit` with the same model,
     optimizer, loss and steps per call, under the same strategy. The custom loop runs the step of
     `--epoch`: by default one of the epochs the run spends most of its time in, those that train the same
     variables (deep.py: epochs 3-9 of 10, the whitening bias frozen). model.fit trains every trainable
     variable in every step, as a Keras user's single fit call would;
  4. 1 and 2 replicas at the same global batch (2 GPUs when the machine has them, else 2 logical CPUs).
Windows alternate between the variants compared, in an order rotated every round, so machine noise hits
them alike; each figure is the median, and each ratio the median of the ratios within a round. The last
lines are `MFU: X`, `custom loop / fit: R` (and `custom loop at epoch E (the variables fit trains) / fit:
R` where the default epoch trains fewer), and `2 / 1 replicas: R`.
"""

import trainer  # pylint: disable=unused-import  # first: see tools/__init__.py

import bisect
import collections
import re
import statistics
import sys
import tempfile
import time

from absl import app
from absl import flags
import keras
from ml_collections import config_flags
import numpy as np
import tensorflow as tf
from tensorflow.tsl.profiler.protobuf import xplane_pb2

from pipeline import manifest as manifest_lib
from tools import benchmark_input
from trainer import checks
from trainer import data
from trainer import distribute
from trainer import layers as layers_lib
from trainer import main as trainer_main
from trainer import models
from trainer import optim
from trainer import precision
from trainer.faults import TrainingError

FLAGS = flags.FLAGS
COMPUTE_DTYPES = {"float32": tf.float32, "mixed_bfloat16": tf.bfloat16, "mixed_float16": tf.float16}


def define_flags(flag_values: flags.FlagValues = flags.FLAGS):
  """Command-line flags; defined only when run as a program, so modules import side by side (and a test may
  define them on a FlagValues of its own)."""
  on = {"flag_values": flag_values}
  config_flags.DEFINE_config_file("config", None, "A training config, e.g. configs/deep.py.", lock_config=True, **on)
  flags.DEFINE_integer("steps", 1, "Train steps per timed window.", lower_bound=1, **on)
  flags.DEFINE_integer("windows", 5, "Timed windows per variant, after one warm-up window each.", lower_bound=1, **on)
  flags.DEFINE_integer("epoch", None, "The epoch whose step the custom loop runs (0-based; it decides which "
                       "variables train). Default: the first of the epochs that train the variable set most "
                       "epochs train.", lower_bound=0, **on)
  flags.DEFINE_bool("fit", True, "Compare with model.fit.", **on)
  flags.DEFINE_float("probe_secs", 2.0, "Seconds each peak probe runs back to back, per window (two calls at "
                     "least).", lower_bound=0.0, **on)
  flags.DEFINE_bool("replicas", True, "Compare 2 replicas with 1 at the same global batch.", **on)
  flags.DEFINE_bool("layers", False, "Also time each layer's forward and backward pass alone.", **on)
  flags.DEFINE_bool("ops", False, "Also profile one window of the custom loop and sum its time op by op "
                    "(runs every variant with one inter-op thread).", **on)
  flags.DEFINE_bool("kernels", False, "Also compare model.fast_kernels on and off.", **on)
  flags.mark_flags_as_required(["config"], flag_values=flag_values)


def step_flops(config, model: keras.Model, epoch: int = 0) -> tuple[float, float, float]:
  """(train-step FLOPs per image in `epoch`, forward FLOPs per image, optimizer FLOPs per step): the forward
  pass as TensorFlow's profiler counts it, x3 for forward + backward, less the gradient products not made,
  + the optimizer's per step over the global batch (the module docstring, point 1)."""
  forward, update = forward_flops(model), optimizer_flops(config, model)
  return _per_image(config, forward, update, model, epoch), forward, update


def _per_image(config, forward: float, update: float, model: keras.Model, epoch: int) -> float:
  return 3 * forward - unmade_gradient_flops(model, epoch) + update / config.global_batch_size


def unmade_gradient_flops(model: keras.Model, epoch: int) -> float:
  """FLOPs per image of the gradient products that `epoch`'s step does not make: for each conv or dense
  layer, its forward product once for the kernel's gradient where the kernel does not train, and once for
  the input's where no layer before it (in `model.layers`' order) has a variable that trains then. For a
  model with branches, "before" may include a parallel branch: the count can only err high. Other layers
  (and a LoRA or quantized kernel, a new tensor at each read) count x3 whole."""
  trained = {id(v) for v in models.trainable_at(model, epoch)}
  unmade, upstream_trains = 0.0, False
  for layer in model.layers:
    if (isinstance(layer, (keras.layers.Conv2D, keras.layers.Dense, layers_lib.PatchWhitening))
        and not getattr(layer, "lora_enabled", False) and not getattr(layer, "quantization_mode", None)):
      product = _kernel_flops(layer)
      unmade += product * (id(layer.kernel) not in trained) + product * (not upstream_trains)
    upstream_trains = upstream_trains or any(id(v) in trained for v in layer.trainable_variables)
  return unmade


def _kernel_flops(layer) -> float:
  """One image's multiply-adds (x2) of `layer`'s product with its kernel: a conv's over its output's pixels
  (the zero padding included, as TensorFlow's profiler counts), a dense layer's over its output's rows."""
  kernel, out = layer.kernel, layer.output.shape[1:]
  if len(kernel.shape) == 4:
    return 2.0 * float(np.prod(out)) * float(np.prod(kernel.shape[:-1]))
  return 2.0 * float(np.prod(out[:-1], dtype=np.float64)) * float(kernel.shape[0]) * float(kernel.shape[1])


def training_flops(config, manifest: dict) -> float:
  """FLOPs of a whole run of `config` on the data of `manifest`: `step_flops` per image of each epoch x the
  images its steps train on (steps per epoch x global batch)."""
  model = models.build(config.model, data.model_shape(manifest))
  forward, update = forward_flops(model), optimizer_flops(config, model)
  images = data.steps_per_epoch_for(config, manifest) * config.global_batch_size
  return sum(_per_image(config, forward, update, model, epoch) * images for epoch in range(config.num_epochs))


def run_epoch(model: keras.Model, num_epochs: int) -> int:
  """The first of the epochs that train the set of variables most epochs train (the later set on a tie):
  the step a run spends most of its time in."""
  sets = [tuple(id(v) for v in models.trainable_at(model, epoch)) for epoch in range(max(num_epochs, 1))]
  counts = collections.Counter(sets)
  most = max(counts.values())
  return sets.index([s for s in sets if counts[s] == most][-1])


def forward_flops(model: keras.Model) -> float:
  """FLOPs of one image's forward pass in inference, as TensorFlow's profiler counts them on the graph."""
  return _profiled_flops(model, model.inputs[0].shape[1:])


def _profiled_flops(layer, image_shape) -> float:
  function = tf.function(lambda x: layer(x, training=False))
  graph = function.get_concrete_function(tf.TensorSpec([1, *image_shape], tf.float32)).graph
  options = (tf.compat.v1.profiler.ProfileOptionBuilder(tf.compat.v1.profiler.ProfileOptionBuilder.float_operation())
             .with_empty_output().build())
  logger = tf.get_logger()
  level = logger.level
  logger.setLevel("ERROR")  # the profiler's conv statistics call a TF1 helper that logs a deprecation warning
  try:
    return float(tf.compat.v1.profiler.profile(graph, options=options).total_float_ops)
  finally:
    logger.setLevel(level)


def optimizer_flops(config, model: keras.Model) -> float:
  """FLOPs of one optimizer update beyond elementwise work: Muon's Newton-Schulz iterations on each conv
  kernel as an m x n matrix (m <= n): 4 m^2 n + 2 m^3 per iteration. 0 for the other optimizers."""
  optimizer = optim.make_optimizer(config, 1)
  optimizer = getattr(optimizer, "inner_optimizer", optimizer)  # under a LossScaleOptimizer
  if not isinstance(optimizer, optim.MuonSGD):
    return 0.0
  total = 0.0
  for variable in model.trainable_variables:
    if len(variable.shape) == 4:
      m, n = sorted((int(np.prod(variable.shape[:-1])), int(variable.shape[-1])))
      total += optimizer.ns_steps * (4 * m * m * n + 2 * m ** 3)
  return total


def peak_probe(dtype: tf.DType, model: keras.Model | None = None, images: int = 250, seconds: float = 2.0):
  """A function returning {probe: (sustained FLOP/s, FLOP/s of its fastest call)}: a 3x3 convolution (500 x
  15 x 15 x 256 -> 256), a 2048^3 matmul, and the forward conv of each of `model`'s Conv2D layers over
  `images` images, in `dtype`, each called back to back for `seconds`. The model's own shapes make it a
  ceiling for the step: the step's convs ran faster than the 3x3 probe on some hosts (an MFU above 1,
  docs/results.md). Sustained, as the step's own rate is over its window: on a shared VM the fastest of a
  few short calls read ~5% above the same probe's rate over 2 s (docs/results.md). Built and warmed up
  once; main() calls it once per window beside the steps, as a machine's rate drifts between minutes
  (docs/results.md, "The step on Xeon-AMX")."""
  rng = tf.random.Generator.from_seed(0)
  normal = lambda shape: tf.cast(rng.normal(shape), dtype)
  images_3x3, kernel_3x3, a, b = normal([500, 15, 15, 256]), normal([3, 3, 256, 256]), normal([2048] * 2), normal([2048] * 2)
  # Each probe is one op, run eagerly: a tf.function would add nothing but tracing.
  probes = {"conv 3x3 (500x15x15x256 -> 256)": (lambda: tf.nn.conv2d(images_3x3, kernel_3x3, 1, "SAME"),
                                                2 * 500 * 15 * 15 * 9 * 256 * 256),
            "matmul 2048^3": (lambda: a @ b, 2 * 2048 ** 3)}
  seen = set()
  for layer in (model.layers if model else ()):
    if isinstance(layer, keras.layers.Conv2D) and layer.groups == 1 and layer.data_format == "channels_last":
      shape = (tuple(layer.input.shape[1:]), tuple(layer.kernel.shape), layer.strides, layer.padding,
               layer.dilation_rate)
      if shape in seen:  # one probe per shape: repeats would only add time and chances to catch noise
        continue
      seen.add(shape)
      x, kernel = normal([images, *layer.input.shape[1:]]), normal(layer.kernel.shape)
      conv = lambda x=x, kernel=kernel, layer=layer: tf.nn.conv2d(x, kernel, layer.strides, layer.padding.upper(),
                                                                  dilations=layer.dilation_rate)
      name = f"conv as {layer.name} ({images}x{'x'.join(str(d) for d in x.shape[1:])} -> {layer.output.shape[3]})"
      probes[name] = (conv, images * _kernel_flops(layer))
  # Waits for one element, not the whole output: a GPU would otherwise time the copy to the host.
  runs = {name: (lambda probe=probe: tf.reshape(probe(), [-1])[:1].numpy(), flops)
          for name, (probe, flops) in probes.items()}
  for run, _ in runs.values():
    run()
  return lambda: {name: tuple(flops / t for t in _sustained_seconds(run, seconds))
                  for name, (run, flops) in runs.items()}


def two_replicas(gpus: list, replicas: bool) -> bool:
  """Whether `--replicas` compares 2 replicas here: 2 GPUs, or 2 logical CPUs; not on a machine with 1 GPU."""
  return replicas and (len(gpus) > 1 or not gpus)


def strategies(gpus: list, replicas: bool) -> dict:
  """{1: the 1-replica strategy, 2: the 2-replica one when two_replicas (else None)}."""
  kind = "gpu" if gpus else "cpu"
  return {1: tf.distribute.MirroredStrategy([f"/{kind}:0"]),
          2: tf.distribute.MirroredStrategy([f"/{kind}:0", f"/{kind}:1"]) if two_replicas(gpus, replicas) else None}


def held_batch(config, manifest: dict) -> dict:
  """The first global batch of the real train pipeline (host augmentation), as tensors in memory."""
  dataset_fn = data.train_dataset_fn(config, manifest, data.steps_per_epoch_for(config, manifest), start_step=0)
  return next(iter(dataset_fn(tf.distribute.InputContext())))


def replica_batches(strategy, batch: dict):
  """An iterator giving every replica a per-replica share of `batch` (its first rows) at every step."""
  def dataset_fn(ctx):
    rows = ctx.get_per_replica_batch_size(int(batch["labels"].shape[0]))
    return tf.data.Dataset.from_tensors({k: v[:rows] for k, v in batch.items()}).repeat()
  return iter(strategy.distribute_datasets_from_function(dataset_fn))


def custom_loop(config, strategy, manifest: dict, batch: dict, steps: int, epoch: int = 0):
  """A function timing `steps` steps of epoch `epoch` of the trainer's own loop, in images/s."""
  run, _ = benchmark_input.train_loop_timer(config, strategy, manifest, epoch)
  iterator = replica_batches(strategy, batch)
  return lambda: run(iterator, steps)


def keras_fit(config, strategy, manifest: dict, batch: dict, steps: int):
  """A function timing `model.fit` over `steps` steps (one call, `steps_per_execution=steps`) of the same
  model, optimizer and loss under `strategy`, in images/s. What a user of Keras would write instead."""
  shape = data.model_shape(manifest)
  keras.mixed_precision.set_dtype_policy(config.mixed_precision)
  with strategy.scope():
    model = models.build(config.model, shape)
    model.compile(optimizer=optim.make_optimizer(config, data.steps_per_epoch_for(config, manifest)),
                  loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing),
                  metrics=["accuracy"], steps_per_execution=steps, jit_compile=config.jit_compile)
  pairs = tf.data.Dataset.from_tensors((batch["images"], tf.one_hot(batch["labels"], shape.num_classes))).repeat()

  # Timed from the epoch's start to its end: fit's set-up on each call (data adapter, iterator, callbacks)
  # is paid once in a real run, not once per window.
  marks = []
  timer = keras.callbacks.LambdaCallback(on_epoch_begin=lambda *_: marks.append(time.perf_counter()),
                                         on_epoch_end=lambda *_: marks.append(time.perf_counter()))

  def window():
    model.fit(pairs, epochs=1, steps_per_epoch=steps, verbose=0, callbacks=[timer])
    return steps * config.global_batch_size / (marks[-1] - marks[-2])

  return window


def layer_profile(config, manifest: dict, repeats: int = 3) -> list[tuple[str, str, float, float, float]] | None:
  """Each layer of the model alone at the run's global batch on one device: (name, output shape, ms of its
  forward and backward pass (gradients of its input and weights), GFLOP/s of that pass (its forward FLOPs
  x3), GFLOP/s of its forward pass alone), slowest first: a backward pass well below its own forward
  rate is a kernel short of the machine's. None for a model that is not a chain of layers (resnet's skip
  connections)."""
  keras.mixed_precision.set_dtype_policy(config.mixed_precision)
  model = models.build(config.model, data.model_shape(manifest))
  if any(layer.input is not before.output for before, layer in zip(model.layers, model.layers[1:])):
    return None
  x = tf.random.normal([config.global_batch_size, *model.inputs[0].shape[1:]])
  rows = []
  for layer in model.layers[1:]:
    def step(x, layer=layer):
      with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x, training=True)
        loss = tf.reduce_sum(tf.cast(y, tf.float32))
      return y, tape.gradient(loss, [x, *layer.trainable_variables])
    traced, forward = tf.function(step), tf.function(lambda x, layer=layer: layer(x, training=True))
    y, _ = traced(x)
    forward(x)
    to_numpy = lambda function: lambda: tf.nest.map_structure(lambda t: None if t is None else t.numpy(), function(x))
    both, alone = _best_seconds(to_numpy(traced), repeats), _best_seconds(to_numpy(forward), repeats)
    flops = _profiled_flops(layer, x.shape[1:]) * config.global_batch_size
    rows.append((layer.name, "x".join(map(str, y.shape[1:])), both * 1e3, 3 * flops / both / 1e9,
                 flops / alone / 1e9))
    x = tf.cast(y, tf.float32)
  return sorted(rows, key=lambda row: -row[2])


def _sustained_seconds(run, seconds: float) -> tuple[float, float]:
  """Calls `run()` back to back for at least `seconds` (twice at least): (the mean seconds per call, the
  shortest call's seconds)."""
  calls, shortest, start = 0, float("inf"), time.perf_counter()
  while True:
    before = time.perf_counter()
    run()
    calls, now = calls + 1, time.perf_counter()
    shortest = min(shortest, now - before)
    if calls >= 2 and now - start >= seconds:
      return (now - start) / calls, shortest


def _best_seconds(run, repeats: int) -> float:
  """The shortest of `repeats` calls of `run()` (warmed up before), each until its results are there."""
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    run()
    best = min(best, time.perf_counter() - start)
  return best


def op_profile(window, layer_names: set[str], optimizer_name: str) -> tuple[collections.Counter, float]:
  """One call of `window` under TensorFlow's profiler: ({(part, direction, op): seconds}, the window's wall
  seconds). Seconds are each op's duration summed over TensorFlow's executor threads; with one inter-op
  thread (main() sets it for --ops) they add up to about the wall time. part is the model layer whose name
  scope holds the op, "optimizer" or "other"; direction "forward" or "backward" (under the gradient tape)
  for a layer's ops, "" for the others;
  op the kernel's type without oneDNN's _Mkl/_MklNative prefix, "(kernel gradient)" added for the ops of
  layers.Conv2D's own kernel gradient; each run of an XLA program counts whole, as "Conv2D (kernel
  gradient, XLA)" for that float32 kernel gradient (the layer's name is in its program's), else as "XLA
  (GELU, max-pool gradient)" (the compiled GELU and max-pool gradient, which the profile does not tell
  apart)."""
  with tempfile.TemporaryDirectory() as logdir:
    tf.profiler.experimental.start(logdir)
    start = time.perf_counter()
    window()
    wall = time.perf_counter() - start
    tf.profiler.experimental.stop()
    space = xplane_pb2.XSpace()
    for path in tf.io.gfile.glob(f"{logdir}/plugins/profile/*/*.xplane.pb"):
      space.MergeFromString(tf.io.gfile.GFile(path, "rb").read())
  seconds, executions, modules = collections.Counter(), [], []
  for plane in space.planes:
    for line in plane.lines:
      for event in line.events:
        name, secs = plane.event_metadata[event.metadata_id].name, event.duration_ps * 1e-12
        begin = line.timestamp_ns * 1000 + event.offset_ps
        if name == "CpuExecutable::ExecuteAsyncOnStream":  # one run of an XLA program, on TensorFlow's thread
          executions.append((begin, begin + event.duration_ps, secs))
        elif module := _xla_module(plane, event):  # a step inside it (some only hand work to other threads)
          modules.append((begin, module))
        elif "/" in name and ":" in name and not name.startswith("Iterator"):
          scope, op = name.rsplit(":", 1)
          if op in ("PartitionedCall", "StatefulPartitionedCall"):  # a call: its ops are counted themselves
            continue
          parts = [_unnumbered(p) for p in scope.split("/")]
          part = next((p for p in parts if p in layer_names),
                      "optimizer" if _unnumbered(optimizer_name) in parts else "other")
          backward = {"gradient_tape", "gradient"} & set(parts)  # the second: layers.Conv2D's own gradient
          direction = ("backward" if backward else "forward") if part in layer_names else ""
          op = re.sub(r"^_Mkl(Native)?", "", op) + (" (kernel gradient)" if "kernel_gradient" in parts else "")
          seconds[part, direction, op] += secs
  modules.sort()
  for begin, end, secs in executions:  # named by the module of the first step that started within it
    i = bisect.bisect_left(modules, (begin, ""))
    module = modules[i][1] if i < len(modules) and modules[i][0] <= end else ""
    layer = max((l for l in layer_names if f"_{l}_kernel_gradient_" in module), key=len, default=None)
    if layer:  # layers.Conv2D's float32 kernel gradient, compiled under the layer's name
      seconds[layer, "backward", "Conv2D (kernel gradient, XLA)"] += secs
    else:
      seconds["XLA (GELU, max-pool gradient)", "", "XLA (GELU, max-pool gradient)"] += secs
  return seconds, wall


def _xla_module(plane, event) -> str:
  """The name of the XLA module an event of `plane` ran in ("" for TensorFlow's own ops)."""
  for stat in event.stats:
    if plane.stat_metadata[stat.metadata_id].name == "hlo_module":
      return stat.str_value or plane.stat_metadata[stat.ref_value].name
  return ""


def _unnumbered(name: str) -> str:
  """A name scope without the _N TensorFlow and Keras append to make it unique."""
  return re.sub(r"_\d+$", "", name)


def print_op_profile(seconds: collections.Counter, wall: float, images: int) -> None:
  """The op profile summed by op, then by layer and direction: each line with its share of the total, down
  to 0.5%, then the rest in one line."""
  total = sum(seconds.values())
  print(f"op profile: {total:.2f} s of ops summed over threads in {wall:.2f} s of wall time, {images} images")
  for title, key in (("op", lambda k: k[2] + (f" ({k[1] or k[0]})" if k[2] == "MatMul" else "")),
                     ("layer", lambda k: f"{k[0]} {k[1]}".strip())):
    sums = collections.Counter()
    for k, secs in seconds.items():
      sums[key(k)] += secs
    print(f"{'by ' + title:<40} {'seconds':>8} {'share':>6}")
    shown = [(name, secs) for name, secs in sums.most_common() if secs >= 0.005 * total]
    rest = total - sum(secs for _, secs in shown)
    for name, secs in shown + [(f"the rest ({len(sums) - len(shown)})", rest)]:
      print(f"{name:<40} {secs:>8.3f} {secs / total:>6.1%}")


PEAK = "peak probe (the fastest of each window)"


def compare(measures: dict, windows: int) -> dict[str, list[float]]:
  """The rates of each of `measures` (name -> a function timing one window: images/s, or FLOP/s for the
  PEAK probe) in alternating windows, one per round; prints each one's median, min and max."""
  rates = benchmark_input.alternating_windows(measures, windows)
  for name, values in rates.items():
    scale, unit = (1e9, "GFLOP/s") if name == PEAK else (1, "images/s")
    print(f"{name:<44} median {statistics.median(values) / scale:>9,.1f}  min {min(values) / scale:>9,.1f}  "
          f"max {max(values) / scale:>9,.1f} {unit}")
  return rates


def paired(numerators: list[float], denominators: list[float]) -> float:
  """The median of the ratios of windows of one round: each pair ran minutes apart at most, so the ratio
  cancels the machine's drift over the run, which the ratio of two medians keeps."""
  return statistics.median(n / d for n, d in zip(numerators, denominators, strict=True))


def kernels_comparison(config, strategy, manifest: dict, batch: dict, steps: int, windows: int,
                       epoch: int) -> float:
  """Median images/s with `model.fast_kernels` on over off, in epoch `epoch`'s step."""
  measures = {}
  for name, fast in (("train step, Keras's BatchNorm and GELU", False), ("train step, fast kernels", True)):
    variant = config.copy_and_resolve_references()
    variant.model.fast_kernels = fast
    measures[name] = custom_loop(variant, strategy, manifest, batch, steps, epoch)
  keras_rates, fast_rates = compare(measures, windows).values()
  ratio = paired(fast_rates, keras_rates)
  print(f"fast / keras: {ratio:.2f}")
  return ratio


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  tf.get_logger().setLevel("WARNING")  # tf.distribute logs every all-reduce it builds at INFO
  config = FLAGS.config.copy_and_resolve_references()
  gpus = tf.config.list_physical_devices("GPU")
  try:  # what the trainer would refuse, in its words, before TensorFlow's devices start
    manifest, _ = checks.check_config_and_data(config, 2 if two_replicas(gpus, FLAGS.replicas) else 1)
  except (manifest_lib.ManifestError, TrainingError) as e:
    sys.exit(f"benchmark_step: error: {e}")
  if FLAGS.epoch is not None and FLAGS.epoch >= config.num_epochs:
    sys.exit(f"benchmark_step: error: --epoch={FLAGS.epoch}: the config trains epochs 0 to {config.num_epochs - 1}")
  precision.resolve(config)  # "auto": what the trainer would train in here
  config.input.augment_on = "host"  # model.fit is fed the same augmented batch
  if FLAGS.ops:  # ops one at a time, so that each op's time is its own (two side by side share the cores)
    tf.config.threading.set_inter_op_parallelism_threads(1)
  if not gpus and FLAGS.replicas:
    distribute.configure_devices(2)
  kinds = strategies(gpus, FLAGS.replicas)
  dtype = COMPUTE_DTYPES[config.mixed_precision]
  print(f"data_dir {config.data_dir}, batch {config.global_batch_size}, model {config.model.name} "
        f"{tuple(config.model.widths)}, optimizer {config.optimizer.name}, {config.mixed_precision}, "
        f"{'GPU ' + gpus[0].name if gpus else 'CPU'}")

  keras.mixed_precision.set_dtype_policy(config.mixed_precision)
  model = models.build(config.model, data.model_shape(manifest))
  epoch = run_epoch(model, config.num_epochs) if FLAGS.epoch is None else FLAGS.epoch
  per_image, forward, update = step_flops(config, model, epoch)
  frozen = len(model.trainable_variables) - len(models.trainable_at(model, epoch))
  print(f"train step of epoch {epoch} ({frozen} trainable variables frozen by then; model.fit trains them "
        f"all): {per_image / 1e9:.3f} GFLOP per image (forward {forward / 1e9:.3f} counted by TensorFlow's "
        f"profiler, x3 for forward + backward, less {unmade_gradient_flops(model, epoch) / 1e9:.4f} of gradient "
        f"products not made, + the optimizer's Newton-Schulz matmuls {update / 1e9:.2f} GFLOP per step)")
  probe = peak_probe(dtype, model, seconds=FLAGS.probe_secs)

  batch = held_batch(config, manifest)
  measures = {"custom loop (steps.Learner), 1 replica": custom_loop(config, kinds[1], manifest, batch, FLAGS.steps,
                                                                   epoch)}
  if FLAGS.fit:
    measures["model.fit, 1 replica"] = keras_fit(config, kinds[1], manifest, batch, FLAGS.steps)
    # The custom loop also in the step that trains what fit trains, where the default epoch's does not: the
    # kernels alone compared.
    everything = [e for e in range(max(config.num_epochs, 1))
                  if len(models.trainable_at(model, e)) == len(model.trainable_variables)]
    if everything and everything[0] != epoch:
      same_epoch = everything[0]
      measures[f"custom loop at epoch {same_epoch}, 1 replica"] = custom_loop(config, kinds[1], manifest, batch,
                                                                               FLAGS.steps, same_epoch)
  if FLAGS.replicas and kinds[2] is not None:
    measures["custom loop, 2 replicas"] = custom_loop(config, kinds[2], manifest, batch, FLAGS.steps, epoch)
  elif FLAGS.replicas:
    print("2 / 1 replicas: skipped, this machine has 1 GPU")
  probe_windows = []  # each window's {probe: (sustained FLOP/s, its fastest call's)}, the warm-up first

  def fastest_probe():
    probe_windows.append(probe())
    return max(sustained for sustained, _ in probe_windows[-1].values())

  measures[PEAK] = fastest_probe
  rates = compare(measures, FLAGS.windows)
  if FLAGS.kernels:
    kernels_comparison(config, kinds[1], manifest, batch, FLAGS.steps, FLAGS.windows, epoch)
  if FLAGS.ops:
    optimizer_name = optim.make_optimizer(config, 1).name
    seconds, wall = op_profile(measures["custom loop (steps.Learner), 1 replica"],
                               {layer.name for layer in model.layers}, optimizer_name)
    print_op_profile(seconds, wall, FLAGS.steps * config.global_batch_size)
  if FLAGS.layers:
    print(f"{'layer':<16} {'output':<12} {'ms fwd+bwd':>10} {'GFLOP/s':>9} {'fwd alone':>9}  "
          f"(batch {config.global_batch_size}, alone; GFLOP/s)")
    profile = layer_profile(config, manifest)
    if profile is None:
      print("layer profile: skipped, the model is not a chain of layers")
    for name, shape, ms, gflops, forward_gflops in profile or ():
      print(f"{name:<16} {shape:<12} {ms:>10.1f} {gflops:>9.1f} {forward_gflops:>9.1f}")

  assert len(probe_windows) == FLAGS.windows + 1, "the probe ran outside its windows: the pairs would not match"
  windows = probe_windows[1:]
  sustained = {name: [window[name][0] for window in windows] for name in windows[0]}  # per probe, by window
  for name, rates_of in sustained.items():
    print(f"peak probe, {name} in {dtype.name}: {statistics.median(rates_of) / 1e9:,.0f} GFLOP/s sustained, "
          f"{statistics.median(w[name][1] for w in windows) / 1e9:,.0f} its fastest call (medians of the windows)")
  top = max(sustained, key=lambda name: statistics.median(sustained[name]))
  peak = sustained[top]
  print(f"peak: {top}, the probe of the highest median: median {statistics.median(peak) / 1e9:,.1f}  min "
        f"{min(peak) / 1e9:,.1f}  max {max(peak) / 1e9:,.1f} GFLOP/s")
  custom = rates["custom loop (steps.Learner), 1 replica"]
  achieved = [c * per_image for c in custom]
  print(f"achieved: {statistics.median(custom) * per_image / 1e9:,.0f} GFLOP/s at {statistics.median(custom):,.1f} "
        f"images/s; peak {statistics.median(peak) / 1e9:,.0f} GFLOP/s (medians); each ratio below is the median "
        f"of its {FLAGS.windows} rounds' own")
  fastest_calls = [max(fastest for _, fastest in window.values()) for window in windows]
  print(f"(MFU against each window's fastest probe instead: {paired(achieved, rates[PEAK]):.3f}; against the "
        f"fastest single call of its {FLAGS.probe_secs:g} s of probes: {paired(achieved, fastest_calls):.3f})")
  print(f"MFU: {paired(achieved, peak):.3f}")
  if "model.fit, 1 replica" in rates:
    print(f"custom loop / fit: {paired(custom, rates['model.fit, 1 replica']):.3f}")
    same = next((name for name in rates if name.startswith("custom loop at epoch ")), None)
    if same:
      print(f"{same.rsplit(',', 1)[0]} (the variables fit trains) / fit: "
            f"{paired(rates[same], rates['model.fit, 1 replica']):.3f}")
  if "custom loop, 2 replicas" in rates:
    print(f"2 / 1 replicas: {paired(rates['custom loop, 2 replicas'], custom):.3f}")


if __name__ == "__main__":
  define_flags()
  app.run(main, flags_parser=trainer_main.flags_parser("benchmark_step"))
