"""The custom training loop: `train_and_evaluate(config, workdir)`.

One `strategy.scope()` makes the model, optimizer, step counter and checkpoint. Step functions are pure
tf.functions run per replica by `strategy.run`; Python (logging, summaries, checkpoints, evaluation)
runs between calls of `steps_per_loop` steps. The loss is averaged over the global batch.
"""

import dataclasses
import datetime
import importlib.metadata
import json
import math
import os
import platform
import subprocess
import sys
import time

from absl import logging
import keras
import ml_collections
import numpy as np
import tensorflow as tf

from pipeline import augment
from pipeline import cifar10
from pipeline import fileio
from pipeline import input_pipeline
from pipeline import manifest as manifest_lib
from pipeline import ops
from trainer import distribute
from trainer import export as export_lib
from trainer import faults
from trainer import figures
from trainer.faults import TrainingError  # pylint: disable=unused-import  (part of this module's API)
from trainer import models
from trainer import optim


class Sums:
  """Running sums kept per replica and read as totals over all replicas (ON_READ, SUM variables): scalars
  by name, and arrays given as name=shape.

  Create under `strategy.scope()`; `add` runs per replica inside the step; `result` and `reset` run
  between steps.
  """

  def __init__(self, *names: str, **shapes: tuple[int, ...]):
    self._vars = {n: tf.Variable(tf.zeros(shape), trainable=False, name=n,
                                 synchronization=tf.VariableSynchronization.ON_READ,
                                 aggregation=tf.VariableAggregation.SUM)
                  for n, shape in {**{n: () for n in names}, **shapes}.items()}

  def add(self, **values) -> None:
    """Runs per replica."""
    for name, value in values.items():
      self._vars[name].assign_add(tf.cast(value, tf.float32))

  def total(self, name: str) -> tf.Tensor:
    """The sum over replicas, as a tensor (usable inside a tf.function, in cross-replica context)."""
    return self._vars[name].read_value()

  def result(self) -> dict:
    """Floats for the scalars, numpy arrays for the rest."""
    values = {n: v.read_value().numpy() for n, v in self._vars.items()}
    return {n: float(x) if x.ndim == 0 else x for n, x in values.items()}

  def reset(self) -> None:
    for v in self._vars.values():
      v.assign(tf.zeros_like(v))


@dataclasses.dataclass
class State:
  """What a run trains and checkpoints, made under one strategy scope."""
  model: keras.Model
  optimizer: keras.optimizers.Optimizer
  step: tf.Variable  # train steps done; the checkpoint's number
  checkpoint: tf.train.Checkpoint
  train_sums: Sums
  eval_sums: Sums
  ema: optim.EMA | None  # averaged weights, when optimizer.ema_decay > 0
  lookahead: optim.Lookahead | None  # when optimizer.lookahead_every > 0


def make_state(config, strategy, steps_per_epoch: int) -> State:
  opt = config.optimizer
  keras.mixed_precision.set_dtype_policy(config.mixed_precision)
  keras.utils.set_random_seed(config.seed)
  with strategy.scope():
    model = models.build(config.model)
    optimizer = optim.make_optimizer(config, steps_per_epoch)
    optimizer.build(model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    ema = optim.EMA(model.trainable_variables, opt.ema_decay) if opt.ema_decay else None
    lookahead = (optim.Lookahead(model.variables, opt.lookahead_every, opt.lookahead_decay,
                                 config.num_epochs * steps_per_epoch) if opt.lookahead_every else None)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step,
                                     **({"ema": ema.averages} if ema else {}),
                                     **({"lookahead": lookahead.averages} if lookahead else {}))
    return State(model, optimizer, step, checkpoint, Sums("loss", "correct", "count"),
                 Sums("loss", "correct", "count", confusion=(cifar10.NUM_CLASSES, cifar10.NUM_CLASSES)),
                 ema, lookahead)


NORMALIZATIONS = {"centered": ((0.5, 0.5, 0.5), (1.0, 1.0, 1.0)),  # pixels / 255 - 0.5
                  "unit": ((0.0, 0.0, 0.0), (1.0, 1.0, 1.0))}  # pixels / 255


def normalization_for(config, manifest: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """(mean, std) in [0, 1] units for `config.input.normalization`: `dataset` (the train split's per-channel
  statistics from the manifest: z-score), `centered` or `unit`. The export bakes the same in."""
  if config.input.normalization == "dataset":
    return manifest_lib.normalization(manifest)
  if config.input.normalization not in NORMALIZATIONS:
    raise ValueError(f"input.normalization={config.input.normalization!r} is not one of: dataset, "
                     f"{', '.join(NORMALIZATIONS)}")
  return NORMALIZATIONS[config.input.normalization]


def cross_entropy(labels: tf.Tensor, logits: tf.Tensor, label_smoothing: float) -> tf.Tensor:
  """Per-example softmax cross-entropy in float32; labels are class ids or [N, 10] probabilities."""
  logits = tf.cast(logits, tf.float32)
  if labels.dtype.is_integer:
    labels = tf.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    labels = labels * (1.0 - label_smoothing) + label_smoothing / logits.shape[-1]
  return tf.nn.softmax_cross_entropy_with_logits(labels, logits)


def _correct(labels, logits):
  hard = labels if labels.dtype.is_integer else tf.argmax(labels, -1)
  return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1), hard), tf.float32))


