"""The train step: one step on 2 replicas equals 1 replica, its variants (XLA, Keras's layers) equal the plain
step, float16 overflow on one replica, the schedules, EMA and the test-time views."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from configs import deep
from configs import default
from trainer import distribute
from trainer import models
from trainer import optim
from trainer import steps
from trainer import views


def _one_step(strategy, config, images, labels):
  state = steps.make_state(config, strategy, steps_per_epoch=10)
  models.initialize_from_data(state.model, lambda: images)
  initial = [v.numpy() for v in state.model.weights]
  dataset = strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensors({"images": images, "labels": labels}).repeat())
  steps.Learner(config, strategy, state).train(iter(dataset), 1, 0)
  return initial, [v.numpy() for v in state.model.weights]


@pytest.mark.parametrize("module,clip_norm", [(default, 0.0), (default, 0.05), (deep, 0.0)],
                         ids=["resnet", "resnet_clipped", "airbench"])
def test_one_step_on_two_replicas_equals_one_replica(module, clip_norm):
  config = module.get_config("smoke")
  config.mixed_precision = "float32"  # bf16 rounding differs with the batch split
  config.optimizer.clip_norm = clip_norm  # clipping must use the global gradient's norm on any layout
  config.model.sync_bn = True  # batch statistics over the global batch, as on one replica
  config.optimizer.warmup_epochs = 0.0
  rng = np.random.default_rng(0)
  images = tf.constant(rng.normal(size=(32, 32, 32, 3)), tf.float32)
  labels = tf.constant(rng.integers(0, 10, 32), tf.int64)
  single = distribute.make_strategy(config)
  config.logical_cpus = 2
  double = distribute.make_strategy(config)
  assert (single.num_replicas_in_sync, double.num_replicas_in_sync) == (1, 2)
  init1, one = _one_step(single, config, images, labels)
  init2, two = _one_step(double, config, images, labels)
  for a, b in zip(init1, init2):
    np.testing.assert_array_equal(a, b)
  assert any(not np.allclose(a, b) for a, b in zip(init1, one))  # the step did change the weights
  for a, b in zip(one, two):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_the_loop_runs_a_step_count_of_either_integer_type():
  """One traced loop per dtype of `num_steps`; its own step counter takes that dtype (an int64 count failed
  to trace against an int32 counter)."""
  config = deep.get_config("smoke")
  config.mixed_precision = "float32"
  strategy = distribute.make_strategy(config)
  state = steps.make_state(config, strategy, steps_per_epoch=10)
  rng = np.random.default_rng(2)
  batch = {"images": tf.constant(rng.normal(size=(32, 32, 32, 3)), tf.float32),
           "labels": tf.constant(rng.integers(0, 10, 32), tf.int64)}
  iterator = iter(strategy.experimental_distribute_dataset(tf.data.Dataset.from_tensors(batch).repeat()))
  loop = steps.Learner(config, strategy, state)._function(0)
  for dtype in (tf.int32, tf.int64):
    loop(iterator, tf.constant(2, dtype))
  assert int(state.step.numpy()) == 4


_PLAIN = {}  # config module -> (initial, trained) weights of its plain step


@pytest.mark.slow
@pytest.mark.parametrize("module", [default, deep], ids=["resnet", "airbench"])
@pytest.mark.parametrize("knob", ["jit_compile", "keras_layers"])
def test_step_variants_equal_the_plain_step_on_two_replicas(module, knob):
  """jit_compile compiles each replica's forward and backward pass (the iterator and the cross-replica
  update cannot be compiled); model.fast_kernels=False trains with Keras's own BatchNormalization and
  Activation instead of the fused kernel and XLA GELU. Either takes the plain step, up to float reordering."""
  config = module.get_config("smoke")
  config.mixed_precision = "float32"
  config.logical_cpus = 2
  config.optimizer.warmup_epochs = 0.0
  rng = np.random.default_rng(1)
  images = tf.constant(rng.normal(size=(32, 32, 32, 3)), tf.float32)
  labels = tf.constant(rng.integers(0, 10, 32), tf.int64)
  strategy = distribute.make_strategy(config)
  if module.__name__ not in _PLAIN:  # each knob compares with the same plain step
    _PLAIN[module.__name__] = _one_step(strategy, config, images, labels)
  init, plain = _PLAIN[module.__name__]
  if knob == "jit_compile":
    config.jit_compile = True
  else:
    config.model.fast_kernels = False
  init_variant, variant = _one_step(strategy, config, images, labels)
  for a, b in zip(init, init_variant):
    np.testing.assert_array_equal(a, b)
  assert any(not np.allclose(a, b) for a, b in zip(init, plain))
  for a, b in zip(plain, variant):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("schedule", ["cosine", "constant", "triangular", "piecewise"])
def test_schedules(schedule):
  config = default.get_config()
  config.num_epochs, config.optimizer.schedule, config.optimizer.learning_rate = 10, schedule, 1.0
  lr = optim.make_schedule(config, steps_per_epoch=100)
  values = [float(lr(s)) for s in (0, 50, 100, 501, 999)]
  expected = {"cosine": [0.0, 0.5, 1.0, None, None], "constant": [0.0, 0.5, 1.0, 1.0, 1.0],
              "triangular": [0.2, 0.6, 1.0, None, 0.0], "piecewise": [1.0, 1.0, 1.0, 0.1, 0.01]}[schedule]
  for got, want in zip(values, expected):
    if want is not None:
      assert abs(got - want) < 2e-3, (schedule, values)
  assert max(values) <= 1.0 + 1e-6


def test_ema_update_and_swap():
  weight = keras.Variable(1.0)
  ema = optim.EMA([weight], decay=0.9)
  weight.assign(2.0)
  ema.update()
  np.testing.assert_allclose(ema.averages[0].numpy(), 1.1, rtol=1e-6)
  ema.swap()
  np.testing.assert_allclose([weight.numpy(), ema.averages[0].numpy()], [1.1, 2.0], rtol=1e-6)
  ema.swap()
  np.testing.assert_allclose([weight.numpy(), ema.averages[0].numpy()], [2.0, 1.1], rtol=1e-6)


def test_tta_views():
  keras.mixed_precision.set_dtype_policy("float32")
  inputs = keras.Input((32, 32, 3))
  model = keras.Model(inputs, keras.layers.Lambda(lambda x: x[:, 0, :3, 0])(inputs))  # reads 3 pixels
  images = tf.reshape(tf.range(2 * 32 * 32 * 3, dtype=tf.float32), [2, 32, 32, 3])
  np.testing.assert_allclose(views.logits(model, images, "none"), images[:, 0, :3, 0])
  flipped = 0.5 * (images[:, 0, :3, 0] + images[:, 0, ::-1, 0][:, :3])
  np.testing.assert_allclose(views.logits(model, images, "flip"), flipped)
  read = lambda x: x[:, 0, :3, 0]
  mirror = lambda x: 0.5 * (read(x) + read(tf.reverse(x, axis=[2])))
  padded = tf.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="REFLECT")
  expected = 0.5 * mirror(images) + 0.25 * mirror(padded[:, :32, :32]) + 0.25 * mirror(padded[:, 2:, 2:])
  averaged, plain = views.logits(model, images, "flip_translate", with_plain=True)
  np.testing.assert_allclose(averaged, expected, rtol=1e-6)
  np.testing.assert_allclose(plain, read(images))
  np.testing.assert_allclose(views.logits(model, images, "flip_translate"), expected, rtol=1e-6)
  # Rows and columns at both borders: reads the first and last 3 pixels of the first and last rows.
  read = lambda x: tf.reshape(tf.gather(tf.gather(x[..., 0], [0, 31], axis=1), [0, 1, 2, 29, 30, 31], axis=2), [-1, 12])
  model = keras.Model(inputs, keras.layers.Lambda(read)(inputs))
  crop = lambda rows, columns: padded[:, 1 + rows:33 + rows, 1 + columns:33 + columns]  # moved by -rows, -columns
  expected = sum(0.2 * mirror(crop(*shift)) for shift in ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)))
  np.testing.assert_allclose(views.logits(model, images, "flip_translate4"), expected, rtol=1e-6)
  with pytest.raises(ValueError, match="tta='sideways' is not one of"):
    views.logits(model, images, "sideways")
  # A replica's empty batch at the end of a split (tf.pad's REFLECT failed on it: found under SLURM).
  for name in views.VIEWS:
    assert views.logits(model, images[:0], name).shape == (0, 12)


def test_float16_overflow_on_one_replica_skips_the_step_on_every_replica():
  """Replica 1's gradients overflow in float16 (its soft labels weigh 10^4 times too much, so its loss
  and gradients are 10^4 times larger), replica 0's do not: the step is skipped on both replicas and the
  loss scale halves; the next step trains normally."""
  config = deep.get_config("smoke")
  config.update(mixed_precision="mixed_float16", logical_cpus=2)
  config.optimizer.update(clip_norm=0.0, warmup_epochs=0.0)
  rng = np.random.default_rng(0)
  images = tf.constant(rng.normal(size=(32, 32, 32, 3)), tf.float32)
  labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 32)]
  heavy = labels.copy()
  heavy[16:] *= 1e4  # replica 1's half of the global batch
  strategy = distribute.make_strategy(config)
  assert strategy.num_replicas_in_sync == 2
  state = steps.make_state(config, strategy, steps_per_epoch=10)
  models.initialize_from_data(state.model, lambda: images)
  learner = steps.Learner(config, strategy, state)
  step = lambda y: learner.train(iter(strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensors({"images": images, "labels": tf.constant(y)}).repeat())), 1, 0)
  initial = [v.numpy() for v in state.model.trainable_variables]
  scale = optim.loss_scale(state.optimizer)
  step(heavy)
  assert optim.loss_scale(state.optimizer) == scale / 2
  for a, v in zip(initial, state.model.trainable_variables):
    np.testing.assert_array_equal(a, v.numpy())  # skipped on both replicas
  step(labels)
  after = [v.numpy() for v in state.model.trainable_variables]
  assert all(np.isfinite(a).all() for a in after)
  assert any(not np.array_equal(a, b) for a, b in zip(initial, after))
  assert optim.loss_scale(state.optimizer) == scale / 2
