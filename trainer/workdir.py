"""The workdir and everything the trainer keeps in it: the checks before a run starts or resumes, the
checkpoint manager, config.json and run.json (CONTRACTS.md: the layout).

  WORKDIR/checkpoints/  the chief's checkpoints        WORKDIR/config.json  the run's config
  WORKDIR/summaries/    TensorBoard events, traces     WORKDIR/run.json     status, steps, versions, metrics
  WORKDIR/export/       the SavedModel                 WORKDIR/tmp/         other workers' scratch checkpoints
"""

import datetime
import importlib.metadata
import json
import os
import platform
import subprocess

import keras
import tensorflow as tf

from pipeline import fileio
from trainer import distribute
from trainer import faults
from trainer.faults import TrainingError

FILES = ("checkpoints", "summaries", "export", "config.json", "run.json", "tmp")  # what the trainer writes
SHARED = "give every worker the same workdir, on storage all of them read (gs:// or a shared filesystem)"
# What a checkpoint holds and how its steps map to data: a resumed run must keep them. model.fast_kernels
# and model.sync_bn change how the same weights are computed, not which; num_epochs may change (the
# schedule then stretches to the new end); so may the replica count at the same global batch.
RESUME_KEYS = ("global_batch_size", "mixed_precision", "model.", "optimizer.name", "optimizer.ema_decay",
               "optimizer.lookahead_every")
RESUME_FREE = ("model.fast_kernels", "model.sync_bn")


def now() -> str:
  return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


def flat_config(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
  """[(dotted key, value)] of a nested config dict."""
  rows = []
  for key, value in tree.items():
    if isinstance(value, dict):
      rows += flat_config(value, f"{prefix}{key}.")
    else:
      rows.append((f"{prefix}{key}", value))
  return rows


def check(workdir: str) -> None:
  """Refuses a workdir that cannot be written, is a file, or is a non-empty directory holding other files
  than a run's (FILES) unless it has a run's run.json: then the others (a tool's report) are left alone."""
  if not workdir:
    raise TrainingError("--workdir is empty: give the directory the run's checkpoints, summaries and export go to")
  try:
    fileio.check_bucket(workdir)
  except fileio.StorageError as e:
    raise TrainingError(f"workdir {e}") from None
  if tf.io.gfile.isdir(workdir):
    names = sorted(n.rstrip("/") for n in tf.io.gfile.listdir(workdir) if not n.startswith(".tmp-"))
    if set(names) - set(FILES) and not _has_run_json(workdir):
      raise TrainingError(f"workdir {workdir} is not empty and is not a run of this trainer "
                          f"(it holds {', '.join(names[:3])}{', ...' if len(names) > 3 else ''}); "
                          "give an empty or new directory")
  elif tf.io.gfile.exists(workdir) and not tf.io.gfile.isdir(workdir):  # another worker may create it meanwhile
    raise TrainingError(f"workdir {workdir} is a file, not a directory")
  try:
    tf.io.gfile.makedirs(workdir)
    probe = fileio.temp_name(os.path.join(workdir, "probe"))
    fileio.atomic_write(probe, "")
    tf.io.gfile.remove(probe)
  except (tf.errors.OpError, OSError) as e:
    raise TrainingError(f"workdir {workdir} is not writable ({getattr(e, 'message', e)})") from None


def _has_run_json(workdir: str) -> bool:
  """Whether `workdir` holds a run.json this trainer wrote (a config.json alone could be anyone's)."""
  try:
    run = _read_json(workdir, "run.json")
  except (ValueError, OSError, tf.errors.OpError):
    return False
  return isinstance(run, dict) and {"status", "total_steps", "versions"} <= set(run)


def latest_checkpoint(workdir: str) -> str | None:
  """The chief's latest checkpoint, which every worker restores: a non-chief's own (tmp/, written only
  because saving is collective) may be missing or one save behind."""
  return tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))


def _read_json(workdir: str, name: str) -> dict:
  path = os.path.join(workdir, name)
  return fileio.read_json(path) if tf.io.gfile.exists(path) else {}