def make_train_loop(config, strategy, state: State, mean=None, std=None):
  """Returns train_loop(iterator, num_steps, epoch): `num_steps` steps of epoch number `epoch` (a Python
  int: it decides which variables train, models.trainable_at) inside one tf.function call.

  With `config.input.augment_on="device"` each step first augments and normalises its raw uint8 batch
  (`mean`, `std` in [0, 1] units) on the replica's device.
  """
  model, optimizer = state.model, state.optimizer
  multipliers = dict(zip((id(v) for v in model.trainable_variables),
                         optim.gradient_multipliers(model, config.optimizer)))
  loss_scaled = optim.loss_scale(optimizer) is not None

  def gradients(images, labels, variables):
    """The forward and backward pass: (per-example losses, correct count, gradients). With
    `config.jit_compile` XLA compiles this part per replica; the cross-replica gradient sum and the update
    stay outside it (XLA cannot compile the iterator or the strategy's merge_call)."""
    with tf.GradientTape() as tape:
      logits = model(images, training=True)
      per_example = cross_entropy(labels, logits, config.label_smoothing)
      loss = tf.nn.compute_average_loss(per_example, global_batch_size=config.global_batch_size)
      if model.losses:  # weight penalties (kernel_regularizer), counted once over the replicas
        loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
      scaled = optimizer.scale_loss(loss)  # the identity unless optimizer is a LossScaleOptimizer
    return per_example, _correct(labels, logits), tape.gradient(scaled, variables)

  def step_fn(batch, variables):
    """Runs per replica."""
    if config.input.augment_on == "device":
      batch = augment.train_preprocess(batch, config.augment, mean, std)
    images, labels = batch["images"], batch["labels"]
    if config.jit_compile:  # a function of this replica's own (traced once per replica and variable set)
      compiled = tf.function(lambda x, y: gradients(x, y, variables), jit_compile=True)
      per_example, correct, grads = compiled(images, labels)
    else:
      per_example, correct, grads = gradients(images, labels, variables)
    if loss_scaled and strategy.num_replicas_in_sync > 1 and not config.optimizer.clip_norm:
      grads = optim.agree_on_finite(grads)  # clipping all-reduces the gradients, so agrees already
    if config.optimizer.clip_norm:
      grads = optim.clip_by_global_norm(grads, config.optimizer.clip_norm * optim.scale_factor(optimizer))
    grads = [g * multipliers[id(v)] if multipliers[id(v)] != 1.0 else g for g, v in zip(grads, variables)]
    optimizer.apply(grads, variables)
    state.train_sums.add(loss=tf.reduce_sum(per_example), correct=correct, count=tf.shape(per_example)[0])

  def sync_fn():
    """Runs per replica. Keras 3 keeps BatchNorm moving statistics per replica (aggregation NONE), so
    they drift apart; averaging them after every loop keeps all replicas, checkpoints and the export equal."""
    ctx = tf.distribute.get_replica_context()
    for v in model.non_trainable_variables:
      if tf.as_dtype(v.dtype).is_floating:
        v.assign(ctx.all_reduce(tf.distribute.ReduceOp.MEAN, tf.identity(v.value)))

  def loop(iterator, num_steps, variables):
    for _ in tf.range(num_steps):
      strategy.run(step_fn, args=(next(iterator), variables))
      state.step.assign_add(1)
      if state.ema:
        state.ema.update()
      if state.lookahead:
        state.lookahead.update(state.step)
      if not tf.math.is_finite(state.train_sums.total("loss")):
        break  # stop at the step that went wrong; Python reports it
    if strategy.num_replicas_in_sync > 1:
      strategy.run(sync_fn)

  traced = {}  # one tf.function per set of trained variables (airbench: 2), not one trace per epoch

  def train_loop(iterator, num_steps, epoch: int):
    variables = models.trainable_at(model, epoch)
    key = tuple(id(v) for v in variables)
    if key not in traced:
      traced[key] = tf.function(lambda it, n: loop(it, n, variables))
    traced[key](iterator, num_steps)

  return train_loop


