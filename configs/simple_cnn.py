"""Seed model: TensorFlow's CNN tutorial: conv32-pool-conv64-pool-conv64 (valid padding), dense 64, Adam,
10 epochs, batch 32, pixels / 255, no augmentation (122,570 parameters).

  python -m trainer.main --config=configs/simple_cnn.py --workdir=/tmp/simple_cnn --config.data_dir=/tmp/c10

Its tutorial reports 70.3% test accuracy. Measured here: BUILD.md's accuracy table.
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.tutorial(default.get_config())
  config.num_epochs = 10
  config.global_batch_size = 32
  config.model.name = "plain_cnn"
  config.model.widths = (32, 64, 64)
  config.model.convs_per_block = 1
  config.model.padding = "valid"
  config.model.activation = "relu"
  config.model.pool_after_last = False
  config.model.dense = (64,)
  config.optimizer.name = "adam"
  config.optimizer.learning_rate = 1e-3
  return default.variant(config, arg)
