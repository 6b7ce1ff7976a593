"""Keras 3 models. Each builder takes the `model` ConfigDict and the data's shape and returns a
`keras.Model` mapping normalised float images [N, H, W, C] to float32 logits [N, K].

Under a mixed-precision policy layers compute in bf16/fp16; the logits layer stays float32, and BatchNorm
computes its statistics in float32. The layers themselves (faster kernels, airbench's whitening): layers.py.
"""

import dataclasses

import keras

from pipeline import cifar10
from trainer import layers


def _layer_classes(config) -> tuple[type, type, type, type]:
  """The BatchNorm, Activation, Conv2D and MaxPooling2D layers `config.fast_kernels` picks: ours
  (trainer/layers.py), or Keras's own."""
  if config.fast_kernels:
    return layers.BatchNorm, layers.Activation, layers.Conv2D, layers.MaxPool2D
  return keras.layers.BatchNormalization, keras.layers.Activation, keras.layers.Conv2D, keras.layers.MaxPooling2D


def _conv_bn(x, width: int, config, name: str):
  batch_norm, activation, conv2d, _ = _layer_classes(config)
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
  batch_norm, activation, conv2d, max_pool = _layer_classes(config)
  inputs = keras.Input(data.image_shape, name="images")
  x = _conv_bn(inputs, config.stem_width, config, "stem")
  for s, width in enumerate(config.widths):
    x = conv2d(width, 3, padding="same", use_bias=False, name=f"stage{s}_conv")(x)
    x = max_pool(2, name=f"stage{s}_pool")(x)
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
  batch_norm, _, _, max_pool = _layer_classes(config)
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
      x = max_pool(2, name=f"block{b}_pool")(x)
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
            if isinstance(layer, layers.PatchWhitening) and 0 < layer.bias_epochs <= epoch}
  return [v for v in model.trainable_variables if id(v) not in frozen]


def airbench(config, data: DataShape) -> keras.Model:
  """airbench94's net (Keller Jordan's cifar10-airbench, after Page's ResNet-9 and hlb-CIFAR10): a frozen
  patch-whitening conv, then per width a group conv -> 2x2 max-pool -> BN -> act -> conv -> BN -> act, no
  residuals, BatchNorm without a scale (its bias only), a global max-pool and a bias-free linear head
  scaled by `logit_scale`. With `group_convs=3`, airbench96's groups: conv -> pool -> BN -> act, then two
  convs whose sum with that is activated (conv -> BN -> act -> conv -> BN, + the shortcut, -> act);
  `last_group_convs` (0: as the others) sets the last group's alone, where a third conv is cheapest.

  Config: widths, group_convs (2 | 3), last_group_convs (0 | 2 | 3), activation, bn_momentum, sync_bn,
  logit_scale, whiten_size, whiten_bias_epochs, head_init_std (0: PyTorch's default init of the head,
  uniform in +-1/sqrt(fan_in)), fast_kernels.
  """
  if config.group_convs not in (2, 3):
    raise ValueError(f"model.group_convs={config.group_convs!r} is not one of: 2, 3")
  if config.last_group_convs not in (0, 2, 3):
    raise ValueError(f"model.last_group_convs={config.last_group_convs!r} is not one of: 0, 2, 3")
  batch_norm, activation, conv2d, max_pool = _layer_classes(config)

  def bn(name):
    return batch_norm(momentum=config.bn_momentum, epsilon=1e-5, scale=False, synchronized=config.sync_bn,
                      name=name)

  def conv(width, name):
    return conv2d(width, 3, padding="same", use_bias=False, kernel_initializer=layers.PartialDirac(), name=name)

  inputs = keras.Input(data.image_shape, name="images")
  # In bf16 the faintest whitened channels carry 10-19% rounding noise (large filters summing nearly
  # cancelling terms), but float32 here cost ~10% of the step on this CPU and gained nothing measurable
  # (docs/results.md), so the layer follows the model's precision.
  x = layers.PatchWhitening(config.whiten_size, epsilon=config.whiten_epsilon, bias_epochs=config.whiten_bias_epochs,
                     name="whiten")(inputs)
  x = activation(config.activation, name="whiten_act")(x)
  for g, width in enumerate(config.widths):
    convs = (config.last_group_convs or config.group_convs) if g == len(config.widths) - 1 else config.group_convs
    x = conv(width, f"group{g}_conv0")(x)
    x = max_pool(2, name=f"group{g}_pool")(x)
    x = activation(config.activation, name=f"group{g}_act0")(bn(f"group{g}_bn0")(x))
    shortcut = x
    x = conv(width, f"group{g}_conv1")(x)
    x = bn(f"group{g}_bn1")(x)
    if convs == 3:
      x = activation(config.activation, name=f"group{g}_act1")(x)
      x = bn(f"group{g}_bn2")(conv(width, f"group{g}_conv2")(x))
      x = keras.layers.Add(name=f"group{g}_add")([shortcut, x])
    x = activation(config.activation, name=f"group{g}_act{convs - 1}")(x)
  x = keras.layers.GlobalMaxPooling2D(name="pool")(x)
  head_init = (keras.initializers.RandomUniform(-config.head_init_std * 3 ** 0.5, config.head_init_std * 3 ** 0.5)
               if config.head_init_std else layers.torch_default())
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
