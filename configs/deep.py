"""A deep residual CNN for CIFAR-10, in the shape of airbench94 / Page's ResNet-9.

  python -m trainer.main --config=configs/deep.py --workdir=/tmp/deep --config.data_dir=/tmp/c10
  python -m trainer.main --config=configs/deep.py:smoke ...   # seconds on a CPU

Hardware and results: see BUILD.md (measured first numbers; issue "Part 3" tunes this recipe).
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config()
  config.num_epochs = 10
  config.global_batch_size = 512
  config.mixed_precision = "mixed_bfloat16"  # pays on AVX512-BF16 CPUs and A100/H100 GPUs
  config.label_smoothing = 0.2
  config.model.stem_width = 32
  config.model.widths = (64, 128, 256)
  config.model.activation = "gelu"
  config.model.logit_scale = 1 / 9  # softer initial predictions, as airbench
  config.optimizer.learning_rate = 0.4
  config.optimizer.warmup_epochs = 0.5
  config.augment.crop_padding = 2  # airbench94: translate by 2 for ~10-epoch runs
  config.augment.flip = "alternating"  # airbench94: each image flipped every other epoch
  return default.variant(config, arg)
