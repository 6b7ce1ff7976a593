"""trainer/models.py, trainer/layers.py and the optimizer pieces of airbench's recipe (trainer/optim.py)."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from configs import deep
from configs import deeper
from configs import default
from configs import vgg_small
from trainer import cpu
from trainer import layers
from trainer import models
from trainer import optim


def correlated_images(seed, noise):
  """64 images whose neighbouring pixels and channels are strongly correlated, as in natural images, plus
  independent per-pixel noise of standard deviation `noise` (the faintest patch directions)."""
  rng = np.random.default_rng(seed)
  base = rng.normal(size=(64, 33, 33, 1))
  return tf.constant(base[:, :32, :32] + 0.5 * base[:, 1:, 1:] + noise * rng.normal(size=(64, 32, 32, 3)),
                     tf.float32)


def test_patch_whitening_whitens_the_patches_it_was_set_from():
  keras.mixed_precision.set_dtype_policy("float32")
  images = correlated_images(0, noise=0.1)
  layer = layers.PatchWhitening(2, epsilon=0.0)
  layer.build(images.shape)
  layer.initialize_from_data(images)
  out = layer(images).numpy().reshape(-1, 24)
  assert layer.kernel.shape == (2, 2, 3, 24)
  np.testing.assert_allclose(out[:, :12], -out[:, 12:], atol=1e-5)  # the filters and their negatives
  np.testing.assert_allclose(out[:, :12].T @ out[:, :12] / len(out), np.eye(12), atol=2e-3)


def test_whitening_epsilon_damps_the_faint_directions():
  keras.mixed_precision.set_dtype_policy("float32")
  images = correlated_images(1, noise=0.01)
  patches = tf.reshape(tf.image.extract_patches(images, [1, 2, 2, 1], [1] * 4, [1] * 4, "VALID"), [-1, 12])
  eigenvalues = np.linalg.eigvalsh(np.cov(patches.numpy().astype(np.float64).T, bias=True))
  config = deep.get_config()
  config.model.whiten_epsilon = 1e-3
  layer = models.build(config.model).get_layer("whiten")
  assert layer.epsilon == 1e-3
  layer.initialize_from_data(images)
  out = layer(images).numpy().reshape(-1, 24)[:, :12].astype(np.float64)
  # Each principal direction comes out with variance eigenvalue / (eigenvalue + epsilon): the faintest
  # (here the pixel noise, eigenvalues ~1e-4) are damped, the strong ones pass at unit variance.
  expected = eigenvalues / (eigenvalues + 1e-3)
  assert expected[0] < 0.2 and expected[-1] > 0.99
  np.testing.assert_allclose(np.linalg.eigvalsh(out.T @ out / len(out)), expected, atol=5e-3)


def test_partial_dirac_passes_the_first_channels_through():
  kernel = layers.PartialDirac()((3, 3, 4, 6)).numpy()
  x = tf.constant(np.random.default_rng(0).normal(size=(1, 5, 5, 4)), tf.float32)
  y = tf.nn.conv2d(x, kernel, 1, "SAME").numpy()
  np.testing.assert_allclose(y[..., :4], x.numpy(), atol=1e-6)
  bound = 1 / np.sqrt(3 * 3 * 4)
  assert np.all(np.abs(kernel[..., 4:]) <= bound) and np.std(kernel[..., 4:]) > bound / 4


def test_airbench_groups_of_three_convs_add_the_first_to_the_last_two():
  """group_convs=3 (configs/deeper.py): in each group the activated pooled conv is added to the two convs
  after it, so with those two convs' kernels at 0 (and BatchNorm's biases 0) a group passes it on as if the
  two were not there: act(x + 0)."""
  keras.mixed_precision.set_dtype_policy("float32")
  config = deeper.get_config("smoke").model
  model = models.build(config)
  assert [layer.name for layer in model.layers if isinstance(layer, keras.layers.Add)] == ["group0_add", "group1_add"]
  x = np.random.default_rng(0).normal(size=(2, 32, 32, 3)).astype("float32")
  for g in range(2):
    for c in (1, 2):
      kernel = model.get_layer(f"group{g}_conv{c}").kernel
      kernel.assign(np.zeros(kernel.shape, "float32"))
  outputs = keras.Model(model.inputs, [model.get_layer("group0_act0").output, model.get_layer("group0_act2").output])
  first, group = outputs(x, training=False)
  np.testing.assert_allclose(group, keras.activations.gelu(first).numpy(), rtol=1e-5, atol=1e-5)
  config.group_convs = 4
  with pytest.raises(ValueError, match=r"model.group_convs=4 is not one of: 2, 3"):
    models.build(config)


def test_airbench_last_group_convs_deepens_only_the_last_group():
  """last_group_convs=3 gives the last group airbench96's residual pair and leaves the others at two convs."""
  config = deep.get_config("fast").model
  config.last_group_convs = 3
  model = models.build(config)
  assert [layer.name for layer in model.layers if isinstance(layer, keras.layers.Add)] == ["group2_add"]
  assert [layer.name for layer in model.layers if layer.name.startswith("group") and "_conv" in layer.name] == [
      "group0_conv0", "group0_conv1", "group1_conv0", "group1_conv1", "group2_conv0", "group2_conv1", "group2_conv2"]
  model.get_layer("group2_act2")
  config.group_convs, config.last_group_convs = 3, 2  # and the other way round
  model = models.build(config)
  assert [layer.name for layer in model.layers if isinstance(layer, keras.layers.Add)] == ["group0_add", "group1_add"]
  config.last_group_convs = 1
  with pytest.raises(ValueError, match=r"model.last_group_convs=1 is not one of: 0, 2, 3"):
    models.build(config)