def make_eval_step(strategy, state: State, tta: str = "none", worst: int = 0):
  """Returns eval_step(batch), adding to `state.eval_sums` (loss, correct, count, confusion matrix); `tta`
  as in export.tta_logits. With `worst` > 0 it returns, per replica, the batch's `worst` misclassified
  images with the highest loss (fewer if fewer are wrong), with their labels, predictions and loss."""

  def step_fn(batch):
    """Runs per replica; a replica may get an empty last batch."""
    images, labels = batch["images"], batch["labels"]
    logits = export_lib.tta_logits(state.model, images, tta)
    per_example = cross_entropy(labels, logits, 0.0)
    predicted = tf.argmax(logits, -1, output_type=labels.dtype)
    state.eval_sums.add(loss=tf.reduce_sum(per_example), correct=_correct(labels, logits),
                        count=tf.shape(labels)[0],
                        confusion=tf.math.confusion_matrix(labels, predicted, num_classes=cifar10.NUM_CLASSES,
                                                                 dtype=tf.float32))
    if not worst:
      return {}
    wrong = tf.not_equal(predicted, labels)
    top = tf.math.top_k(tf.where(wrong, per_example, -1.0), tf.minimum(worst, tf.shape(labels)[0])).indices
    top = tf.boolean_mask(top, tf.gather(wrong, top))
    return {"images": tf.gather(images, top), "labels": tf.gather(labels, top),
            "predicted": tf.gather(predicted, top), "loss": tf.gather(per_example, top),
            "probability": tf.gather(tf.reduce_max(tf.nn.softmax(logits), -1), top)}

  traced = tf.function(lambda batch: strategy.run(step_fn, args=(batch,)), reduce_retracing=True)

  def eval_step(batch):
    return traced(batch)

  eval_step.worst, eval_step.strategy = worst, strategy
  return eval_step


def make_bn_statistics_step(strategy, model: keras.Model):
  """Returns step(batch) -> [(mean, variance)] per BatchNormalization layer of `model` (top level): the
  per-channel moments of the layer's input with the model in training mode (every layer normalising by
  its batch's own statistics), averaged over the replicas. None when the model has no such layer."""
  layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
  if not layers:
    return None
  probe = keras.Model(model.inputs, [layer.input for layer in layers])

  def step_fn(batch):
    outputs = probe(batch["images"], training=True)
    moments = [tf.nn.moments(tf.cast(x, tf.float32), axes=list(range(len(x.shape) - 1))) for x in outputs]
    ctx = tf.distribute.get_replica_context()
    return ctx.all_reduce(tf.distribute.ReduceOp.MEAN, moments)

  traced = tf.function(lambda batch: strategy.run(step_fn, args=(batch,)))

  def step(batch):
    return [tuple(strategy.experimental_local_results(m)[0] for m in pair) for pair in traced(batch)]

  step.layers = layers
  return step


def recompute_bn_statistics(config, strategy, state: State, manifest: dict) -> int:
  """Sets every BatchNorm layer's moving mean and variance to the averages of its batch statistics over
  the first `config.bn_statistics_images` unaugmented train images, with the final weights: the running
  statistics trail the weights (a few batches' worth at airbench's momentum) and lookahead or EMA
  averages them with the weights, so after averaging they no longer match the weights they serve
  ("precise BN"). Same result on every replica and worker; returns the images used (0: no BN layer)."""
  step = make_bn_statistics_step(strategy, state.model)
  if step is None:
    return 0
  images = max(min(config.bn_statistics_images, manifest_lib.num_examples(manifest, "train")),
               config.global_batch_size)
  mean, std = normalization_for(config, manifest)
  dataset = strategy.distribute_datasets_from_function(lambda ctx: input_pipeline.build_prefix_dataset(
      config.data_dir, "train", images=images, global_batch_size=config.global_batch_size, mean=mean, std=std,
      input_context=ctx))
  totals, count = None, 0
  for batch in dataset:
    moments = [(m.numpy(), v.numpy()) for m, v in step(batch)]
    totals = moments if totals is None else [(a + m, b + v) for (a, b), (m, v) in zip(totals, moments)]
    count += 1
  for layer, (m, v) in zip(step.layers, totals):
    layer.moving_mean.assign(m / count)
    layer.moving_variance.assign(v / count)
  return count * config.global_batch_size


def evaluate(eval_step, dataset, sums: Sums) -> tuple[dict[str, float], dict]:
  """One pass over a distributed eval dataset. Returns its metrics (loss, accuracy, image count) and
  details: the confusion matrix (true class by row) and, when eval_step collects them, the `worst`
  misclassified images this process saw (all of them on one machine; on several, the chief's share)."""
  sums.reset()
  candidates = []
  for batch in dataset:
    out = eval_step(batch)
    if eval_step.worst:
      for local in eval_step.strategy.experimental_local_results(out):
        candidates.append({k: v.numpy() for k, v in local.items()})
  totals = sums.result()
  count = max(totals["count"], 1.0)
  metrics = {"loss": totals["loss"] / count, "accuracy": totals["correct"] / count, "count": int(totals["count"])}
  details = {"confusion": totals["confusion"].astype(np.int64)}
  if candidates:
    merged = {k: np.concatenate([c[k] for c in candidates]) for k in candidates[0]}
    order = np.argsort(-merged["loss"], kind="stable")[:eval_step.worst]
    details["worst"] = {k: v[order] for k, v in merged.items()}
  return metrics, details


def _git_commit() -> str | None:
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                         capture_output=True, text=True, timeout=10, check=True)
    return out.stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None


def _project_version() -> str:
  try:
    return importlib.metadata.version("cifar10-tf-pipeline")
  except importlib.metadata.PackageNotFoundError:  # run from a checkout without installing
    return "unknown"


