"""Keras 3 models. Each builder takes the `model` ConfigDict and the data's shape and returns a
`keras.Model` mapping normalised float images [N, H, W, C] to float32 logits [N, K].

Under a mixed-precision policy layers compute in bf16/fp16; the logits layer stays float32, and BatchNorm
computes its statistics in float32. BatchNorm, Activation and Conv2D below are Keras's layers made faster
(fused kernel, XLA-compiled GELU, kernel gradients by matmuls) with the same weights and results.
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from pipeline import cifar10


class BatchNorm(keras.layers.BatchNormalization):
  """Keras's BatchNormalization, computed by TensorFlow's fused kernel (FusedBatchNormV3: oneDNN on CPUs,
  cuDNN on GPUs) instead of Keras 3's chain of moments, casts and normalisation ops. Same weights, config,
  moving-statistics update and outputs (to float rounding), so checkpoints and exports are unchanged.
  Fused for 4-D inputs normalised over the channel axis; Keras's own code otherwise (synchronized
  statistics, masks, renorm, other shapes).

  With Activation below (`model.fast_kernels`), deep.py's whole train step ran 1.77x as fast as with Keras's
  layers: 281 -> 499 images/s, bf16, 2-core Xeon with AMX, 2026-12-01 (`python -m tools.benchmark_step`).
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


@tf.function(jit_compile=True)
def _gelu_forward(x):
  x32 = tf.cast(x, tf.float32)
  return tf.cast(x32 * _normal_cdf(x32), x.dtype)


@tf.function(jit_compile=True)
def _gelu_backward(x, dy):
  x32 = tf.cast(x, tf.float32)
  pdf = tf.exp(-0.5 * x32 * x32) * _INV_SQRT_2PI
  return tf.cast(tf.cast(dy, tf.float32) * (_normal_cdf(x32) + x32 * pdf), x.dtype)


@tf.custom_gradient
def _gelu_xla(x):
  """Exact GELU, forward and backward each one XLA kernel in float32. The gradient is written out because
  XLA's autodiff of tf.nn.gelu ran 2.4x slower (BUILD.md, "The step on Xeon-AMX")."""
  return _gelu_forward(x), lambda dy: _gelu_backward(x, dy)


class Activation(keras.layers.Activation):
  """Keras's Activation layer; while training, "gelu" runs as one XLA-compiled elementwise kernel forward
  and one backward instead of TensorFlow's chain of ~8 ops, each a pass over memory. Evaluation and the
  SavedModel use TensorFlow's own ops, so a served export needs no XLA.

  Forward + backward of deep.py's 64/256/256 net with BatchNorm above, bf16, 2-core Xeon with AMX
  (2026-12-01): 845 images/s with TF's GELU, ~1,100 with this one (ReLU, for scale: 1,490); its written-out
  gradient since then: BUILD.md, "The step on Xeon-AMX".
  """

  def call(self, inputs, training=None):
    if training and self.activation is keras.activations.gelu:
      return _gelu_xla(inputs)
    return self.activation(inputs)


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


class Conv2D(keras.layers.Conv2D):
  """Keras's Conv2D; on a CPU, for stride-1 "same" convs with odd kernels on maps of at most 8x8, the
  kernel's gradient is one matmul per kernel tap instead of oneDNN's weight-gradient conv, which runs
  there at a third to a half of the machine's rate. Same weights, forward pass and input gradient.
  """

  small_map = 64  # pixels: at 15x15 oneDNN's own kernel is the faster (BUILD.md, "The step, op by op")

  def _by_shifts(self, inputs) -> bool:
    height, width = inputs.shape[1], inputs.shape[2]
    return (self.data_format == "channels_last" and self.groups == 1 and tuple(self.strides) == (1, 1)
            and tuple(self.dilation_rate) == (1, 1) and self.padding == "same"
            and all(k % 2 for k in self.kernel_size) and height is not None and width is not None
            and height * width <= self.small_map and not tf.config.list_logical_devices("GPU"))

  def convolution_op(self, inputs, kernel):
    if not self._by_shifts(inputs):
      return super().convolution_op(inputs, kernel)
    kernel = tf.cast(kernel, inputs.dtype)

    @tf.custom_gradient
    def conv(x, kernel):
      def grad(dy):
        with tf.name_scope(f"{self.name}/gradient"):  # the tape runs this outside the layer's scope
          dx = tf.raw_ops.Conv2DBackpropInput(input_sizes=tf.shape(x), filter=kernel, out_backprop=dy,
                                              strides=[1, 1, 1, 1], padding="SAME")
          return dx, _kernel_gradient_by_shifts(x, dy, kernel.shape)
      return tf.nn.conv2d(x, kernel, 1, "SAME"), grad

    return conv(inputs, kernel)