def test_airbench_trains_bn_biases_fast_and_freezes_the_whitening_bias():
  config = deep.get_config("sgd")  # the recipe that trains BatchNorm biases 64x faster
  model = models.build(config.model)
  assert sum(int(np.prod(v.shape)) for v in model.weights) > 1.9e6
  names = [v.path for v in model.trainable_variables]
  assert not [n for n in names if n.endswith("gamma")] and len([n for n in names if n.endswith("beta")]) == 6
  whiten_bias = model.get_layer("whiten").bias
  assert any(v is whiten_bias for v in models.trainable_at(model, config.model.whiten_bias_epochs - 1))
  assert not any(v is whiten_bias for v in models.trainable_at(model, config.model.whiten_bias_epochs))
  config.optimizer.update(whiten_bias_lr_scale=0.5, head_lr_scale=2.0)
  multipliers = dict(zip(names, optim.gradient_multipliers(model, config.optimizer)))
  assert [n for n, m in multipliers.items() if m == 64.0] == [n for n in names if n.endswith("beta")]
  assert multipliers[whiten_bias.path] == 0.5 and multipliers[model.get_layer("logits").kernel.path] == 2.0
  assert {m for n, m in multipliers.items() if not n.endswith("beta")} == {0.5, 2.0, 1.0}


def test_lookahead_blends_every_few_steps_and_finishes_on_the_average():
  weight = keras.Variable(0.0)
  lookahead = optim.Lookahead([weight], every=2, decay=0.5, total_steps=4)
  weight.assign(1.0)
  lookahead.update(tf.constant(1))  # not a multiple of `every`: nothing happens
  assert weight.numpy() == 1.0 and lookahead.averages[0].numpy() == 0.0
  lookahead.update(tf.constant(2))  # d = 0.5 * (2/4)^3 = 1/16
  np.testing.assert_allclose([weight.numpy(), lookahead.averages[0].numpy()], [15 / 16] * 2, rtol=1e-6)
  weight.assign(3.0)
  lookahead.finish()
  np.testing.assert_allclose(weight.numpy(), 15 / 16, rtol=1e-6)


def test_orthogonalize_pushes_singular_values_towards_one():
  g = tf.constant(np.random.default_rng(0).normal(size=(16, 72)) * np.linspace(0.01, 10, 72), tf.float32)
  for matrix in (g, tf.transpose(g)):
    s = np.linalg.svd(optim.orthogonalize(matrix, 5).numpy(), compute_uv=False)
    assert 0.5 < s.min() and s.max() < 1.5, s


def test_muon_sgd_normalises_conv_kernels_and_steps_the_rest_with_sgd():
  kernel = keras.Variable(np.random.default_rng(0).normal(size=(3, 3, 4, 8)).astype(np.float32))
  bias = keras.Variable(np.ones(8, np.float32))
  optimizer = optim.MuonSGD(0.1, momentum=0.0, muon_ratio=0.5, muon_momentum=0.0, weight_decay=0.1)
  grads = [tf.ones_like(kernel), tf.ones_like(bias)]
  optimizer.apply(grads, [kernel, bias])
  np.testing.assert_allclose(bias.numpy(), 1 - 0.1 * 1 - 0.1 * 0.1, rtol=1e-6)  # SGD step + decoupled decay
  # A rank-one gradient orthogonalises to a unit-norm direction: the kernel lands at norm sqrt(8) minus a
  # step of 0.05 along it (no decay on kernels).
  assert abs(np.linalg.norm(kernel.numpy()) - np.sqrt(8)) < 0.1