def _now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def steps_per_epoch_for(config, manifest: dict) -> int:
  per_epoch = manifest_lib.num_examples(manifest, "train") // config.global_batch_size
  if config.steps_per_epoch:
    per_epoch = min(per_epoch, config.steps_per_epoch) if per_epoch else config.steps_per_epoch
  if per_epoch <= 0:
    raise TrainingError(f"global_batch_size={config.global_batch_size} is larger than the train split "
                        f"({manifest_lib.num_examples(manifest, 'train')} images)")
  return per_epoch


WORKDIR_FILES = ("checkpoints", "summaries", "export", "config.json", "run.json", "tmp", "report")  # report: tools.report


def check_workdir(workdir: str) -> None:
  """Refuses a workdir that holds something else than a run of this trainer, or cannot be written."""
  try:
    fileio.check_bucket(workdir)
  except fileio.StorageError as e:
    raise TrainingError(f"workdir {e}") from None
  if tf.io.gfile.isdir(workdir):
    foreign = sorted(n.rstrip("/") for n in tf.io.gfile.listdir(workdir)
                     if n.rstrip("/") not in WORKDIR_FILES and not n.startswith(".tmp-"))
    if foreign:
      raise TrainingError(f"workdir {workdir} is not empty and is not a run of this trainer "
                          f"(it holds {', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); "
                          "give an empty or new directory")
  elif tf.io.gfile.exists(workdir) and not tf.io.gfile.isdir(workdir):  # another worker may create it meanwhile
    raise TrainingError(f"workdir {workdir} is a file, not a directory")
  try:
    tf.io.gfile.makedirs(workdir)
    probe = fileio.temp_name(os.path.join(workdir, "probe"))
    fileio.atomic_write(probe, "")
    tf.io.gfile.remove(probe)
  except (tf.errors.OpError, OSError) as e:
    raise TrainingError(f"workdir {workdir} is not writable ({getattr(e, 'message', e)})") from None


def check_profile_steps(config) -> None:
  steps = tuple(config.profile_steps)
  if steps and not (len(steps) == 2 and all(isinstance(s, int) for s in steps) and 0 <= steps[0] < steps[1]):
    raise TrainingError(f"profile_steps={steps}: give (first, end) train steps with 0 <= first < end, "
                        "e.g. --config.profile_steps='(10, 15)', or () for no trace")


def check_jit_compile(config) -> None:
  if config.jit_compile and config.model.get("sync_bn"):
    raise TrainingError("jit_compile=True cannot compile model.sync_bn's cross-replica all-reduce inside "
                        "the replica's step; set --config.model.sync_bn=False or --config.jit_compile=False")


def check_batch_sizes(config, replicas: int) -> None:
  for key in ("global_batch_size", "eval_batch_size"):
    if config[key] % replicas:
      raise TrainingError(f"{key}={config[key]} does not divide by the {replicas} replicas; "
                          f"use a multiple of {replicas}")


def train_dataset_fn(config, manifest: dict, steps_per_epoch: int, start_step: int):
  """The function `distribute_datasets_from_function` calls once per input pipeline for training."""
  mean, std = normalization_for(config, manifest)

  def dataset_fn(ctx):
    return input_pipeline.build_train_dataset(
        config, config.data_dir, steps_per_epoch=steps_per_epoch, global_batch_size=config.global_batch_size,
        mean=mean, std=std, input_context=ctx, start_step=start_step)

  return dataset_fn


def distributed_eval_dataset(config, strategy, manifest: dict, split: str, global_batch_size: int):
  """One split, unaugmented, in file order, distributed over the strategy's replicas in global batches
  of `global_batch_size`."""
  mean, std = normalization_for(config, manifest)
  return strategy.distribute_datasets_from_function(lambda ctx: input_pipeline.build_eval_dataset(
      config.data_dir, split, batch_size=ctx.get_per_replica_batch_size(global_batch_size), mean=mean, std=std,
      input_context=ctx))


def distributed_eval_datasets(config, strategy, manifest: dict) -> dict:
  """Distributed eval datasets by split name, for the splits the manifest has."""
  return {split: distributed_eval_dataset(config, strategy, manifest, split, config.eval_batch_size)
          for split in ("validation", "test") if split in manifest["splits"]}


DATA_INIT_IMAGES = 5000


def _initialize_from_data(config, manifest: dict, state: State) -> None:
  """Layers set from the data before the first step (models.PatchWhitening) see the first
  DATA_INIT_IMAGES normalised train images, in file order: the same on every worker and every run."""
  mean, std = normalization_for(config, manifest)
  load = lambda: next(iter(input_pipeline.build_eval_dataset(
      config.data_dir, "train", batch_size=DATA_INIT_IMAGES, mean=mean, std=std)))["images"]
  if models.initialize_from_data(state.model, load):
    for averages in (state.ema, state.lookahead):
      if averages:
        averages.reset()


