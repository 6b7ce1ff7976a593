"""What the trainer refuses in a config before anything starts: each value of the wrong type or out of range,
or ruled out by the hardware or by another value, in one line naming the key."""

from pipeline import augment
from pipeline import manifest as manifest_lib
from trainer import data
from trainer import export as export_lib
from trainer import models
from trainer import optim
from trainer import precision
from trainer import views
from trainer.faults import TrainingError

PRECISIONS = precision.CHOICES  # "auto" is resolved before the checks (train_and_evaluate)
POSITIVE = ("global_batch_size", "eval_batch_size", "num_epochs", "keep_checkpoints")
EXIT_CODES = ("stop_exit_code",)  # 0-255
NOT_NEGATIVE = ("steps_per_epoch", "eval_steps", "steps_per_loop", "log_every_steps", "checkpoint_every_steps",
                "eval_every_epochs", "bn_statistics_images", "summary_worst_images", "export_versions")


def check_config(config, replicas: int) -> None:
  """Refuses values out of range, or that the hardware or each other rule out, naming the key."""
  for key in POSITIVE + NOT_NEGATIVE:
    if isinstance(config[key], bool) or not isinstance(config[key], int) or config[key] < (1 if key in POSITIVE else 0):
      raise TrainingError(f"{key}={config[key]!r} must be an integer >= {1 if key in POSITIVE else 0}")
  for key in EXIT_CODES:
    if isinstance(config[key], bool) or not isinstance(config[key], int) or not 0 <= config[key] <= 255:
      raise TrainingError(f"{key}={config[key]!r} must be an exit code, 0 to 255")
  if config.mixed_precision not in PRECISIONS:
    raise TrainingError(f"mixed_precision={config.mixed_precision!r} is not one of: {', '.join(PRECISIONS)}")
  if config.export_precision not in export_lib.PRECISIONS:
    raise TrainingError(f"export_precision={config.export_precision!r} is not one of: "
                        f"{', '.join(export_lib.PRECISIONS)}")
  if config.tta not in views.VIEWS:
    raise TrainingError(f"tta={config.tta!r} is not one of: {', '.join(views.VIEWS)}")
  if config.global_batch_size % replicas:  # the evaluation batch fits itself (data.eval_dataset)
    raise TrainingError(f"global_batch_size={config.global_batch_size} does not divide by the {replicas} replicas; "
                        f"use a multiple of {replicas}")
  profile = tuple(config.profile_steps)
  if profile and not (len(profile) == 2 and all(isinstance(s, int) for s in profile) and 0 <= profile[0] < profile[1]):
    raise TrainingError(f"profile_steps={profile}: give (first, end) train steps with 0 <= first < end, "
                        "e.g. --config.profile_steps='(10, 15)', or () for no trace")
  if config.jit_compile and config.model.get("sync_bn"):
    raise TrainingError("jit_compile=True cannot compile model.sync_bn's cross-replica all-reduce inside "
                        "the replica's step; set --config.model.sync_bn=False or --config.jit_compile=False")
  _check_choices(config)


def check_config_and_data(config, replicas: int, verify: bool = False) -> tuple[dict, int]:
  """check_config, then the data it names: returns the manifest of `config.data_dir` and the steps per epoch
  it gives; `verify` re-hashes every shard against the manifest first (the trainer's
  `input.verify_checksums`)."""
  check_config(config, replicas)
  manifest = manifest_lib.load(config.data_dir)
  if verify:
    manifest_lib.verify_checksums(config.data_dir, manifest, manifest["splits"])
  return manifest, data.steps_per_epoch_for(config, manifest)


def _check_choices(config) -> None:
  """The names the model, optimizer, schedule, input and augmentation are built from; each builder raises the
  same, but only once the run has its lease and its dataset."""
  for key, choices in (("model.name", sorted(models.BUILDERS)), ("optimizer.name", optim.OPTIMIZERS),
                       ("optimizer.schedule", optim.SCHEDULES),
                       ("input.normalization", ("dataset", *data.NORMALIZATIONS)),
                       ("input.augment_on", ("host", "device"))):
    section, name = key.split(".")
    if config[section][name] not in choices:
      raise TrainingError(f"{key}={config[section][name]!r} is not one of: {', '.join(choices)}")
  try:
    augment.check(config.augment)
  except ValueError as e:
    raise TrainingError(str(e)) from None
