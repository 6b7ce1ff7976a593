"""What a run trains, and how one train loop runs: the state made under one strategy scope and the step
functions over it, behind `Learner.train(iterator, num_steps, epoch) -> metrics`.

Step functions are pure tf.functions run per replica by `strategy.run`; `num_steps` steps run inside one
tf.function call and Python runs between calls (trainer/loop.py decides when). The loss is averaged over
the global batch. The trainer's tf.functions (here, trainer/evaluation.py, trainer/export.py) are traced
with autograph=False: their control flow is written as tf.cond and tf.while_loop, and AutoGraph's source
conversion was a sixth of a short run's CPU (docs/results.md).
"""

import dataclasses
import hashlib

import keras
import tensorflow as tf

from pipeline import augment
from trainer import models
from trainer import optim
from trainer import precision


class Sums:
  """Running sums kept per replica and read as totals over all replicas (ON_READ, SUM variables): scalars
  by name, and arrays given as name=shape, of `dtype`.

  Create under `strategy.scope()`; `add` runs per replica inside the step; `result` and `reset` run
  between steps.
  """

  def __init__(self, *names: str, dtype: tf.DType = tf.float32, **shapes: tuple[int, ...]):
    self._vars = {n: tf.Variable(tf.zeros(shape, dtype), trainable=False, name=n,
                                 synchronization=tf.VariableSynchronization.ON_READ,
                                 aggregation=tf.VariableAggregation.SUM)
                  for n, shape in {**{n: () for n in names}, **shapes}.items()}

  def add(self, **values) -> None:
    """Runs per replica."""
    for name, value in values.items():
      self._vars[name].assign_add(tf.cast(value, self._vars[name].dtype))

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
  epoch_images: tf.Variable  # float64 [3]: this epoch's images so far and two sums of their ids (epoch_audit)
  checkpoint: tf.train.Checkpoint
  ema: optim.EMA | None  # averaged weights, when optimizer.ema_decay > 0
  lookahead: optim.Lookahead | None  # when optimizer.lookahead_every > 0


def make_state(config, strategy, steps_per_epoch: int, data: models.DataShape | None = None) -> State:
  """The model (for `data`: see models.build), optimizer, step counter, averages and their checkpoint,
  under `strategy.scope()`."""
  opt = config.optimizer
  precision.resolve(config)  # "auto" -> a policy, in place (the trainer has done so already)
  keras.mixed_precision.set_dtype_policy(config.mixed_precision)
  keras.utils.set_random_seed(config.seed)
  with strategy.scope():
    model = models.build(config.model, data)
    optimizer = optim.make_optimizer(config, steps_per_epoch)
    optimizer.build(model.trainable_variables)
    step = tf.Variable(0, dtype=tf.int64, trainable=False, name="step")
    epoch_images = tf.Variable(tf.zeros([3], tf.float64), trainable=False, name="epoch_images")
    ema = optim.EMA(model.trainable_variables, opt.ema_decay) if opt.ema_decay else None
    lookahead = (optim.Lookahead(model.variables, opt.lookahead_every, opt.lookahead_decay,
                                 config.num_epochs * steps_per_epoch) if opt.lookahead_every else None)
    random = random_states(model)
    checkpoint = tf.train.Checkpoint(model=model, optimizer=optimizer, step=step, epoch_images=epoch_images,
                                     **({"random": random} if random else {}),
                                     **({"ema": ema.averages} if ema else {}),
                                     **({"lookahead": lookahead.averages} if lookahead else {}))
  return State(model, optimizer, step, epoch_images, checkpoint, ema, lookahead)


def random_states(model: keras.Model) -> list:
  """The state of every `keras.random.SeedGenerator` in `model` (Dropout's and other random layers'): Keras
  lists them among the model's variables but does not track them as checkpoint dependencies, so without
  this a resumed run would draw the masks of step 0 again."""
  return [v for v in model.non_trainable_variables if v.path.endswith("seed_generator_state")]


