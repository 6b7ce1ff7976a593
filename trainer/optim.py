"""Optimizer, learning-rate schedules, gradient clipping and the EMA of weights, from `config.optimizer`."""

import keras
import tensorflow as tf

from trainer import layers

SCHEDULES = ("cosine", "constant", "triangular", "piecewise")


class Triangular(keras.optimizers.schedules.LearningRateSchedule):
  """Linear from `start` x peak up to the peak at `peak_step`, then linear down to `end` x peak at the last
  step: the one-cycle / triangular schedule of Smith, Page's ResNet-9 and airbench."""

  def __init__(self, peak: float, total_steps: int, peak_step: int, start: float, end: float):
    self.peak, self.total_steps, self.peak_step = peak, total_steps, peak_step
    self.start, self.end = start, end

  def __call__(self, step):
    step = tf.cast(step, tf.float32)
    up = self.start + (1.0 - self.start) * step / max(self.peak_step, 1)
    down = 1.0 + (self.end - 1.0) * (step - self.peak_step) / max(self.total_steps - self.peak_step, 1)
    return self.peak * tf.where(step < self.peak_step, up, tf.maximum(down, self.end))

  def get_config(self):
    return {"peak": self.peak, "total_steps": self.total_steps, "peak_step": self.peak_step,
            "start": self.start, "end": self.end}


def make_schedule(config, steps_per_epoch: int) -> keras.optimizers.schedules.LearningRateSchedule:
  """`config.optimizer.schedule`, in steps."""
  opt = config.optimizer
  total = config.num_epochs * steps_per_epoch
  warmup = int(opt.warmup_epochs * steps_per_epoch)
  if opt.schedule in ("cosine", "constant"):
    # CosineDecay warms up linearly from 0 to warmup_target; alpha=1 makes the decay a constant.
    return keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=max(total - warmup, 1), warmup_target=opt.learning_rate, warmup_steps=warmup,
        alpha=1.0 if opt.schedule == "constant" else 0.0)
  if opt.schedule == "triangular":
    return Triangular(opt.learning_rate, total, warmup, opt.triangular_start, opt.triangular_end)
  if opt.schedule == "piecewise":
    if len(opt.piecewise_multipliers) != len(opt.piecewise_epochs) + 1:
      raise ValueError(f"optimizer.piecewise_multipliers needs one more value than optimizer.piecewise_epochs "
                       f"({len(opt.piecewise_epochs)} boundaries, {len(opt.piecewise_multipliers)} values)")
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        [int(e * steps_per_epoch) for e in opt.piecewise_epochs],
        [opt.learning_rate * m for m in opt.piecewise_multipliers])
  raise ValueError(f"optimizer.schedule={opt.schedule!r} is not one of: {', '.join(SCHEDULES)}")


class MuonSGD(keras.optimizers.SGD):
  """airbench94_muon's optimizer pair as one Keras optimizer: conv kernels (rank-4 variables) take Muon
  steps, everything else (biases, the head) SGD steps with the usual momentum and decoupled weight decay.

  Muon (Keller Jordan): Nesterov momentum `muon_momentum` on the raw gradient, the kernel rescaled to a
  Frobenius norm of sqrt(output channels) (so its scale, which BatchNorm ignores, stays put), then a step
  of `learning_rate * muon_ratio` along the momentum orthogonalised by `ns_steps` Newton-Schulz iterations
  (the kernel seen as an [out, kh*kw*in] matrix). Conv kernels get no weight decay.
  """

  def __init__(self, learning_rate, *, muon_ratio: float, muon_momentum: float, ns_steps: int = 3, **kwargs):
    super().__init__(learning_rate, **kwargs)
    self.muon_ratio, self.muon_momentum, self.ns_steps = muon_ratio, muon_momentum, ns_steps

  def build(self, variables):
    if self.built:
      return
    super().build(variables)
    if not self.momentums:  # SGD keeps none without momentum; Muon's kernels need theirs
      self.momentums = self.add_optimizer_variables(variables, "momentum")

  def _use_weight_decay(self, variable):  # Keras's hook for exclusions; conv kernels are kept normalised
    return len(variable.shape) != 4 and super()._use_weight_decay(variable)

  def update_step(self, gradient, variable, learning_rate):
    if len(variable.shape) != 4:
      return super().update_step(gradient, variable, learning_rate)
    m = self.momentums[self._get_variable_index(variable)]
    gradient = tf.cast(gradient, variable.dtype)
    m.assign(self.muon_momentum * m + gradient)
    direction = gradient + self.muon_momentum * m
    out = variable.shape[-1]
    variable.assign(variable * (out ** 0.5 / (tf.norm(variable) + 1e-12)))
    update = tf.reshape(tf.transpose(orthogonalize(tf.transpose(tf.reshape(direction, [-1, out])),
                                                   self.ns_steps)), variable.shape)
    variable.assign_sub(tf.cast(learning_rate, variable.dtype) * self.muon_ratio * update)

  def get_config(self):
    return {**super().get_config(), "muon_ratio": self.muon_ratio, "muon_momentum": self.muon_momentum,
            "ns_steps": self.ns_steps}