def _write_input_summaries(config, manifest: dict, writer, step: int) -> None:
  """From one host pipeline as configured (host-side augmentation): a grid of augmented training images as
  the model gets them (de-normalised), and the images/s the pipeline produces alone, over
  `input.probe_batches` batches after two of warm-up (the step's own rate is train/images_per_sec)."""
  mean, std = normalization_for(config, manifest)
  host = config.copy_and_resolve_references()
  host.input.augment_on, host.input.data_service = "host", ""
  batches = iter(input_pipeline.build_train_dataset(host, config.data_dir, steps_per_epoch=1,
                                                    global_batch_size=config.global_batch_size, mean=mean, std=std))
  images = next(batches)["images"]
  side = min(8, math.isqrt(images.shape[0]))
  images = ops.denormalize(images[:side * side], mean, std)
  rows = tf.reshape(images, [side, side * 32, 32, 3])  # each row of the grid: `side` images stacked
  grid = tf.reshape(tf.transpose(tf.reshape(rows, [side, side, 32, 32, 3]), [0, 2, 1, 3, 4]),
                    [1, side * 32, side * 32, 3])
  with writer.as_default(step=step):
    tf.summary.image("train/augmented_inputs", grid)
  if config.input.probe_batches:
    for _ in range(2):
      next(batches)
    start = time.perf_counter()
    for _ in range(config.input.probe_batches):
      next(batches)
    rate = config.input.probe_batches * config.global_batch_size / (time.perf_counter() - start)
    _write_scalars(writer, step, "input", {"images_per_sec": rate})
    logging.info("input pipeline alone: %.0f images/s", rate)


def flat_config(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
  """[(dotted key, value)] of a nested config dict."""
  rows = []
  for key, value in tree.items():
    if isinstance(value, dict):
      rows += flat_config(value, f"{prefix}{key}.")
    else:
      rows.append((f"{prefix}{key}", value))
  return rows


def _write_hparams(config, writer) -> None:
  """The config in TensorBoard's HParams dashboard (tuples as text), against the validation metrics."""
  from tensorboard.plugins.hparams import api as hp  # pylint: disable=g-import-not-at-top
  values = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in flat_config(config.to_dict())}
  with writer.as_default():
    hp.hparams_config(hparams=[hp.HParam(k) for k in values],
                      metrics=[hp.Metric("validation/accuracy"), hp.Metric("validation/loss"),
                               hp.Metric("train/loss")])
    hp.hparams(values)


def _write_eval_images(run, step: int, details: dict) -> None:
  """TensorBoard images of one evaluation: its confusion matrix and its worst misclassified images."""
  names = list(manifest_lib.class_names(run.manifest))
  with run.writer.as_default(step=step):
    tf.summary.image("validation/confusion_matrix",
                     figures.summary_image(figures.confusion(details["confusion"], names)))
    worst = details.get("worst")
    if worst is not None and len(worst["labels"]):
      mean, std = normalization_for(run.config, run.manifest)
      images = ops.denormalize(worst["images"], mean, std).numpy()
      tf.summary.image("validation/worst_misclassified", figures.summary_image(figures.predictions(
          images, worst["labels"], worst["predicted"], worst["probability"], names)))


def _write_scalars(writer, step: int, prefix: str, scalars: dict) -> None:
  with writer.as_default(step=step):
    for name, value in scalars.items():
      tf.summary.scalar(f"{prefix}/{name}", value)