def _train_step(layer, projection) -> tf.types.experimental.PolymorphicFunction:
  """A tf.function of x, as in the train step: output, and gradients of a fixed random projection of it
  w.r.t. the input and the trainable weights, of one training call."""
  @tf.function
  def run(x):
    with tf.GradientTape() as tape:
      tape.watch(x)
      y = layer(x, training=True)
      loss = tf.reduce_sum(tf.cast(y, tf.float32) * projection)
    return y, tape.gradient(loss, [x] + layer.trainable_variables)
  return run


def _train_call(layer, x, projection):
  """`_train_step`'s output and gradients at x."""
  return _train_step(layer, projection)(x)


@pytest.mark.parametrize("policy,scale", [("float32", True), ("float32", False), ("mixed_bfloat16", False)])
def test_fused_batch_norm_matches_keras_batch_norm(policy, scale):
  rng = np.random.default_rng(0)
  x = tf.constant(rng.normal(3.0, 2.0, size=(4, 3, 3, 5)), tf.float32)  # n = 36 per channel: Bessel matters
  projection = tf.constant(rng.normal(size=x.shape), tf.float32)
  pair = [cls(momentum=0.6, epsilon=1e-5, scale=scale, dtype=policy)
            for cls in (keras.layers.BatchNormalization, layers.BatchNorm)]
  for layer in pair:
    layer.build(x.shape)
  for v in pair[0].weights:
    v.assign(rng.uniform(0.5, 1.5, size=v.shape))
  for ours, theirs in zip(pair[1].weights, pair[0].weights):
    ours.assign(theirs)
  (y0, g0), (y1, g1) = [_train_call(layer, x, projection) for layer in pair]
  tol = 1e-5 if policy == "float32" else 2e-2
  assert y1.dtype == y0.dtype
  np.testing.assert_allclose(np.float32(y1), np.float32(y0), atol=tol)
  for a, b in zip(g1, g0):
    np.testing.assert_allclose(np.float32(a), np.float32(b), atol=tol * 10)
  for ours, theirs in zip(pair[1].non_trainable_weights, pair[0].non_trainable_weights):
    np.testing.assert_allclose(ours.numpy(), theirs.numpy(), rtol=1e-5)  # the biased variance, as Keras
  np.testing.assert_allclose(np.float32(pair[1](x, training=False)), np.float32(pair[0](x, training=False)),
                             atol=tol)


@pytest.mark.parametrize("dtype,tol", [(tf.float32, 1e-5), (tf.bfloat16, 2e-2)])
def test_xla_gelu_while_training_equals_tensorflows(dtype, tol, monkeypatch):
  calls, original = [], layers._gelu_xla
  monkeypatch.setattr(layers, "_gelu_xla", lambda x: calls.append(x) or original(x))
  x = tf.constant(np.random.default_rng(1).normal(size=(8, 4, 4, 6)) * 3, tf.float32)
  projection = tf.constant(np.random.default_rng(2).normal(size=x.shape), tf.float32)
  y, (grad,) = _train_call(layers.Activation("gelu", dtype=dtype.name), tf.cast(x, dtype), projection)
  with tf.GradientTape() as tape:  # the exact function and gradient, in float32
    tape.watch(x)
    expected = tf.nn.gelu(x)
  assert calls and y.dtype == grad.dtype == dtype  # the written-out gradient's path ran
  np.testing.assert_allclose(np.float32(y), expected.numpy(), atol=tol, rtol=tol)
  np.testing.assert_allclose(np.float32(grad), tape.gradient(expected, x, projection).numpy(), atol=tol, rtol=tol)
  inference = layers.Activation("gelu", dtype="float32")  # not the global policy another test may have left
  np.testing.assert_allclose(inference(x, training=False).numpy(), expected.numpy(), atol=1e-6)


@pytest.mark.parametrize("policy,kernel,height,width", [
    ("float32", 3, 7, 7), ("mixed_bfloat16", 5, 3, 3), ("mixed_bfloat16", 3, 7, 7), ("float32", 3, 15, 15),
    ("float32", 5, 9, 13), ("mixed_bfloat16", 3, 15, 15), ("float32", 3, 3, 3), ("float32", (3, 5), 9, 13),
    ("mixed_bfloat16", (5, 3), 7, 7)])