def orthogonalize(g: tf.Tensor, steps: int) -> tf.Tensor:
  """Muon's quintic Newton-Schulz iteration: about U V^T of g = U S V^T (singular values pushed into
  roughly [0.5, 1.5], which trains as well), for a 2-D g."""
  a, b, c = 3.4445, -4.7750, 2.0315
  x = g / (tf.norm(g) + 1e-7)
  wide = g.shape[0] <= g.shape[1]
  if not wide:
    x = tf.transpose(x)
  for _ in range(steps):
    xxt = x @ tf.transpose(x)
    x = a * x + (b * xxt + c * xxt @ xxt) @ x
  return x if wide else tf.transpose(x)


OPTIMIZERS = ("sgd", "muon", "adam", "rmsprop")


def make_optimizer(config, steps_per_epoch: int) -> keras.optimizers.Optimizer:
  """`config.optimizer.name` with its schedule and decoupled weight decay; wrapped for dynamic loss
  scaling in float16."""
  opt = config.optimizer
  schedule = make_schedule(config, steps_per_epoch)
  decay = opt.weight_decay or None
  if opt.name == "sgd":
    optimizer = keras.optimizers.SGD(schedule, momentum=opt.momentum, nesterov=opt.nesterov, weight_decay=decay)
  elif opt.name == "muon":
    optimizer = MuonSGD(schedule, momentum=opt.momentum, nesterov=opt.nesterov, weight_decay=decay,
                        muon_ratio=opt.muon_learning_rate / opt.learning_rate, muon_momentum=opt.muon_momentum)
  elif opt.name == "adam":
    optimizer = keras.optimizers.Adam(schedule, weight_decay=decay)
  elif opt.name == "rmsprop":
    optimizer = keras.optimizers.RMSprop(schedule, weight_decay=decay)
  else:
    raise ValueError(f"optimizer.name={opt.name!r} is not one of: {', '.join(OPTIMIZERS)}")
  if config.mixed_precision == "mixed_float16":
    optimizer = keras.optimizers.LossScaleOptimizer(optimizer)  # dynamic loss scale, starts at 32768
  return optimizer


def scale_factor(optimizer: keras.optimizers.Optimizer):
  """What `optimizer.scale_loss` multiplies the loss by: the dynamic loss scale, or 1."""
  if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
    return optimizer.dynamic_scale
  return 1.0


def agree_on_finite(grads: list[tf.Tensor]) -> list[tf.Tensor]:
  """Runs per replica. Keras's LossScaleOptimizer skips a step whose gradients are not finite, but judges
  each replica's own un-reduced gradients (under MirroredStrategy the first replica's only): an overflow
  on another replica was applied, and workers of a multi-worker run could take different branches and
  hang. One scalar all-reduce makes every replica's gradients non-finite when any replica's are, so all
  skip the step and halve the loss scale together."""
  ctx = tf.distribute.get_replica_context()
  present = [g for g in grads if g is not None]
  finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(g)) for g in present])
  not_finite = ctx.all_reduce(tf.distribute.ReduceOp.SUM, 1.0 - tf.cast(finite, tf.float32))
  agreed = iter(tf.cond(not_finite == 0.0, lambda: list(present),
                        lambda: [g * tf.constant(float("nan"), g.dtype) for g in present]))
  return [None if g is None else next(agreed) for g in grads]


def loss_scale(optimizer: keras.optimizers.Optimizer) -> float | None:
  """The dynamic loss scale of a LossScaleOptimizer, else None."""
  if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
    return float(optimizer.dynamic_scale.numpy())
  return None


def clip_by_global_norm(grads: list[tf.Tensor], clip_norm: float) -> list[tf.Tensor]:
  """Runs per replica. Clips by the norm of the gradient summed over all replicas (what the optimizer
  applies), not of each replica's share; returns per-replica shares that still sum to the clipped total."""
  ctx = tf.distribute.get_replica_context()
  total = ctx.all_reduce(tf.distribute.ReduceOp.SUM, grads)
  clipped, _ = tf.clip_by_global_norm(total, clip_norm)
  return [g / ctx.num_replicas_in_sync for g in clipped]