@dataclasses.dataclass
class Run:
  """Everything one call of train_and_evaluate works with."""
  config: ml_collections.ConfigDict
  workdir: str
  strategy: tf.distribute.Strategy
  chief: bool
  manifest: dict
  steps_per_epoch: int
  total_steps: int
  state: State
  manager: tf.train.CheckpointManager
  writer: object
  start_step: int
  started: str
  saved_step: int  # the step of the last checkpoint this run wrote or restored (-1: none), alike on every worker
  metrics: dict = dataclasses.field(default_factory=dict)


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns the final metrics."""
  with faults.data_errors_as_training_errors():
    run = _start(config, workdir)
    with faults.StopRequest() as stop:
      stopped = _train(run, stop)
    if stopped:  # agreed by every worker: all save here and leave together
      step = int(run.state.step.numpy())
      path = _save(run, step)
      cause = stop.signal or "another worker's stop request"
      logging.info("stopped by %s at step %d; checkpoint %s written. Run the same command to resume.",
                   cause, step, path)
      _finish(run, status=f"stopped by {cause}")
      return run.metrics
    eval_step = make_eval_step(run.strategy, run.state, config.tta)  # the export's own views
    if run.state.lookahead:  # the weights end as their lookahead average (idempotent on a re-run)
      run.state.lookahead.finish()
    if run.state.ema:  # the final evaluation and the export use the averaged weights
      run.state.ema.swap()
    if config.bn_statistics_images:
      images = recompute_bn_statistics(config, run.strategy, run.state, run.manifest)
      logging.info("BatchNorm statistics re-estimated from %d train images", images)
    for split, dataset in distributed_eval_datasets(config, run.strategy, run.manifest).items():
      run.metrics[split], _ = evaluate(eval_step, dataset, run.state.eval_sums)
      logging.info("final %s: %s", split, _fmt(run.metrics[split]))
  if run.chief and config.export:
    mean, std = normalization_for(run.config, run.manifest)
    path = export_lib.export(run.state.model, os.path.join(workdir, "export"), mean=mean, std=std,
                             class_names=manifest_lib.class_names(run.manifest), tta=config.tta)
    logging.info("exported SavedModel to %s", path)
  _finish(run, status="finished")
  return run.metrics


def _start(config, workdir: str) -> Run:
  """Strategy, data, model and optimizer, restored from the latest checkpoint if there is one."""
  started = _now()
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  strategy = distribute.make_strategy(config)
  distribute.log_devices(strategy)
  chief = distribute.is_chief(strategy)
  manifest, steps_per_epoch, latest = _agreed(strategy, lambda: _check_start(config, workdir, strategy))
  check_same_checkpoint(strategy, latest)
  state = make_state(config, strategy, steps_per_epoch)
  if latest:
    _agreed(strategy, lambda: restore(state, latest))
    logging.info("resumed from %s at step %d", latest, int(state.step.numpy()))
  manager = _checkpoint_manager(config, strategy, state, workdir)
  if chief:  # check_workdir made the directory
    fileio.atomic_write(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2) + "\n")
  check_shared_workdir(strategy, workdir)
  # Buffered: events reach the file at most every summary_flush_secs and on exit, not per call. On gs://
  # every flush re-uploads the event file, so per-step flushing would cost more than the training.
  writer = (tf.summary.create_file_writer(os.path.join(workdir, "summaries"), max_queue=10000,
                                          flush_millis=int(config.summary_flush_secs * 1000)) if chief
            else tf.summary.create_noop_writer())
  start_step = int(state.step.numpy())
  if not latest:
    _initialize_from_data(config, manifest, state)
  if chief and start_step == 0:
    _write_input_summaries(config, manifest, writer, start_step)
    _write_hparams(config, writer)
  run = Run(config, workdir, strategy, chief, manifest, steps_per_epoch, config.num_epochs * steps_per_epoch,
            state, manager, writer, start_step, started, saved_step=start_step if latest else -1)
  if chief:  # what the next start checks a resume against, even if this one is killed
    _write_run_json(run, "running")
  return run


def _check_start(config, workdir: str, strategy) -> tuple[dict, int, str | None]:
  """This worker's checks of the config, the data and the workdir before anything is built or written.
  Returns the manifest, the steps per epoch and the latest checkpoint (the chief's) or None."""
  check_batch_sizes(config, strategy.num_replicas_in_sync)
  check_profile_steps(config)
  check_jit_compile(config)
  manifest = manifest_lib.load(config.data_dir)
  if config.input.verify_checksums:
    manifest_lib.verify_checksums(config.data_dir, manifest, manifest["splits"])
  steps_per_epoch = steps_per_epoch_for(config, manifest)
  check_workdir(workdir)
  # Every worker restores the chief's checkpoint, so that all resume at the same step: a non-chief's own
  # checkpoints (tmp/, written only because saving is collective) may be missing or one save behind.
  latest = tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))
  if latest:  # a run that never checkpointed may be retried with other values
    check_resumable(config, workdir, steps_per_epoch, distribute.describe(strategy)["workers"])
  return manifest, steps_per_epoch, latest


def _agreed(strategy, check):
  """Runs the start-up `check` on every worker and returns its result. If it refuses on any worker,
  every worker refuses (a collective), so none is left waiting for a peer that quit."""
  try:
    result, problem = check(), None
  except (TrainingError, manifest_lib.ManifestError, ValueError, OSError, tf.errors.OpError) as e:
    result, problem = None, e
  if distribute.any_worker(strategy, problem is not None):
    raise problem or TrainingError("another worker refused to start; its log says why")
  return result


SHARED = "give every worker the same workdir, on storage all of them read (gs:// or a shared filesystem)"


def check_same_checkpoint(strategy, latest: str | None) -> None:
  """Refuses to start unless every worker found the same latest checkpoint (a collective)."""
  step = -1 if latest is None else int(latest.rsplit("-", 1)[1])
  if not distribute.same_on_every_worker(strategy, step):
    raise TrainingError(f"the workers see different latest checkpoints (this one: {latest or 'none'}); {SHARED}")


def check_shared_workdir(strategy, workdir: str) -> None:
  """Refuses to train unless every worker sees the config.json the chief has just written (two
  collectives: a barrier, then the vote), so that a later resume can restore the chief's checkpoints."""
  distribute.any_worker(strategy, False)
  path = os.path.join(workdir, "config.json")
  seen = tf.io.gfile.exists(path)
  if distribute.any_worker(strategy, not seen):
    raise TrainingError(f"{'this worker' if not seen else 'another worker'} cannot see {path}, which the chief "
                        f"wrote; {SHARED}")


def restore(state: State, path: str) -> None:
  """Restores `state` from checkpoint `path`, or says in one line that it was written for another model."""
  try:
    state.checkpoint.restore(path).assert_existing_objects_matched()
  except (AssertionError, ValueError, tf.errors.OpError) as e:
    detail = faults.first_line(str(getattr(e, "message", e)))[:160]
    raise TrainingError(f"checkpoint {path} does not fit this config's model and optimizer ({detail}); "
                        "resume with the config it was written with, or give a new workdir") from None