def test_conv_gradients_of_our_kernels_match_keras_conv(policy, kernel, height, width):
  """layers.Conv2D's own backward kernels (in float32 both gradients as forward convs, in groups of 5 and 1
  images for the kernel's, compiled by XLA; else the kernel's gradient by shifted matmuls on small maps) give Keras's Conv2D's
  gradients, and run where they are meant to."""
  if tf.config.list_logical_devices("GPU"):
    pytest.skip("layers.Conv2D takes Keras's own gradients on a GPU")
  rng = np.random.default_rng(3)
  x = tf.constant(rng.normal(size=(6, height, width, 5)), tf.float32)
  projection = tf.constant(rng.normal(size=(6, height, width, 4)), tf.float32)
  pair = [cls(4, kernel, padding="same", use_bias=False, dtype=policy) for cls in (keras.layers.Conv2D, layers.Conv2D)]
  for layer in pair:
    layer.build(x.shape)
  pair[1].kernel.assign(pair[0].kernel)
  pair[1].images_per_conv = 5  # 6 images: a group of 5 and one of 1
  float32 = policy == "float32"
  kernel_way = "conv" if float32 else "shifts" if height * width <= layers.Conv2D.small_map else None
  assert pair[1]._own_gradients(tf.cast(x, pair[1].compute_dtype)) == kernel_way
  (y0, g0), (y1, g1) = [_train_call(layer, x, projection) for layer in pair]
  graph = _train_step(pair[1], projection).get_concrete_function(x).graph.as_graph_def()
  ops = [node.op for node in graph.node]
  compiled = [node.op for f in graph.library.function if f.attr["_XlaMustCompile"].b for node in f.node_def]
  assert ("Conv2DBackpropFilter" in ops + compiled) == (kernel_way is None), ops
  assert ("Conv2DBackpropInput" in ops + compiled) == (not float32), ops
  assert ops.count("Conv2D") == (2 if float32 else 1), ops  # forward, input gradient
  assert compiled.count("Conv2D") == (2 if float32 else 0), compiled  # the kernel's in 2 groups, by XLA
  tol = 1e-5 if policy == "float32" else 3e-2
  np.testing.assert_allclose(np.float32(y1), np.float32(y0), atol=tol)
  for a, b in zip(g1, g0):  # the input's gradient, then the kernel's
    scale = np.abs(np.float32(b)).max()
    np.testing.assert_allclose(np.float32(a) / scale, np.float32(b) / scale, atol=tol)


@pytest.mark.parametrize("shape,pad", [((3, 7, 9, 5), (1, 1)), ((1, 4, 6, 2), (2, 1)), ((2, 1, 1, 3), (0, 2))])
def test_images_as_channels_is_the_padded_input_transposed_for_any_batch(shape, pad):
  """The float32 kernel gradient's input: the same values as padding x and then one 4-D transpose, with the
  batch known or not (a graph traced for any batch)."""
  x = tf.constant(np.random.default_rng(4).normal(size=shape), tf.float32)
  expected = tf.transpose(tf.pad(x, [[0, 0], [pad[0]] * 2, [pad[1]] * 2, [0, 0]]), [3, 1, 2, 0]).numpy()
  np.testing.assert_array_equal(layers._images_as_channels(x, *pad).numpy(), expected)
  any_batch = tf.function(lambda x: layers._images_as_channels(x, *pad),
                          input_signature=[tf.TensorSpec([None, *shape[1:]], tf.float32)])
  np.testing.assert_array_equal(any_batch(x).numpy(), expected)


@pytest.mark.parametrize("policy,shape,nans", [("float32", (3, 7, 9, 5), False), ("float32", (2, 6, 6, 4), True),
                                               ("mixed_bfloat16", (2, 5, 8, 3), True)])
