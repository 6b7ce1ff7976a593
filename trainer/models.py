"""Keras 3 models. Each builder takes the `model` ConfigDict and returns a `keras.Model` mapping normalised
float images [N, 32, 32, 3] to float32 logits [N, 10].

Under a mixed-precision policy layers compute in bf16/fp16; the logits layer stays float32, and Keras's
BatchNormalization computes its statistics in float32.
"""

import keras

from pipeline import cifar10


def _conv_bn(x, width: int, config, name: str):
  x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"{name}_conv")(x)
  x = keras.layers.BatchNormalization(momentum=config.bn_momentum, epsilon=1e-5,
                                      synchronized=config.sync_bn, name=f"{name}_bn")(x)
  return keras.layers.Activation(config.activation, name=f"{name}_act")(x)


def resnet(config) -> keras.Model:
  """A deep residual CNN in the shape of Page's ResNet-9 / airbench: a stem, then per stage a conv and a
  2x2 max-pool followed by `blocks_per_stage` residual blocks of two convs, then global max-pool.

  Config: widths (channels per stage), stem_width, blocks_per_stage, activation, bn_momentum, sync_bn,
  logit_scale (logits are multiplied by it; < 1 softens the initial predictions).
  """
  inputs = keras.Input(cifar10.IMAGE_SHAPE, name="images")
  x = _conv_bn(inputs, config.stem_width, config, "stem")
  for s, width in enumerate(config.widths):
    x = keras.layers.Conv2D(width, 3, padding="same", use_bias=False, name=f"stage{s}_conv")(x)
    x = keras.layers.MaxPooling2D(2, name=f"stage{s}_pool")(x)
    x = keras.layers.BatchNormalization(momentum=config.bn_momentum, epsilon=1e-5,
                                        synchronized=config.sync_bn, name=f"stage{s}_bn")(x)
    x = keras.layers.Activation(config.activation, name=f"stage{s}_act")(x)
    for b in range(config.blocks_per_stage):
      shortcut = x
      x = _conv_bn(x, width, config, f"stage{s}_block{b}a")
      x = _conv_bn(x, width, config, f"stage{s}_block{b}b")
      x = keras.layers.Add(name=f"stage{s}_block{b}_add")([shortcut, x])
  x = keras.layers.GlobalMaxPooling2D(name="pool")(x)
  x = keras.layers.Dense(cifar10.NUM_CLASSES, use_bias=False, dtype="float32", name="logits")(x)
  if config.logit_scale != 1.0:
    x = keras.layers.Rescaling(config.logit_scale, dtype="float32", name="logit_scale")(x)
  return keras.Model(inputs, x, name="resnet")


def _per_block(values, blocks: int) -> tuple:
  """One value per block: a single value applies to all."""
  values = tuple(values)
  return values * blocks if len(values) == 1 else values


def plain_cnn(config) -> keras.Model:
  """The tutorial CNNs: blocks of `convs_per_block` convs (with bias), each optionally followed by
  BatchNorm (`norm="post"`: conv -> activation -> BN), then a 2x2 max-pool and dropout; then dense layers.

  Config: widths, convs_per_block, padding, activation, norm (none | post), block_dropout (one value or one
  per block), pool_after_last, dense (widths of the hidden dense layers), dense_dropout, l2 (weight penalty
  on conv and dense kernels), initializer.
  """
  regularizer = keras.regularizers.L2(config.l2) if config.l2 else None
  dropout = _per_block(config.block_dropout, len(config.widths))
  inputs = keras.Input(cifar10.IMAGE_SHAPE, name="images")
  x = inputs
  for b, width in enumerate(config.widths):
    for c in range(config.convs_per_block):
      x = keras.layers.Conv2D(width, 3, padding=config.padding, activation=config.activation,
                              kernel_initializer=config.initializer, kernel_regularizer=regularizer,
                              name=f"block{b}_conv{c}")(x)
      if config.norm == "post":
        x = keras.layers.BatchNormalization(momentum=config.bn_momentum, synchronized=config.sync_bn,
                                            name=f"block{b}_bn{c}")(x)
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
  x = keras.layers.Dense(cifar10.NUM_CLASSES, dtype="float32", kernel_regularizer=regularizer, name="logits")(x)
  return keras.Model(inputs, x, name="plain_cnn")


def mlp(config) -> keras.Model:
  """A multi-layer perceptron on the flattened pixels. Config: dense (hidden widths), activation."""
  inputs = keras.Input(cifar10.IMAGE_SHAPE, name="images")
  x = keras.layers.Flatten(name="flatten")(inputs)
  for d, width in enumerate(config.dense):
    x = keras.layers.Dense(width, activation=config.activation, name=f"dense{d}")(x)
  x = keras.layers.Dense(cifar10.NUM_CLASSES, dtype="float32", name="logits")(x)
  return keras.Model(inputs, x, name="mlp")


BUILDERS = {"resnet": resnet, "plain_cnn": plain_cnn, "mlp": mlp}


def build(config) -> keras.Model:
  """Builds `config.name` from BUILDERS."""
  if config.name not in BUILDERS:
    raise ValueError(f"model.name={config.name!r} is not one of: {', '.join(sorted(BUILDERS))}")
  return BUILDERS[config.name](config)
