"""The layers the models are built from where Keras's own are slower or missing: BatchNorm, Activation,
Conv2D and MaxPool2D are Keras's layers with faster kernels (the same weights, config and results, so checkpoints and
exports do not depend on `model.fast_kernels`); PatchWhitening and PartialDirac are airbench's whitening
conv and conv initialiser. Measured speed-ups: docs/results.md.
"""

import keras
import numpy as np
import tensorflow as tf


class BatchNorm(keras.layers.BatchNormalization):
  """Keras's BatchNormalization, computed by TensorFlow's fused kernel (FusedBatchNormV3: oneDNN on CPUs,
  cuDNN on GPUs) instead of Keras 3's chain of moments, casts and normalisation ops. Same weights, config,
  moving-statistics update and outputs (to float rounding), so checkpoints and exports are unchanged.
  Fused for 4-D inputs normalised over the channel axis; Keras's own code otherwise (synchronized
  statistics, masks, renorm, other shapes). With Activation below it is most of `model.fast_kernels`'s
  gain on the train step (docs/results.md, `python -m tools.benchmark_step`).
  """

  def _fusable(self, inputs, training, mask) -> bool:
    return (mask is None and not self.synchronized and not self.renorm and len(inputs.shape) == 4
            and self.axis in (-1, 3) and isinstance(training, (bool, type(None))))

  def call(self, inputs, training=None, mask=None):
    if not self._fusable(inputs, training, mask):
      return super().call(inputs, training=training, mask=mask)
    ones = tf.ones_like(self.moving_mean.value)
    scale = tf.cast(self.gamma.value, tf.float32) if self.scale else ones
    offset = tf.cast(self.beta.value, tf.float32) if self.center else tf.zeros_like(ones)
    if not (training and self.trainable):
      outputs, *_ = tf.raw_ops.FusedBatchNormV3(
          x=inputs, scale=scale, offset=offset, mean=self.moving_mean.value,
          variance=self.moving_variance.value, epsilon=self.epsilon, is_training=False)
      return tf.cast(outputs, self.compute_dtype)
    empty = tf.zeros([0], tf.float32)
    outputs, mean, variance, *_ = tf.raw_ops.FusedBatchNormV3(
        x=inputs, scale=scale, offset=offset, mean=empty, variance=empty, epsilon=self.epsilon,
        is_training=True)
    # The kernel returns the unbiased variance (n / (n - 1)); Keras's moving statistics average the biased one.
    n = tf.cast(tf.size(inputs) // tf.shape(inputs)[-1], tf.float32)
    variance *= (n - 1.0) / tf.maximum(n, 1.0)
    self.moving_mean.assign(self.moving_mean * self.momentum + mean * (1.0 - self.momentum))
    self.moving_variance.assign(self.moving_variance * self.momentum + variance * (1.0 - self.momentum))
    return tf.cast(outputs, self.compute_dtype)


_SQRT_HALF, _INV_SQRT_2PI = 0.5 ** 0.5, (2 * np.pi) ** -0.5


def _normal_cdf(x):
  return 0.5 * (1.0 + tf.math.erf(x * _SQRT_HALF))


@tf.function(jit_compile=True, autograph=False)
def _gelu_forward(x):
  x32 = tf.cast(x, tf.float32)
  return tf.cast(x32 * _normal_cdf(x32), x.dtype)


@tf.function(jit_compile=True, autograph=False)
def _gelu_backward(x, dy):
  x32 = tf.cast(x, tf.float32)
  pdf = tf.exp(-0.5 * x32 * x32) * _INV_SQRT_2PI
  return tf.cast(tf.cast(dy, tf.float32) * (_normal_cdf(x32) + x32 * pdf), x.dtype)


@tf.custom_gradient
def _gelu_xla(x):
  """Exact GELU, forward and backward each one XLA kernel in float32. The gradient is written out because
  XLA's autodiff of tf.nn.gelu ran slower (docs/results.md)."""
  return _gelu_forward(x), lambda dy: _gelu_backward(x, dy)


def gelu_erf(x):
  """Exact GELU as 0.5 x (1 + erf(x / sqrt 2)), computed in float32 (in bf16, 1 + erf loses the tail below
  x = -2): the pattern LiteRT's converter fuses into its GELU op, and ONNX has every op of it (Keras's gelu
  is written with erfc, which neither converter takes)."""
  x32 = tf.cast(x, tf.float32)
  return tf.cast(0.5 * x32 * (1.0 + tf.math.erf(x32 * _SQRT_HALF)), x.dtype)


class Activation(keras.layers.Activation):
  """Keras's Activation layer; while training, "gelu" runs as one XLA-compiled elementwise kernel forward
  and one backward instead of TensorFlow's chain of ~8 ops, each a pass over memory. Evaluation and the
  SavedModel run `gelu_erf`: TensorFlow's own ops, so a served export needs no XLA, and ops the
  converters take (tools/convert.py)."""

  def call(self, inputs, training=None):
    if self.activation is keras.activations.gelu:
      return _gelu_xla(inputs) if training else gelu_erf(inputs)
    return self.activation(inputs)


@tf.function(jit_compile=True, autograph=False)
def _max_pool_backward(x, dy):
  """The input's gradient of a 2x2 stride-2 "valid" max pool of x: each window's dy to the element
  TensorFlow's MaxPoolGrad picks (the first in row-major order, then each later one strictly greater: the
  first of tied maxima, a NaN first element kept), 0 elsewhere (and in an odd last row or column). One XLA
  kernel: one pass over x."""
  rows, cols = dy.shape[1], dy.shape[2]
  windows = tf.reshape(x[:, :2 * rows, :2 * cols, :], [-1, rows, 2, cols, 2, x.shape[3]])
  taps = [windows[:, :, i, :, j] for i in range(2) for j in range(2)]
  best, pick = taps[0], tf.zeros_like(dy, tf.int32)
  for k, tap in enumerate(taps[1:], 1):
    greater = best < tap
    best, pick = tf.where(greater, tap, best), tf.where(greater, k, pick)
  grads = [tf.where(tf.equal(pick, k), dy, tf.zeros_like(dy)) for k in range(4)]
  dx = tf.stack([tf.stack(grads[:2], axis=3), tf.stack(grads[2:], axis=3)], axis=2)
  dx = tf.reshape(dx, [-1, 2 * rows, 2 * cols, x.shape[3]])
  return tf.pad(dx, [[0, 0], [0, x.shape[1] - 2 * rows], [0, x.shape[2] - 2 * cols], [0, 0]])


class MaxPool2D(keras.layers.MaxPooling2D):
  """Keras's MaxPooling2D; for a 2x2 stride-2 "valid" pool on a CPU its gradient is `_max_pool_backward`
  instead of TensorFlow's MaxPoolGrad, which recomputes every window's maximum op by op. The same outputs
  and gradients as TensorFlow's own kernels, ties and NaNs included (oneDNN's MaxPoolGrad passes a NaN
  first in its window over)."""

  own_gradients = True  # False for inference-only copies, as Conv2D's

  def _own_gradient(self, inputs) -> bool:
    return (self.own_gradients and tuple(self.pool_size) == (2, 2) and tuple(self.strides) == (2, 2)
            and self.padding == "valid" and self.data_format == "channels_last" and None not in inputs.shape[1:]
            and min(inputs.shape[1], inputs.shape[2]) >= 2 and not tf.config.list_logical_devices("GPU"))

  def call(self, inputs):
    if not self._own_gradient(inputs):
      return super().call(inputs)

    @tf.custom_gradient
    def pool(x):
      y = tf.nn.max_pool2d(x, 2, 2, "VALID")
      return y, lambda dy: _max_pool_backward(x, dy)

    return pool(inputs)


def _kernel_gradient_by_shifts(x, dy, kernel_shape):
  """The gradient of a stride-1 "same" conv's kernel [kh, kw, c_in, c_out] from its input x [N, H, W, c_in]
  and output gradient dy [N, H, W, c_out]: one matmul per kernel tap, x shifted by the tap against dy."""
  kh, kw, c_in, c_out = kernel_shape
  height, width = x.shape[1], x.shape[2]
  padded = tf.pad(x, [[0, 0], [kh // 2, kh // 2], [kw // 2, kw // 2], [0, 0]])
  dy = tf.reshape(dy, [-1, c_out])
  taps = [tf.matmul(tf.reshape(padded[:, i:i + height, j:j + width, :], [-1, c_in]), dy, transpose_a=True)
          for i in range(kh) for j in range(kw)]
  return tf.reshape(tf.stack(taps), kernel_shape)


def _kernel_gradient_as_forward_conv(x, dy, kernel_shape, images_per_conv: int):
  """The same gradient as one forward conv per group of `images_per_conv` images, summed: dW[i, j, c, o] is
  the sum over images and pixels of x_padded[n, p + (i, j), c] dy[n, p, o], i.e. a "valid" conv of the
  padded input with the images as its channels and the input's channels as its batch, by the output's
  gradient as the kernel ([H, W, images, c_out]), which gives [c_in, kh, kw, c_out]."""
  kh, kw, _, _ = kernel_shape
  batch = x.shape[0]
  if batch == 0:  # a conv with an empty kernel is refused; TensorFlow's own gradient is zeros
    return tf.zeros(kernel_shape, x.dtype)
  if batch is None:  # unknown: one conv
    pieces = [(x, dy)]
  else:
    pieces = [(x[i:i + images_per_conv], dy[i:i + images_per_conv]) for i in range(0, batch, images_per_conv)]
  total = tf.add_n([tf.nn.conv2d(_images_as_channels(p, kh // 2, kw // 2), tf.transpose(d, [1, 2, 0, 3]), 1, "VALID")
                    for p, d in pieces])
  return tf.transpose(total, [1, 2, 0, 3])


_COMPILED_KERNEL_GRADIENTS = {}


def _compiled_kernel_gradient(name: str):
  """`_kernel_gradient_as_forward_conv` compiled by XLA, whose CPU conv is Eigen's with or without oneDNN
  (oneDNN's own conv, which trainer/__init__.py turns on, ran this shape, a kernel as large as the map, at a
  fifth to two thirds of XLA's rate: docs/results.md), under a name of layer `name`'s: its XLA module's
  name, by which tools.benchmark_step's op profile tells whose it is."""
  if name not in _COMPILED_KERNEL_GRADIENTS:
    def kernel_gradient(x, dy, kernel_shape, images_per_conv):
      return _kernel_gradient_as_forward_conv(x, dy, kernel_shape, images_per_conv)
    kernel_gradient.__name__ = f"{name}_kernel_gradient"
    _COMPILED_KERNEL_GRADIENTS[name] = tf.function(kernel_gradient, jit_compile=True, autograph=False)
  return _COMPILED_KERNEL_GRADIENTS[name]


def _images_as_channels(x, pad_h: int, pad_w: int):
  """x [N, H, W, C] as [C, H + 2 pad_h, W + 2 pad_w, N], zero-padded: a 2-D transpose of x as [N, H W C],
  then one that moves whole rows of N, then the pad; 1.5-3x faster than one 4-D transpose of the padded x
  on the float32 kernel gradient's shapes (docs/results.md)."""
  _, height, width, channels = x.shape
  rows = tf.transpose(tf.reshape(x, [-1, height * width * channels]))  # [H W C, N]
  by_channel = tf.transpose(tf.reshape(rows, [height * width, channels, -1]), [1, 0, 2])  # [C, H W, N]
  return tf.pad(tf.reshape(by_channel, [channels, height, width, -1]),
                [[0, 0], [pad_h, pad_h], [pad_w, pad_w], [0, 0]])


class Conv2D(keras.layers.Conv2D):
  """Keras's Conv2D with TensorFlow's backward kernels (oneDNN's where TensorFlow turns it on, else Eigen's)
  replaced, on a CPU, for stride-1 "same" convs with odd kernels, where they run far below the forward conv
  (docs/results.md, the step op by op):
  - in float32, both gradients as forward convs: the input's, a conv of the output's gradient with the
    kernel flipped and its channels swapped (TensorFlow's float32 backward-data conv ran at 13-96% of its
    forward on an AVX2 CPU); the kernel's, a conv of the input with the images as channels by the output's
    gradient (`_kernel_gradient_as_forward_conv`), compiled by XLA;
  - in other precisions (measured in bf16), the kernel's gradient on maps of at most 8x8: one matmul per
    kernel tap (oneDNN's bf16 ran at a third to a half of the machine's rate there).
  Same weights, forward pass and gradients (to float rounding).
  """

  # Pixels: the largest maps whose kernel gradient is by shifted matmuls (not float32); on larger ones
  # oneDNN's bf16 kernel gradient is the faster (measured at 15x15).
  small_map = 64
  # Images per forward conv of the float32 kernel gradient: groups of about this size ran as fast as the
  # whole batch in one conv or faster (docs/results.md; measured only where TensorFlow runs without oneDNN).
  images_per_conv = 256
  # False for inference-only copies (export.serving_model): their graphs then hold no gradient functions.
  own_gradients = True

  def _own_gradients(self, inputs) -> str | None:
    """How the kernel's gradient is computed for `inputs`: "conv" (float32: the input's gradient is a
    forward conv too), "shifts", or None for Keras's own gradients, both of them."""
    height, width = inputs.shape[1], inputs.shape[2]
    eligible = (self.own_gradients and self.data_format == "channels_last" and self.groups == 1
                and tuple(self.strides) == (1, 1) and tuple(self.dilation_rate) == (1, 1) and self.padding == "same"
                and all(k % 2 for k in self.kernel_size) and height is not None and width is not None
                and not tf.config.list_logical_devices("GPU"))
    if not eligible:
      return None
    if inputs.dtype == tf.float32:
      return "conv"
    return "shifts" if height * width <= self.small_map else None

  def convolution_op(self, inputs, kernel):
    kernel_way = self._own_gradients(inputs)
    if kernel_way is None:
      return super().convolution_op(inputs, kernel)
    kernel = tf.cast(kernel, inputs.dtype)

    @tf.custom_gradient
    def conv(x, kernel):
      def grad(dy):
        with tf.name_scope(f"{self.name}/gradient"):  # the tape runs this outside the layer's scope
          if kernel_way == "conv":
            flipped = tf.transpose(tf.reverse(kernel, [0, 1]), [0, 1, 3, 2])
            dx = tf.nn.conv2d(dy, flipped, 1, "SAME")
          else:
            dx = tf.raw_ops.Conv2DBackpropInput(input_sizes=tf.shape(x), filter=kernel, out_backprop=dy,
                                                strides=[1, 1, 1, 1], padding="SAME")
          with tf.name_scope("kernel_gradient"):  # apart from the input's in benchmark_step's op profile
            if kernel_way == "conv":
              dkernel = _compiled_kernel_gradient(self.name)(x, dy, tuple(kernel.shape), self.images_per_conv)
            else:  # "shifts" (bf16): its other maps keep Keras's gradients whole (convolution_op's first return)
              dkernel = _kernel_gradient_by_shifts(x, dy, kernel.shape)
          return dx, dkernel
      return tf.nn.conv2d(x, kernel, 1, "SAME"), grad

    return conv(inputs, kernel)


def torch_default() -> keras.initializers.Initializer:
  """PyTorch's default init of conv and linear kernels: uniform in +-1/sqrt(fan_in)."""
  return keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform")


class PartialDirac(keras.initializers.Initializer):
  """PyTorch's default conv init (uniform in +-1/sqrt(fan_in)) with the first min(in, out) filters set to
  the identity (a 1 at the kernel's centre on their own input channel): the net starts close to passing its
  input through, as airbench."""

  def __call__(self, shape, dtype=None):
    kh, kw, c_in, c_out = shape
    kernel = torch_default()(shape, "float32")
    n = min(c_in, c_out)
    identity = np.zeros((kh, kw, c_in, n), np.float32)
    identity[kh // 2, kw // 2, np.arange(n), np.arange(n)] = 1.0
    return tf.cast(tf.concat([tf.constant(identity), kernel[..., n:]], axis=-1), dtype or "float32")


class PatchWhitening(keras.layers.Layer):
  """A `size` x `size` valid conv whose frozen kernel whitens image patches: 2 x 3 x size^2 filters, the
  eigenvectors of the training patches' covariance scaled by 1/sqrt(eigenvalue) and their negatives
  (airbench). Only its bias trains. `initialize_from_data` sets the kernel; until then it is zero.
  """

  def __init__(self, size: int = 2, epsilon: float = 5e-4, bias_epochs: float = 0, **kwargs):
    super().__init__(**kwargs)
    self.size, self.epsilon = size, epsilon
    self.bias_epochs = bias_epochs  # the bias trains for this many epochs, then freezes; 0 = always

  def build(self, input_shape):
    width = 2 * input_shape[-1] * self.size ** 2
    self.kernel = self.add_weight(name="kernel", shape=(self.size, self.size, input_shape[-1], width),
                                  initializer="zeros", trainable=False)
    self.bias = self.add_weight(name="bias", shape=(width,), initializer="zeros")

  def call(self, x):
    x = tf.nn.conv2d(x, tf.cast(self.kernel, x.dtype), 1, "VALID")
    return tf.nn.bias_add(x, tf.cast(self.bias, x.dtype))

  def initialize_from_data(self, images: tf.Tensor) -> None:
    """`images`: normalised float training images [N, H, W, C] (airbench uses 5,000)."""
    self.kernel.assign(self.kernel_from_data(images))

  def kernel_from_data(self, images: tf.Tensor) -> np.ndarray:
    """The kernel `initialize_from_data` sets, computed without writing any variable."""
    c, n = images.shape[-1], self.size * self.size * images.shape[-1]
    # The patches as a conv with one-hot filters (element k of the (row, col, channel)-flattened patch in
    # channel k): the same values as tf.image.extract_patches at half its time; covariance in TF's float64
    # matmul (numpy's took longer than the rest together).
    with tf.device("/cpu:0"):  # exact: a GPU may run float32 convs in TF32 or by Winograd
      one_hot = tf.reshape(tf.eye(n), [self.size, self.size, c, n])
      patches = tf.reshape(tf.nn.conv2d(tf.cast(images, tf.float32), one_hot, 1, "VALID"), [-1, n])
      patches = tf.cast(patches, tf.float64)
      covariance = tf.matmul(patches, patches, transpose_a=True) / tf.cast(tf.shape(patches)[0], tf.float64)
    eigenvalues, eigenvectors = np.linalg.eigh(covariance.numpy())
    filters = eigenvectors / np.sqrt(eigenvalues + self.epsilon)  # one whitening filter per column
    filters = filters.reshape(self.size, self.size, c, -1)  # back to (row, col, channel) by filter
    return np.concatenate([filters, -filters], axis=-1).astype(np.float32)

  def get_config(self):
    return {**super().get_config(), "size": self.size, "epsilon": self.epsilon, "bias_epochs": self.bias_epochs}