def test_max_pool_gradient_of_our_kernel_matches_keras_ties_and_nans_included(policy, shape, nans):
  """layers.MaxPool2D's own gradient (one XLA kernel) picks the element of each window TensorFlow's own
  MaxPoolGrad picks: on inputs rounded to whole numbers windows of 4 tie often; a NaN first in its window
  keeps the gradient, a NaN after it is passed over; an odd last row or column gets none. (oneDNN's
  MaxPoolGrad passes a NaN first in its window over, so with oneDNN on only the rule is checked there.)"""
  if tf.config.list_logical_devices("GPU"):
    pytest.skip("layers.MaxPool2D takes TensorFlow's own gradient on a GPU")
  rng = np.random.default_rng(5)
  values = np.round(rng.normal(size=shape))
  if nans:
    values[0, 0, 0, 0] = values[1, 1, 3, 1] = np.nan  # first in window (0, 0); last in window (0, 1)
  x = tf.constant(values, tf.float32)
  projection = tf.constant(rng.normal(size=(shape[0], shape[1] // 2, shape[2] // 2, shape[3])), tf.float32)
  pair = [cls(2, dtype=policy) for cls in (keras.layers.MaxPooling2D, layers.MaxPool2D)]
  assert pair[1]._own_gradient(x)
  (y0, (g0,)), (y1, (g1,)) = [_train_call(layer, x, projection) for layer in pair]
  ops = [op.type for op in _train_step(pair[1], projection).get_concrete_function(x).graph.get_operations()]
  assert "MaxPoolGrad" not in ops, ops
  np.testing.assert_array_equal(np.float32(y1), np.float32(y0))
  n, h, w, c = shape
  windows = values[:, :h // 2 * 2, :w // 2 * 2].reshape(n, h // 2, 2, w // 2, 2, c)
  taps = [windows[:, :, i, :, j] for i in range(2) for j in range(2)]
  best, pick = taps[0], np.zeros(taps[0].shape, int)
  for k, tap in enumerate(taps[1:], 1):  # the first maximum in row-major order; a comparison with NaN is false
    pick, best = np.where(best < tap, k, pick), np.where(best < tap, tap, best)
  expected = np.zeros(values.shape, np.float32)
  tap_index = (2 * np.arange(2)[:, None] + np.arange(2))[None, None, :, None, :, None]  # (i, j) -> 2 i + j
  picked = pick[:, :, None, :, None, :] == tap_index
  expected[:, :h // 2 * 2, :w // 2 * 2] = np.where(
      picked, np.float32(tf.cast(projection, y1.dtype))[:, :, None, :, None, :], 0).reshape(n, h // 2 * 2, w // 2 * 2, c)
  np.testing.assert_array_equal(np.float32(g1), expected)
  if not (nans and cpu.onednn_enabled()):
    np.testing.assert_array_equal(np.float32(g1), np.float32(g0))
  assert ((windows == np.nanmax(windows, axis=(2, 4), keepdims=True)).sum(axis=(2, 4)) > 1).any()  # ties, and
  assert np.count_nonzero(np.float32(g1)) == np.prod(projection.shape)  # each window's gradient in one element


@pytest.mark.parametrize("fast", [True, False])
@pytest.mark.parametrize("module", [default, deep, deeper, vgg_small], ids=["resnet", "airbench", "airbench96", "cnn"])
def test_fast_kernels_pick_our_pool_in_every_model_and_keras_own_without(module, fast):
  config = module.get_config("smoke").model
  config.fast_kernels = fast
  pools = [layer for layer in models.build(config).layers if isinstance(layer, keras.layers.MaxPooling2D)]
  assert pools and all(isinstance(pool, layers.MaxPool2D) == fast for pool in pools)


@pytest.mark.parametrize("settings,shape", [(dict(pool_size=3), (2, 6, 6, 3)), (dict(pool_size=2, strides=1), (2, 6, 6, 3)),
                                            (dict(pool_size=2, padding="same"), (2, 6, 6, 3)), ({}, (2, 1, 6, 3))])
def test_max_pool_keeps_tensorflow_gradient_where_ours_does_not_hold(settings, shape):
  assert not layers.MaxPool2D(**{"pool_size": 2, **settings})._own_gradient(tf.zeros(shape))


@pytest.mark.parametrize("settings", [dict(kernel_size=2), dict(kernel_size=3, strides=2),
                                      dict(kernel_size=3, dilation_rate=2), dict(kernel_size=3, padding="valid")])
def test_conv_keeps_keras_gradients_where_ours_do_not_hold(settings):
  """An even kernel, a stride, a dilation or "valid" padding: the flipped-kernel and shifted-matmul gradients
  would be wrong there, so Keras's own run."""
  layer = layers.Conv2D(4, **{"padding": "same", **settings})
  x = tf.zeros([2, 3, 3, 5])
  layer.build(x.shape)
  assert layer._own_gradients(x) is None