def _id_sums(keys: tf.Tensor) -> dict[str, tf.Tensor]:
  """A batch's image count and the sums of bits 0-25 and 26-51 of its images' keys (62-bit hashes of their
  ids): adding them up in any order gives the same integers, exactly, in float64. Sums, not a hash: an
  image trained twice and another missed would need keys equal in both fields to go unseen."""
  half = (1 << 26) - 1
  low, high = tf.bitwise.bitwise_and(keys, half), tf.bitwise.bitwise_and(tf.bitwise.right_shift(keys, 26), half)
  return {"count": tf.size(keys), "low": tf.reduce_sum(low), "high": tf.reduce_sum(high)}


def cross_entropy(labels: tf.Tensor, logits: tf.Tensor, label_smoothing: float) -> tf.Tensor:
  """Per-example softmax cross-entropy in float32; labels are class ids or [N, K] probabilities."""
  logits = tf.cast(logits, tf.float32)
  if labels.dtype.is_integer:
    labels = tf.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    labels = labels * (1.0 - label_smoothing) + label_smoothing / logits.shape[-1]
  return tf.nn.softmax_cross_entropy_with_logits(labels, logits)


def correct(labels: tf.Tensor, logits: tf.Tensor) -> tf.Tensor:
  """How many argmax predictions match the labels (class ids, or the argmax of soft labels)."""
  hard = labels if labels.dtype.is_integer else tf.argmax(labels, -1)
  return tf.reduce_sum(tf.cast(tf.equal(tf.argmax(logits, -1), hard), tf.float32))