class EMA:
  """Exponential moving average of the trainable weights, for evaluation and export.

  Keras optimizers can keep an EMA (`use_ema`), but evaluating with it mid-run and then going on training
  needs its private `_model_variables_moving_average`; these few lines keep it public and checkpointed.
  Create under `strategy.scope()`; `update` runs between steps in cross-replica context.
  """

  def __init__(self, variables, decay: float):
    self.decay = decay
    self._variables = list(variables)
    self.averages = [tf.Variable(v.value.read_value(), trainable=False, name=f"ema_{i}")
                     for i, v in enumerate(self._variables)]

  def reset(self) -> None:
    """Sets the averages to the weights (after the weights were set from data)."""
    for average, v in zip(self.averages, self._variables):
      average.assign(tf.cast(v.value, average.dtype))

  def update(self) -> None:
    for average, v in zip(self.averages, self._variables):
      average.assign(self.decay * average + (1.0 - self.decay) * tf.cast(v.value, average.dtype))

  def swap(self) -> None:
    """Exchanges the weights and their averages (call again to undo)."""
    for average, v in zip(self.averages, self._variables):
      weight = tf.identity(v.value)
      v.assign(average)
      average.assign(weight)


class Lookahead:
  """airbench's lookahead: every `every` steps the weights move into their running average and the
  average replaces them, `average = d * average + (1 - d) * weights; weights = average`, with
  d = `decay` x (step / total_steps)^3 (no averaging early, strong averaging late). `finish` copies the
  average into the weights after the last step.

  Covers every floating variable of the model (BatchNorm statistics too). Create under
  `strategy.scope()`; `update` runs between steps in cross-replica context.
  """

  def __init__(self, variables, every: int, decay: float, total_steps: int):
    self.every, self.decay, self.total_steps = every, decay, total_steps
    self._variables = [v for v in variables if tf.as_dtype(v.dtype).is_floating]
    self.averages = [tf.Variable(v.value.read_value(), trainable=False, name=f"lookahead_{i}")
                     for i, v in enumerate(self._variables)]

  reset = EMA.reset

  def update(self, step: tf.Tensor, agree=None) -> None:
    """After train step number `step` (1-based). `agree`, when given, runs first at every blend: it makes
    variables each replica keeps for itself (BatchNorm statistics between syncs) equal on all of them, or
    each worker would blend its own and only the chief's averages would reach the checkpoint."""
    def blend():
      if agree:
        agree()
      d = self.decay * (tf.cast(step, tf.float32) / self.total_steps) ** 3
      for average, v in zip(self.averages, self._variables):
        average.assign(d * average + (1.0 - d) * tf.cast(v.value, average.dtype))
        v.assign(tf.cast(average, v.dtype))
    tf.cond(tf.equal(step % self.every, 0), blend, lambda: None)

  def finish(self) -> None:
    for average, v in zip(self.averages, self._variables):
      v.assign(tf.cast(average, v.dtype))


def gradient_multipliers(model: keras.Model, opt) -> list[float]:
  """One learning-rate multiplier per trainable variable, from the optimizer config `opt`:
  `bn_bias_lr_scale` for BatchNorm biases (betas; airbench trains them 64x faster), `whiten_bias_lr_scale`
  for the patch-whitening bias, `head_lr_scale` for the kernel of the `logits` layer, 1 elsewhere.
  Applied to the gradients, so weight decay is not scaled (and Muon's normalised steps ignore them).

  airbench also trains the patch-whitening bias 64x faster; here that was unstable with the whitening conv
  in bf16 and no better in float32, which slows the step, so deep.py keeps that bias at 1x (docs/results.md)."""
  every = model._flatten_layers()  # pylint: disable=protected-access
  scales = {id(layer.beta): opt.bn_bias_lr_scale for layer in every
            if isinstance(layer, keras.layers.BatchNormalization) and layer.center}
  scales.update({id(layer.bias): opt.whiten_bias_lr_scale for layer in every
                 if isinstance(layer, layers.PatchWhitening)})
  if "logits" in [layer.name for layer in model.layers]:
    scales[id(model.get_layer("logits").kernel)] = opt.head_lr_scale
  return [scales.get(id(v), 1.0) for v in model.trainable_variables]
