"""Evaluation of a run's model over distributed datasets, and precise BatchNorm statistics.

`Evaluator.evaluate(dataset, views, worst) -> (metrics, details)` is the one way the trainer (and the
tools) score a split: loss, accuracy and count, the confusion matrix and the worst misclassified images.
"""

import contextlib

import keras
import numpy as np
import tensorflow as tf

from trainer import steps
from trainer import views as views_lib


class Evaluator:
  """Scores `state.model` (or another model given) under `strategy`; one traced step per (model, views,
  worst), made on first use."""

  def __init__(self, strategy, state: steps.State, num_classes: int):
    self.strategy, self.state, self.num_classes = strategy, state, num_classes
    with strategy.scope():
      self._sums = steps.Sums("loss", "correct", "count", "plain_loss", "plain_correct",
                              confusion=(num_classes, num_classes))
    self._traced = {}

  def evaluate(self, dataset, views: str = "none", worst: int = 0, model=None) -> tuple[dict, dict]:
    """One pass of `model` (by default the state's) over a distributed eval dataset, with test-time `views`
    (trainer/views.py). Returns its
    metrics (loss, accuracy, image count) and details: the confusion matrix (true class by row) and, with
    `worst` > 0, the `worst` misclassified images of highest loss that this process saw (all of them on
    one machine; on several, this worker's share), with labels, predictions, loss and probability. With
    views other than "none" the metrics also hold the image's own view's: single_view_loss and
    single_view_accuracy, from the same pass."""
    model = self.state.model if model is None else model
    key = (id(model), views, worst)
    if key not in self._traced:
      step = lambda batch: self._step(model, batch, views, worst)
      self._traced[key] = tf.function(lambda batch: self.strategy.run(step, args=(batch,)), reduce_retracing=True,
                                      autograph=False)
    traced = self._traced[key]
    self._sums.reset()
    candidates = []
    for batch in dataset:
      out = traced(batch)
      if worst:
        candidates += [{k: v.numpy() for k, v in local.items()}
                       for local in self.strategy.experimental_local_results(out)]
    totals = self._sums.result()
    count = max(totals["count"], 1.0)
    metrics = {"loss": totals["loss"] / count, "accuracy": totals["correct"] / count,
               "count": int(totals["count"])}
    if views != "none":
      metrics.update(single_view_loss=totals["plain_loss"] / count, single_view_accuracy=totals["plain_correct"] / count)
    details = {"confusion": totals["confusion"].astype(np.int64)}
    if candidates:
      merged = {k: np.concatenate([c[k] for c in candidates]) for k in candidates[0]}
      order = np.argsort(-merged["loss"], kind="stable")[:worst]
      details["worst"] = {k: v[order] for k, v in merged.items()}
    return metrics, details

  def _step(self, model, batch, views: str, worst: int) -> dict:
    """Runs per replica; a replica may get an empty last batch, which skips the model: TensorFlow 2.21's CPU
    convolution returns an empty batch with its input's channels, which the next layer refuses."""
    images, labels = batch["images"], batch["labels"]
    empty = tf.zeros([0, self.num_classes])
    logits, plain = tf.cond(tf.shape(images)[0] > 0,
                            lambda: views_lib.logits(model, images, views, with_plain=True),
                            lambda: (empty, empty))
    per_example = steps.cross_entropy(labels, logits, 0.0)
    predicted = tf.argmax(logits, -1, output_type=labels.dtype)
    hits = steps.correct(labels, logits)
    plain_example, plain_hits = ((per_example, hits) if views == "none" else  # the same logits: not again
                                 (steps.cross_entropy(labels, plain, 0.0), steps.correct(labels, plain)))
    self._sums.add(loss=tf.reduce_sum(per_example), correct=hits, count=tf.shape(labels)[0],
                   plain_loss=tf.reduce_sum(plain_example), plain_correct=plain_hits,
                   confusion=tf.math.confusion_matrix(labels, predicted, num_classes=self.num_classes,
                                                      dtype=tf.float32))
    if not worst:
      return {}
    wrong = tf.not_equal(predicted, labels)
    top = tf.math.top_k(tf.where(wrong, per_example, -1.0), tf.minimum(worst, tf.shape(labels)[0])).indices
    top = tf.boolean_mask(top, tf.gather(wrong, top))
    return {"images": tf.gather(images, top), "labels": tf.gather(labels, top),
            "predicted": tf.gather(predicted, top), "loss": tf.gather(per_example, top),
            "probability": tf.gather(tf.reduce_max(tf.nn.softmax(logits), -1), top)}


@contextlib.contextmanager
def averaged_weights(state: steps.State):
  """Inside, the model holds its EMA weights when there are any; the training weights come back after."""
  if state.ema:
    state.ema.swap()
  try:
    yield
  finally:
    if state.ema:
      state.ema.swap()


def bn_statistics(strategy, model: keras.Model, dataset) -> int:
  """Sets every top-level BatchNormalization layer's moving mean and variance to the averages, over the
  batches of distributed `dataset` and the replicas, of the per-channel moments of the layer's input with
  the model in training mode ("precise BN": the running statistics trail the weights, and lookahead or
  EMA averages them with the weights). Returns the batches used; 0 when the model has no such layer."""
  layers = [layer for layer in model.layers if isinstance(layer, keras.layers.BatchNormalization)]
  if not layers:
    return 0
  probe = keras.Model(model.inputs, [layer.input for layer in layers])

  def step_fn(batch):
    """Runs per replica."""
    outputs = probe(batch["images"], training=True)
    moments = [tf.nn.moments(tf.cast(x, tf.float32), axes=list(range(len(x.shape) - 1))) for x in outputs]
    return tf.distribute.get_replica_context().all_reduce(tf.distribute.ReduceOp.MEAN, moments)

  traced = tf.function(lambda batch: strategy.run(step_fn, args=(batch,)), autograph=False)
  totals, count = None, 0
  for batch in dataset:
    moments = [tuple(strategy.experimental_local_results(m)[0].numpy() for m in pair) for pair in traced(batch)]
    totals = moments if totals is None else [(a + m, b + v) for (a, b), (m, v) in zip(totals, moments)]
    count += 1
  for layer, (m, v) in zip(layers, totals):
    layer.moving_mean.assign(m / count)
    layer.moving_variance.assign(v / count)
  return count
