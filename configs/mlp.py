"""Seed model: a dense 1024-512-256-128-64-10 tanh network, RMSprop, inputs scaled to [-0.5, 0.5], 15 epochs.

  python -m trainer.main --config=configs/mlp.py --workdir=/tmp/mlp --config.data_dir=/tmp/c10

Its tutorial reports 47.5% test accuracy on CIFAR-10. Measured here: BUILD.md's Results table.
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.tutorial(default.get_config())
  config.num_epochs = 15
  config.global_batch_size = 128
  config.model.name = "mlp"
  config.model.dense = (1024, 512, 256, 128, 64)
  config.model.activation = "tanh"
  config.optimizer.name = "rmsprop"
  config.optimizer.learning_rate = 1e-3  # Keras's RMSprop default
  config.input.normalization = "centered"  # pixels / 255 - 0.5
  return default.variant(config, arg)