def _layer_classes(config) -> tuple[type, type, type]:
  """The BatchNorm, Activation and Conv2D layers `config.fast_kernels` picks: ours above, or Keras's own."""
  if config.fast_kernels:
    return BatchNorm, Activation, Conv2D
  return keras.layers.BatchNormalization, keras.layers.Activation, keras.layers.Conv2D


def _conv_bn(x, width: int, config, name: str):
  batch_norm, activation, conv2d = _layer_classes(config)
  x = conv2d(width, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
  x = batch_norm(momentum=config.bn_momentum, epsilon=1e-5, synchronized=config.sync_bn, name=f"{name}_bn")(x)
  return activation(config.activation, name=f"{name}_act")(x)


@dataclasses.dataclass(frozen=True)
class DataShape:
  """What a model needs to know of the data: the input shape and the head's size."""
  image_shape: tuple[int, int, int]
  num_classes: int


CIFAR10 = DataShape(cifar10.IMAGE_SHAPE, cifar10.NUM_CLASSES)


def resnet(config, data: DataShape) -> keras.Model:
  """A deep residual CNN in the shape of Page's ResNet-9 / airbench: a stem, then per stage a conv and a
  2x2 max-pool followed by `blocks_per_stage` residual blocks of two convs, then global max-pool.

  Config: widths (channels per stage), stem_width, blocks_per_stage, activation, bn_momentum, sync_bn,
  logit_scale (logits are multiplied by it; < 1 softens the initial predictions), fast_kernels.
  """
  batch_norm, activation, conv2d = _layer_classes(config)
  inputs = keras.Input(data.image_shape, name="images")
  x = _conv_bn(inputs, config.stem_width, config, "stem")
  for s, width in enumerate(config.widths):
    x = conv2d(width, 3, padding="same", use_bias=False, name=f"stage{s}_conv")(x)
    x = keras.layers.MaxPooling2D(2, name=f"stage{s}_pool")(x)
    x = batch_norm(momentum=config.bn_momentum, epsilon=1e-5, synchronized=config.sync_bn,
                   name=f"stage{s}_bn")(x)
    x = activation(config.activation, name=f"stage{s}_act")(x)
    for b in range(config.blocks_per_stage):
      shortcut = x
      x = _conv_bn(x, width, config, f"stage{s}_block{b}a")
      x = _conv_bn(x, width, config, f"stage{s}_block{b}b")
      x = keras.layers.Add(name=f"stage{s}_block{b}_add")([shortcut, x])
  x = keras.layers.GlobalMaxPooling2D(name="pool")(x)
  x = keras.layers.Dense(data.num_classes, use_bias=False, dtype="float32", name="logits")(x)
  if config.logit_scale != 1.0:
    x = keras.layers.Rescaling(config.logit_scale, dtype="float32", name="logit_scale")(x)
  return keras.Model(inputs, x, name="resnet")


def _per_block(values, blocks: int) -> tuple:
  """One value per block: a single value applies to all."""
  values = tuple(values)
  return values * blocks if len(values) == 1 else values


def plain_cnn(config, data: DataShape) -> keras.Model:
  """The tutorial CNNs: blocks of `convs_per_block` convs (with bias), each optionally followed by
  BatchNorm (`norm="post"`: conv -> activation -> BN), then a 2x2 max-pool and dropout; then dense layers.

  Config: widths, convs_per_block, padding, activation, norm (none | post), block_dropout (one value or one
  per block), pool_after_last, dense (widths of the hidden dense layers), dense_dropout, l2 (weight penalty
  on conv and dense kernels), initializer, fast_kernels.
  """
  batch_norm, _, _ = _layer_classes(config)
  regularizer = keras.regularizers.L2(config.l2) if config.l2 else None
  dropout = _per_block(config.block_dropout, len(config.widths))
  inputs = keras.Input(data.image_shape, name="images")
  x = inputs
  for b, width in enumerate(config.widths):
    for c in range(config.convs_per_block):
      x = keras.layers.Conv2D(width, 3, padding=config.padding, activation=config.activation,
                              kernel_initializer=config.initializer, kernel_regularizer=regularizer,
                              name=f"block{b}_conv{c}")(x)
      if config.norm == "post":
        x = batch_norm(momentum=config.bn_momentum, synchronized=config.sync_bn, name=f"block{b}_bn{c}")(x)
    if b < len(config.widths) - 1 or config.pool_after_last:
      x = keras.layers.MaxPooling2D(2, name=f"block{b}_pool")(x)
    if dropout[b]:
      x = keras.layers.Dropout(dropout[b], name=f"block{b}_dropout")(x)
  x = keras.layers.Flatten(name="flatten")(x)
  for d, width in enumerate(config.dense):
    x = keras.layers.Dense(width, activation=config.activation, kernel_initializer=config.initializer,
                           kernel_regularizer=regularizer, name=f"dense{d}")(x)
    if config.dense_dropout:
      x = keras.layers.Dropout(config.dense_dropout, name=f"dense{d}_dropout")(x)
  x = keras.layers.Dense(data.num_classes, dtype="float32", kernel_regularizer=regularizer, name="logits")(x)
  return keras.Model(inputs, x, name="plain_cnn")


def mlp(config, data: DataShape) -> keras.Model:
  """A multi-layer perceptron on the flattened pixels. Config: dense (hidden widths), activation."""
  inputs = keras.Input(data.image_shape, name="images")
  x = keras.layers.Flatten(name="flatten")(inputs)
  for d, width in enumerate(config.dense):
    x = keras.layers.Dense(width, activation=config.activation, name=f"dense{d}")(x)
  x = keras.layers.Dense(data.num_classes, dtype="float32", name="logits")(x)
  return keras.Model(inputs, x, name="mlp")


def _torch_default() -> keras.initializers.Initializer:
  """PyTorch's default init of conv and linear kernels: uniform in +-1/sqrt(fan_in)."""
  return keras.initializers.VarianceScaling(1 / 3, "fan_in", "uniform")


class PartialDirac(keras.initializers.Initializer):
  """PyTorch's default conv init (uniform in +-1/sqrt(fan_in)) with the first min(in, out) filters set to
  the identity (a 1 at the kernel's centre on their own input channel): the net starts close to passing its
  input through, as airbench."""

  def __call__(self, shape, dtype=None):
    kh, kw, c_in, c_out = shape
    kernel = _torch_default()(shape, "float32")
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


def initialize_from_data(model: keras.Model, load_images) -> bool:
  """Sets the data-dependent layers (PatchWhitening's kernel) from the images `load_images()` returns,
  called only if there is such a layer; returns whether there was."""
  return set_from_data(compute_from_data(model, load_images))


def compute_from_data(model: keras.Model, load_images) -> list:
  """What `initialize_from_data` sets, computed: [(layer, kernel)]; writes no variable, so it may run in
  another thread while the main one traces the train step."""
  layers = [layer for layer in model.layers if hasattr(layer, "kernel_from_data")]
  images = load_images() if layers else None
  return [(layer, layer.kernel_from_data(images)) for layer in layers]


def set_from_data(computed: list) -> bool:
  """Writes what `compute_from_data` computed; returns whether there was anything."""
  for layer, kernel in computed:
    layer.kernel.assign(kernel)
  return bool(computed)


def trainable_at(model: keras.Model, epoch: int) -> list:
  """The variables to train in `epoch` (0-based): the trainable ones less those frozen by then."""
  frozen = {id(layer.bias) for layer in model.layers
            if isinstance(layer, PatchWhitening) and 0 < layer.bias_epochs <= epoch}
  return [v for v in model.trainable_variables if id(v) not in frozen]


def airbench(config, data: DataShape) -> keras.Model:
  """airbench94's net (Keller Jordan's cifar10-airbench, after Page's ResNet-9 and hlb-CIFAR10): a frozen
  patch-whitening conv, then per width a group conv -> 2x2 max-pool -> BN -> act -> conv -> BN -> act, no
  residuals, BatchNorm without a scale (its bias only), a global max-pool and a bias-free linear head
  scaled by `logit_scale`.

  Config: widths, activation, bn_momentum, sync_bn, logit_scale, whiten_size, whiten_bias_epochs,
  head_init_std (0: PyTorch's default init of the head, uniform in +-1/sqrt(fan_in)), fast_kernels.
  """
  batch_norm, activation, conv2d = _layer_classes(config)

  def bn(name):
    return batch_norm(momentum=config.bn_momentum, epsilon=1e-5, scale=False, synchronized=config.sync_bn,
                      name=name)

  def conv(width, name):
    return conv2d(width, 3, padding="same", use_bias=False, kernel_initializer=PartialDirac(), name=name)

  inputs = keras.Input(data.image_shape, name="images")
  # In bf16 the faintest whitened channels carry 10-19% rounding noise (large filters summing nearly
  # cancelling terms), but float32 here cost ~10% of the step on this CPU and gained nothing measurable
  # (BUILD.md), so the layer follows the model's precision.
  x = PatchWhitening(config.whiten_size, epsilon=config.whiten_epsilon, bias_epochs=config.whiten_bias_epochs,
                     name="whiten")(inputs)
  x = activation(config.activation, name="whiten_act")(x)
  for g, width in enumerate(config.widths):
    x = conv(width, f"group{g}_conv0")(x)
    x = keras.layers.MaxPooling2D(2, name=f"group{g}_pool")(x)
    x = activation(config.activation, name=f"group{g}_act0")(bn(f"group{g}_bn0")(x))
    x = conv(width, f"group{g}_conv1")(x)
    x = activation(config.activation, name=f"group{g}_act1")(bn(f"group{g}_bn1")(x))
  x = keras.layers.GlobalMaxPooling2D(name="pool")(x)
  head_init = (keras.initializers.RandomUniform(-config.head_init_std * 3 ** 0.5, config.head_init_std * 3 ** 0.5)
               if config.head_init_std else _torch_default())
  x = keras.layers.Dense(data.num_classes, use_bias=False, dtype="float32", name="logits",
                         kernel_initializer=head_init)(x)
  x = keras.layers.Rescaling(config.logit_scale, dtype="float32", name="logit_scale")(x)
  return keras.Model(inputs, x, name="airbench")


BUILDERS = {"resnet": resnet, "airbench": airbench, "plain_cnn": plain_cnn, "mlp": mlp}


def build(config, data: DataShape | None = None) -> keras.Model:
  """Builds `config.name` from BUILDERS for `data`: the run's, as its manifest says (CIFAR-10's when not
  given: config checks, tests)."""
  if config.name not in BUILDERS:
    raise ValueError(f"model.name={config.name!r} is not one of: {', '.join(sorted(BUILDERS))}")
  return BUILDERS[config.name](config, data or CIFAR10)