class Learner:
  """The train step of `config` over `state` (orbit's StandardTrainer, in small): `train` runs a loop of
  steps and returns its metrics. Made once per run, after `state`; `mean` and `std` ([0, 1] units) are
  needed with `config.input.augment_on="device"`, where each step augments and normalises its raw batch."""

  def __init__(self, config, strategy, state: State, mean=None, std=None):
    self.config, self.strategy, self.state = config, strategy, state
    self._mean, self._std = mean, std
    with strategy.scope():
      self._sums = Sums("loss", "correct", "count")
      self._ids = Sums("count", "low", "high", dtype=tf.float64)  # exact: integers below 2^53
    variables = state.model.trainable_variables
    self._multipliers = dict(zip((id(v) for v in variables),
                                 optim.gradient_multipliers(state.model, config.optimizer)))
    self._loss_scaled = optim.loss_scale(state.optimizer) is not None
    self._traced = {}  # one tf.function per set of trained variables (airbench: 2), not one per epoch

  def train(self, iterator, num_steps: int, epoch: int) -> dict:
    """Runs `num_steps` steps of epoch number `epoch` (it decides which variables train,
    models.trainable_at), fed by `iterator`, in one tf.function call; stops early after a step whose loss
    is not finite. Returns the loop's mean loss and accuracy, its image count and the step reached."""
    self._sums.reset()
    self._ids.reset()
    self._function(epoch)(iterator, tf.constant(num_steps))
    ids = self._ids.result()
    self.state.epoch_images.assign_add([ids["count"], ids["low"], ids["high"]])
    totals = self._sums.result()
    count = max(totals["count"], 1.0)
    return {"loss": totals["loss"] / count, "accuracy": totals["correct"] / count,
            "count": int(totals["count"]), "step": int(self.state.step.numpy())}

  def trace(self, iterator, epoch: int) -> None:
    """Traces `train`'s loop for `epoch` ahead of its first call, so other work can be timed beside it."""
    self._function(epoch).get_concrete_function(iterator, tf.constant(1))

  def _function(self, epoch: int):
    variables = models.trainable_at(self.state.model, epoch)
    key = tuple(id(v) for v in variables)
    if key not in self._traced:
      self._traced[key] = tf.function(lambda it, n: self._loop(it, n, variables), autograph=False)
    return self._traced[key]

  def end_epoch(self) -> dict:
    """This epoch's audit, then zeroed for the next: `images` trained and `digest`, an order-free digest of
    their ids; an epoch that trained each image once gives the same, however it was stopped and resumed."""
    count, low, high = (int(x) for x in self.state.epoch_images.numpy())
    self.state.epoch_images.assign(tf.zeros([3], tf.float64))
    return {"images": count, "digest": hashlib.sha256(f"{count}:{low}:{high}".encode()).hexdigest()[:12]}

  def optimizer_scalars(self) -> dict[str, float]:
    """The learning rate now, and the loss scale when there is one."""
    scalars = {"learning_rate": float(self.state.optimizer.learning_rate.numpy())}
    if self._loss_scaled:
      scalars["loss_scale"] = optim.loss_scale(self.state.optimizer)
    return scalars

  def _gradients(self, images, labels, variables):
    """The forward and backward pass: (per-example losses, correct count, gradients). With
    `config.jit_compile` XLA compiles this part per replica; the cross-replica gradient sum and the update
    stay outside it (XLA cannot compile the iterator or the strategy's merge_call)."""
    model, optimizer, config = self.state.model, self.state.optimizer, self.config
    with tf.GradientTape() as tape:
      logits = model(images, training=True)
      per_example = cross_entropy(labels, logits, config.label_smoothing)
      loss = tf.nn.compute_average_loss(per_example, global_batch_size=config.global_batch_size)
      if model.losses:  # weight penalties (kernel_regularizer), counted once over the replicas
        loss += tf.nn.scale_regularization_loss(tf.add_n(model.losses))
      scaled = optimizer.scale_loss(loss)  # the identity unless optimizer is a LossScaleOptimizer
    return per_example, correct(labels, logits), tape.gradient(scaled, variables)

  def _step(self, batch, variables):
    """Runs per replica."""
    config, optimizer = self.config, self.state.optimizer
    if config.input.augment_on == "device":
      batch = augment.train_preprocess(batch, config.augment, self._mean, self._std,
                                       num_classes=self.state.model.outputs[0].shape[-1])
    images, labels = batch["images"], batch["labels"]
    if config.jit_compile:  # a function of this replica's own (traced once per replica and variable set)
      compiled = tf.function(lambda x, y: self._gradients(x, y, variables), jit_compile=True, autograph=False)
      per_example, hits, grads = compiled(images, labels)
    else:
      per_example, hits, grads = self._gradients(images, labels, variables)
    if self._loss_scaled and self.strategy.num_replicas_in_sync > 1 and not config.optimizer.clip_norm:
      grads = optim.agree_on_finite(grads)  # clipping all-reduces the gradients, so agrees already
    if config.optimizer.clip_norm:
      grads = optim.clip_by_global_norm(grads, config.optimizer.clip_norm * optim.scale_factor(optimizer))
    grads = [g * self._multipliers[id(v)] if self._multipliers[id(v)] != 1.0 else g
             for g, v in zip(grads, variables)]
    optimizer.apply(grads, variables)
    self._sums.add(loss=tf.reduce_sum(per_example), correct=hits, count=tf.shape(per_example)[0])
    if "keys" in batch:  # the pipeline's batches have them; a hand-made batch (a benchmark's) need not
      self._ids.add(**_id_sums(batch["keys"]))

  def _sync_statistics(self):
    """Runs per replica. Keras 3 keeps non-trainable variables per replica (aggregation NONE), so the
    BatchNorm moving statistics drift apart; averaging every floating one (those, and the frozen whitening
    kernel, equal already) after every loop keeps all replicas, checkpoints and the export equal."""
    ctx = tf.distribute.get_replica_context()
    floating = [v for v in self.state.model.non_trainable_variables if tf.as_dtype(v.dtype).is_floating]
    if not floating:  # e.g. a model without BatchNorm
      return
    means = ctx.all_reduce(tf.distribute.ReduceOp.MEAN, [tf.identity(v.value) for v in floating])  # one batch
    for v, mean in zip(floating, means):
      v.assign(mean)

  def _loop(self, iterator, num_steps, variables):
    state = self.state

    def one_step(i, finite):
      self.strategy.run(self._step, args=(next(iterator), variables))
      state.step.assign_add(1)
      if state.ema:
        state.ema.update()
      if state.lookahead:
        several = self.strategy.num_replicas_in_sync > 1
        state.lookahead.update(state.step, agree=(lambda: self.strategy.run(self._sync_statistics)) if several
                               else None)
      return i + 1, tf.math.is_finite(self._sums.total("loss"))

    # Stops after the step whose loss went wrong; Python reports it.
    tf.while_loop(lambda i, finite: finite & (i < num_steps), one_step,
                  (tf.zeros([], num_steps.dtype), tf.constant(True)))
    if self.strategy.num_replicas_in_sync > 1:
      self.strategy.run(self._sync_statistics)