def check_resumable(config, workdir: str, steps_per_epoch: int, workers: int) -> None:
  """Refuses to resume a workdir whose run (its config.json and run.json) differs in a RESUME_KEYS value,
  in the steps per epoch resolved from the data, or (streaming input, whose shares depend on it) in the
  number of workers; names the key, both values and the workdir. Reads only."""
  before = {k: v for k, v in flat_config(_read_json(workdir, "config.json"))
            if k.startswith(RESUME_KEYS) and k not in RESUME_FREE}
  now_ = dict(flat_config(json.loads(config.to_json_best_effort())))
  run = _read_json(workdir, "run.json")
  if "steps_per_epoch" in run:
    before["steps per epoch"], now_["steps per epoch"] = run["steps_per_epoch"], steps_per_epoch
  if not config.input.cache_in_memory and "workers" in run.get("distribution", {}):
    before["workers"], now_["workers"] = run["distribution"]["workers"], workers
  for key in sorted(k for k in before if k in now_):  # keys since renamed or removed do not count
    if before[key] != now_[key]:
      raise TrainingError(f"workdir {workdir} holds a run with {key}={before[key]!r}; this command has "
                          f"{key}={now_[key]!r}: resume with the same value, or give a new workdir")


def check_same_checkpoint(strategy, latest: str | None) -> None:
  """Refuses to start unless every worker found the same latest checkpoint (a collective)."""
  step = -1 if latest is None else int(latest.rsplit("-", 1)[1])
  if not distribute.same_on_every_worker(strategy, step):
    raise TrainingError(f"the workers see different latest checkpoints (this one: {latest or 'none'}); {SHARED}")


def check_shared(strategy, workdir: str) -> None:
  """Refuses to train unless every worker sees the config.json the chief has just written (two
  collectives: a barrier, then the vote), so that a later resume can restore the chief's checkpoints."""
  distribute.any_worker(strategy, False)
  path = os.path.join(workdir, "config.json")
  seen = tf.io.gfile.exists(path)
  if distribute.any_worker(strategy, not seen):
    raise TrainingError(f"{'this worker' if not seen else 'another worker'} cannot see {path}, which the chief "
                        f"wrote; {SHARED}")


def restore(checkpoint: tf.train.Checkpoint, path: str) -> None:
  """Restores `checkpoint` from `path`, or says in one line that it was written for another model."""
  try:
    checkpoint.restore(path).assert_existing_objects_matched()
  except (AssertionError, ValueError, tf.errors.OpError) as e:
    detail = faults.first_line(str(getattr(e, "message", e)))[:160]
    raise TrainingError(f"checkpoint {path} does not fit this config's model and optimizer ({detail}); "
                        "resume with the config it was written with, or give a new workdir") from None


class Checkpoints:
  """The run's checkpoint manager. Non-chief workers of a multi-worker run must take part in every save
  too (variables are read collectively), so they write to a scratch directory of their own."""

  def __init__(self, strategy, checkpoint: tf.train.Checkpoint, step: tf.Variable, workdir: str, keep: int,
               saved_step: int):
    directory = os.path.join(workdir, "checkpoints")
    if not distribute.is_chief(strategy):
      directory = os.path.join(workdir, "tmp", f"checkpoints-{distribute.worker_id(strategy)}")
    self.manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=keep, step_counter=step)
    self.saved_step = saved_step  # the last step this run saved or restored (-1: none), alike on every worker

  def save(self, step: int) -> str:
    """Checkpoints `step` unless this run already has it; every worker decides alike. Returns the path."""
    if self.saved_step != step:
      self.manager.save(checkpoint_number=step)
      self.saved_step = step
    return self.manager.latest_checkpoint

  @property
  def latest(self) -> str | None:
    return self.manager.latest_checkpoint


def write_config(workdir: str, config) -> None:
  fileio.atomic_write(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2) + "\n")


def write_run(workdir: str, **fields) -> None:
  """run.json: `fields` (status, steps, distribution, metrics...) with the versions, commit and host."""
  fileio.write_json(os.path.join(workdir, "run.json"), {
      **fields, "ended": now(),
      "versions": {"project": _project_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
                   "python": platform.python_version()},
      "git_commit": _git_commit(), "host": platform.node()})


def _git_commit() -> str | None:
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                         capture_output=True, text=True, timeout=10, check=True)
    return out.stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None


def _project_version() -> str:
  try:
    return importlib.metadata.version("cifar10-tf-pipeline")
  except importlib.metadata.PackageNotFoundError:  # run from a checkout without installing
    return "unknown"
