"""deep.py: airbench94_muon's recipe in TF/Keras 3 under MirroredStrategy (our code, their ideas).

  python -m trainer.main --config=configs/deep.py --workdir=/tmp/deep --config.data_dir=/tmp/c10
  python -m trainer.main --config=configs/deep.py:sgd ...     # airbench94's Nesterov SGD recipe instead
  python -m trainer.main --config=configs/deep.py:airbench94 ...   # the Muon recipe at airbench94's widths
  python -m trainer.main --config=configs/deep.py:fast ...    # 0.91 at half the compute: airbench94's widths,
                                                              # 12 epochs, a 3-pixel translate, 10 test views
  python -m trainer.main --config=configs/deep.py:smoke ...   # seconds on a CPU (also sgd,smoke)

A frozen 2x2 patch-whitening conv initialised from the training data, three conv-pool-BN-GELU groups
(128/384/384, airbench95's widths; 64/256/256 with `:sgd`) without residuals, BatchNorm biases only; Muon
(orthogonalised Nesterov momentum) for the conv kernels and Nesterov SGD for the BatchNorm biases, the
whitening bias and the head, batch 2000, rates decaying linearly to 0; label smoothing 0.2, alternating flip
+ 2-pixel translate, flip+translate test-time views in the final evaluation and the export; trained in the
precision the hardware has fast kernels for (`mixed_precision="auto"`), exported in float32.

Its goal is 0.910 validation accuracy in 10 epochs; what it reached, in what time and on which machine:
BUILD.md's Results table, and every run in docs/results.md. `:airbench94` needs 2.3x less compute.
"""

from configs import default


def get_config(arg: str | None = None):
  config = default.get_config()
  config.num_epochs = 10
  config.mixed_precision = "auto"  # bf16 on A100+/AMX/AVX512_BF16, fp16 on V100/T4, else float32 (precision.py)
  config.label_smoothing = 0.2
  config.tta = "flip_translate"
  config.model.name = "airbench"
  config.model.activation = "gelu"
  config.model.bn_momentum = 0.6
  config.model.whiten_bias_epochs = 3
  config.augment.crop_padding = 2  # translate by up to 2 pixels
  config.augment.flip = "alternating"  # each image flipped every other epoch
  variants = arg.split(",") if arg else []
  if "64px" in variants:
    config, variants = for_64px(config), [v for v in variants if v != "64px"]
  if variants[:1] == ["sgd"]:
    config, variants = sgd(config), variants[1:]
  else:
    config = muon(config)
    if variants[:1] == ["airbench94"]:
      config, variants = airbench94_widths(config), variants[1:]
    elif variants[:1] == ["fast"]:
      config, variants = fast(config), variants[1:]
  return default.variant(config, ",".join(variants) or None, others=("sgd", "airbench94", "fast", "64px"))


def for_64px(config):
  """For 64x64 images (`--config=configs/deep.py:64px`, combines with the others, e.g. `:64px,smoke`): the
  model and head follow the data's manifest; the translation scales with the side (2 pixels at 32, 4 at
  64). Four times the compute per image of 32x32; not measured for accuracy here."""
  config.augment.crop_padding = 4
  return config


def muon(config):
  """airbench94_muon's optimisation: Muon for the conv kernels, SGD for BatchNorm biases, the whitening bias
  and the head; batch 2000, a linear decay to 0. At airbench94's widths (64/256/256) it beat the SGD recipe
  here (docs/results.md, 2026-11-23); airbench95's widths (128/384/384) cost 2.3x the compute per
  image, which the fused BatchNorm and XLA GELU (trainer/layers.py) bought back, and scored better
  (docs/results.md, 2026-12-01).

  Its hyperparameters are per summed loss with coupled weight decay; on our mean loss at batch 2000 the
  biases' lr 0.053 is 106 and the head's 0.67 is 12.64x that; its decay of 0.004 per step, amplified
  1 / (1 - 0.85) by momentum, is 0.0267 per step at the peak, i.e. decoupled weight_decay = 0.0267 / 106.
  The patch-whitening bias trains at the SGD recipe's 1.5, not airbench's 106: at that rate with the
  whitening conv in bf16 the validation accuracy sat near chance until the learning rate decayed
  (docs/results.md).
  """
  config.global_batch_size = 2000
  config.steps_per_loop = 22  # one epoch of 45k images per call
  config.model.widths = (128, 384, 384)
  config.model.logit_scale = 1 / 384  # airbench94_muon divides the logits by the last group's width
  config.model.head_init_std = 1.0
  config.optimizer.update(name="muon", learning_rate=106.0, momentum=0.85, nesterov=True,
                          weight_decay=0.0267 / 106, bn_bias_lr_scale=1.0, head_lr_scale=0.67 / 0.053,
                          whiten_bias_lr_scale=1.5 / 106,
                          muon_learning_rate=0.24, muon_momentum=0.6, schedule="triangular", warmup_epochs=0.0,
                          triangular_start=1.0, triangular_end=0.0, lookahead_every=0)
  return config


def airbench94_widths(config):
  """The Muon recipe at airbench94's widths 64/256/256 (`--config=configs/deep.py:airbench94`): 2.3x less
  compute per image, for machines where the default's 10 epochs take too long (a CPU without AMX); its
  accuracy: BUILD.md's Results."""
  config.model.widths = (64, 256, 256)
  config.model.logit_scale = 1 / 256
  return config


def fast(config):
  """The Muon recipe at airbench94's widths for 12 epochs, translating by up to 3 pixels, scored over 10
  test-time views (`--config=configs/deep.py:fast`): 0.366 PFLOP of training (tools.benchmark_step's
  count), 0.47 of the default's, for 0.909-0.910 (BUILD.md's Results). Its export serves the 10 views too:
  10 times one image's compute per request, as against 6 for the default's."""
  config = airbench94_widths(config)
  config.num_epochs = 12
  # 3 pixels at 32x32 (6 at 64): 12 epochs overfit at airbench's 2 (docs/results.md, 2026-12-07)
  config.augment.crop_padding = config.augment.crop_padding * 3 // 2
  config.tta = "flip_translate4"
  return config


def sgd(config):
  """airbench94's optimisation (`--config=configs/deep.py:sgd`): Nesterov SGD with decoupled weight decay
  on a triangular schedule, BatchNorm biases 64x faster, lookahead averaging; batch 1024, widths 64/256/256.

  airbench94's hyperparameters are per 1024 images with a summed loss and coupled weight decay: lr
  11.5 / (1 + 1 / (1 - momentum)) per 1024 = 1.5 on our mean loss at batch 1024; its decay of
  0.0153 / 7.67 per step, amplified 1 / (1 - momentum) by momentum, is 0.0133 per step at the peak,
  i.e. decoupled weight_decay = 0.0133 / 1.5.
  """
  config.global_batch_size = 1024
  config.steps_per_loop = 43  # one epoch of 45k images per call
  config.model.widths = (64, 256, 256)
  config.model.logit_scale = 1 / 9  # softer initial predictions
  config.optimizer.update(name="sgd", learning_rate=1.5, momentum=0.85, nesterov=True,
                          weight_decay=0.0133 / 1.5, bn_bias_lr_scale=64.0, schedule="triangular",
                          warmup_epochs=2.3,  # the peak, at 23% of the run
                          triangular_start=0.2, triangular_end=0.07, lookahead_every=5)
  return config
