"""One worker process of test_multiworker's float16 overflow test: 2 workers of 1 replica each train the
smoke deep net for 2 steps in mixed_float16 without clipping; in step 1 worker 1's gradients overflow (its
soft labels weigh 10^4 times too much). Prints what it saw as one JSON line."""

import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import tensorflow as tf  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import deep  # pylint: disable=g-import-not-at-top,wrong-import-position
from trainer import distribute  # pylint: disable=g-import-not-at-top,wrong-import-position
from trainer import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from trainer import optim  # pylint: disable=g-import-not-at-top,wrong-import-position
from trainer import steps  # pylint: disable=g-import-not-at-top,wrong-import-position


def main():
  config = deep.get_config("smoke")
  config.update(mixed_precision="mixed_float16", strategy="multi_worker")
  config.optimizer.update(clip_norm=0.0, warmup_epochs=0.0)
  strategy = distribute.make_strategy(config)
  index = json.loads(os.environ["TF_CONFIG"])["task"]["index"]
  rng = np.random.default_rng(index)
  images = tf.constant(rng.normal(size=(16, 32, 32, 3)), tf.float32)
  labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 16)]
  state = steps.make_state(config, strategy, steps_per_epoch=10)
  models.initialize_from_data(state.model, lambda: tf.constant(np.random.default_rng(9).normal(size=(32, 32, 32, 3)),
                                                                 tf.float32))
  learner = steps.Learner(config, strategy, state)

  def step(weight):
    dataset = strategy.distribute_datasets_from_function(lambda ctx: tf.data.Dataset.from_tensors(
        {"images": images, "labels": tf.constant(labels * weight)}).repeat())
    learner.train(iter(dataset), 1, 0)

  initial = [v.numpy() for v in state.model.trainable_variables]
  scale = optim.loss_scale(state.optimizer)
  step(1e4 if index == 1 else 1.0)
  skipped = all(np.array_equal(a, v.numpy()) for a, v in zip(initial, state.model.trainable_variables))
  halved = optim.loss_scale(state.optimizer) == scale / 2
  step(1.0)
  after = [v.numpy() for v in state.model.trainable_variables]
  print(json.dumps({"skipped": skipped, "halved": halved, "finite": all(np.isfinite(a).all() for a in after),
                    "trained": any(not np.array_equal(a, b) for a, b in zip(initial, after))}), flush=True)


if __name__ == "__main__":
  main()