# What a checkpoint holds and how its steps map to data: a resumed run must keep them. model.fast_kernels
# and model.sync_bn change how the same weights are computed, not which; num_epochs may change (the
# schedule then stretches to the new end); so may the replica count at the same global batch.
RESUME_KEYS = ("global_batch_size", "mixed_precision", "model.", "optimizer.name", "optimizer.ema_decay",
               "optimizer.lookahead_every")
RESUME_FREE = ("model.fast_kernels", "model.sync_bn")


def check_resumable(config, workdir: str, steps_per_epoch: int, workers: int) -> None:
  """Refuses to resume a workdir whose run (its config.json and run.json) differs in a RESUME_KEYS value,
  in the steps per epoch resolved from the data, or (streaming input, whose shares depend on it) in the
  number of workers; names the key, both values and the workdir. Reads only."""
  def read(name):
    path = os.path.join(workdir, name)
    return fileio.read_json(path) if tf.io.gfile.exists(path) else {}

  before = {k: v for k, v in flat_config(read("config.json")) if k.startswith(RESUME_KEYS) and k not in RESUME_FREE}
  now = dict(flat_config(json.loads(config.to_json_best_effort())))
  run = read("run.json")
  if "steps_per_epoch" in run:
    before["steps per epoch"], now["steps per epoch"] = run["steps_per_epoch"], steps_per_epoch
  if not config.input.cache_in_memory and "workers" in run.get("distribution", {}):
    before["workers"], now["workers"] = run["distribution"]["workers"], workers
  for key in sorted(k for k in before if k in now):  # keys since renamed or removed do not count
    if before[key] != now[key]:
      raise TrainingError(f"workdir {workdir} holds a run with {key}={before[key]!r}; this command has "
                          f"{key}={now[key]!r}: resume with the same value, or give a new workdir")


