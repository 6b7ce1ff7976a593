"""Seed model: TensorFlow's CNN tutorial: conv32-pool-conv64-pool-conv64 (valid padding), dense 64, Adam,
10 epochs, batch 32, pixels / 255, no augmentation (122,570 parameters).

One change to the tutorial's recipe: its constant learning rate decays to 0 on a cosine over the 10
epochs. With the constant rate the net starts to overfit after ~5 epochs and the last epoch's weights
are noisy: 0.6711 on our validation split (2 runs), the tutorial's own code 0.6431; decayed: 0.6968.

  python -m trainer.main --config=configs/simple_cnn.py --workdir=/tmp/simple_cnn --config.data_dir=/tmp/c10

Its tutorial reports 70.3% test accuracy. Measured here: BUILD.md's Results table.
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
  config.optimizer.schedule = "cosine"  # the tutorial: "constant"
  return default.variant(config, arg)