def _train(run: Run, stop: faults.StopRequest) -> bool:
  """Steps until the end or a stop request: logs, evaluates and checkpoints at the boundaries. Returns
  whether a stop was requested (on any worker: every worker returns the same)."""
  config, state = run.config, run.state
  train_ds = run.strategy.distribute_datasets_from_function(
      train_dataset_fn(config, run.manifest, run.steps_per_epoch, run.start_step))
  eval_ds = distributed_eval_datasets(config, run.strategy, run.manifest)
  train_loop = make_train_loop(config, run.strategy, state, *normalization_for(run.config, run.manifest))
  eval_step = make_eval_step(run.strategy, state, worst=config.summary_worst_images if run.chief else 0)
  profile = _Profile(config, run)  # on every worker: its marks set the loop lengths
  bar = (keras.utils.Progbar(run.total_steps, unit_name="step", stateful_metrics=["loss", "accuracy", "images/s"])
         if run.chief and config.progress_bar and sys.stdout.isatty() else None)
  iterator = iter(train_ds)
  step = run.start_step
  window_start, window_step = time.time(), step  # steps and time since the last log line, boundaries excluded
  epoch_start = time.time() if step % run.steps_per_epoch == 0 else None  # None: resumed mid-epoch
  try:
    while step < run.total_steps:
      profile.before(step)
      num_steps = _steps_until_boundary(config, step, run.steps_per_epoch, run.total_steps, profile.marks(step))
      train_loop(iterator, tf.constant(num_steps), step // run.steps_per_epoch)
      step = int(state.step.numpy())
      profile.after(step)
      _check_finite(state, step, run.manager)
      boundary = step % config.log_every_steps == 0 or step % run.steps_per_epoch == 0
      if boundary:
        run.metrics["train"] = _log_train(config, state, run.writer, step, run.total_steps, run.steps_per_epoch,
                                          (step - window_step) / max(time.time() - window_start, 1e-9))
      if bar:
        bar.update(step, [("loss", run.metrics["train"]["loss"]), ("accuracy", run.metrics["train"]["accuracy"]),
                          ("images/s", run.metrics["train"]["images_per_sec"])] if boundary else None)
      if step % run.steps_per_epoch == 0:
        if epoch_start is not None:
          _write_scalars(run.writer, step, "train", {"epoch_seconds": time.time() - epoch_start})
        epoch = step // run.steps_per_epoch
        if "validation" in eval_ds and config.eval_every_epochs > 0 and epoch % config.eval_every_epochs == 0:
          run.metrics["validation"], details = _evaluate_averaged(state, eval_step, eval_ds["validation"])
          _write_scalars(run.writer, step, "validation", run.metrics["validation"])
          if run.chief and config.summary_worst_images:
            _write_eval_images(run, step, details)
          logging.info("epoch %d validation: %s", epoch, _fmt(run.metrics["validation"]))
        _save(run, step)
        epoch_start = time.time()
      elif config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0:
        _save(run, step)
      if boundary:
        window_start, window_step = time.time(), step
      if stop.agreed(run.strategy):  # after every loop, the last one too
        return True
    return False
  finally:
    profile.stop()


class _Profile:
  """A profiler trace of train steps [first, end) (`config.profile_steps`) into workdir/summaries, where
  TensorBoard's profile plugin finds it (plugins/profile/<run>/*.xplane.pb)."""

  def __init__(self, config, run: Run):
    self.range = tuple(config.profile_steps)
    self.directory = os.path.join(run.workdir, "summaries")
    self.chief = run.chief  # only the chief traces; every worker stops its loops at the marks
    self.active = False

  def marks(self, step: int) -> tuple[int, ...]:
    """Steps where a train loop must stop so the trace starts and ends there."""
    return tuple(m for m in self.range if m > step)

  def before(self, step: int) -> None:
    if self.chief and self.range and not self.active and self.range[0] <= step < self.range[1]:
      tf.profiler.experimental.start(self.directory)
      self.active = True
      logging.info("profiling steps %d to %d into %s", step, self.range[1] - 1, self.directory)

  def after(self, step: int) -> None:
    if self.active and step >= self.range[1]:
      self.stop()

  def stop(self) -> None:
    if self.active:
      tf.profiler.experimental.stop()
      self.active = False


def _evaluate_averaged(state: State, eval_step, dataset) -> tuple[dict[str, float], dict]:
  """Evaluates with the EMA weights when there are any, then puts the training weights back."""
  if state.ema:
    state.ema.swap()
  try:
    return evaluate(eval_step, dataset, state.eval_sums)
  finally:
    if state.ema:
      state.ema.swap()


def _check_finite(state: State, step: int, manager: tf.train.CheckpointManager) -> None:
  """Stops before any checkpoint is written from non-finite weights."""
  loss = state.train_sums.result()["loss"]
  if not math.isfinite(loss):
    raise TrainingError(f"loss is {loss} at step {step}; stopped without saving. The last good "
                        f"checkpoint is {manager.latest_checkpoint or 'none (none was written yet)'}")


def _save(run: Run, step: int) -> str:
  """Checkpoints `step` unless this run already has it; every worker takes the same decision (saving is
  collective). Returns the path."""
  if run.saved_step != step:
    run.manager.save(checkpoint_number=step)
    run.saved_step = step
  return run.manager.latest_checkpoint


def _finish(run: Run, status: str) -> None:
  run.writer.close()
  if run.chief:
    _write_run_json(run, status)


def _steps_until_boundary(config, step: int, steps_per_epoch: int, total_steps: int, marks=()) -> int:
  """Steps to run before Python must act again (log, checkpoint, epoch end, the end, or one of the steps
  `marks`, all later than `step`)."""
  boundaries = [config.steps_per_loop, config.log_every_steps, steps_per_epoch]
  if config.checkpoint_every_steps:
    boundaries.append(config.checkpoint_every_steps)
  nearest = min([(step // b + 1) * b for b in boundaries if b > 0] + list(marks))
  return min(nearest, total_steps) - step


def _checkpoint_manager(config, strategy, state: State, workdir: str) -> tf.train.CheckpointManager:
  """Checkpoints in workdir/checkpoints. Non-chief workers of a multi-worker run must take part in every
  save too (variables are read collectively), so they write to a scratch directory of their own."""
  directory = os.path.join(workdir, "checkpoints")
  if not distribute.is_chief(strategy):
    directory = os.path.join(workdir, "tmp", f"checkpoints-{distribute.worker_id(strategy)}")
  return tf.train.CheckpointManager(state.checkpoint, directory, max_to_keep=config.keep_checkpoints,
                                    step_counter=state.step)


def _fmt(metrics: dict) -> str:
  return " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def _log_train(config, state: State, writer, step, total_steps, steps_per_epoch, steps_per_sec) -> dict:
  totals = state.train_sums.result()
  state.train_sums.reset()
  count = max(totals["count"], 1.0)
  scalars = {"loss": totals["loss"] / count, "accuracy": totals["correct"] / count,
             "learning_rate": float(state.optimizer.learning_rate.numpy()),
             "images_per_sec": steps_per_sec * config.global_batch_size}
  if optim.loss_scale(state.optimizer) is not None:
    scalars["loss_scale"] = optim.loss_scale(state.optimizer)
  _write_scalars(writer, step, "train", scalars)
  eta = (total_steps - step) / max(steps_per_sec, 1e-9)
  logging.info("step %d/%d epoch %.2f loss %.4f accuracy %.4f lr %.4g %.0f images/s ETA %s", step,
               total_steps, step / steps_per_epoch, scalars["loss"], scalars["accuracy"],
               scalars["learning_rate"], scalars["images_per_sec"], datetime.timedelta(seconds=round(eta)))
  return scalars


def _write_run_json(run: Run, status: str) -> None:
  fileio.write_json(os.path.join(run.workdir, "run.json"), {
      "status": status, "started": run.started, "ended": _now(),
      "start_step": run.start_step, "end_step": int(run.state.step.numpy()), "total_steps": run.total_steps,
      "steps_per_epoch": run.steps_per_epoch,
      "versions": {"project": _project_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
                   "python": platform.python_version()},
      "git_commit": _git_commit(), "host": platform.node(),
      "distribution": distribute.describe(run.strategy), "metrics": run.metrics,
  })
