"""The workdir and everything the trainer keeps in it: the checks before a run starts or resumes, the
checkpoint manager, config.json and run.json (docs/interfaces.md: the layout).

  WORKDIR/checkpoints/  the chief's checkpoints        WORKDIR/config.json  the run's config
  WORKDIR/summaries/    TensorBoard events, traces     WORKDIR/run.json     status, steps, versions, metrics
  WORKDIR/export/       the SavedModel                 WORKDIR/tmp/         other workers' scratch checkpoints
  WORKDIR/serving/N/    the last exports, numbered by step, for TF Serving (trainer/export.py)
  WORKDIR/lease.json    who runs in it now (trainer/lease.py)  WORKDIR/lease.lock  its lock (not on gs://)
"""

import datetime
import errno
import json
import os
import platform
import re
import shutil
import subprocess

from absl import logging
import keras
import tensorflow as tf

import pipeline
from pipeline import fileio
from pipeline import manifest as manifest_lib
from trainer import distribute
from trainer import faults
from trainer import lease as lease_lib
from trainer.faults import TrainingError

FILES = ("checkpoints", "summaries", "export", "serving", "config.json", "run.json", "tmp", lease_lib.FILENAME,
         lease_lib.LOCK)  # what the trainer writes
SHARED = "give every worker the same workdir, on storage all of them read (gs:// or a shared filesystem)"
# What a resumed run may change (BUILD.md, "Preemption, crashes and resuming"): when it logs, evaluates, checkpoints and writes,
# what it does at the end, how the same steps are computed (kernels, XLA, op determinism, where augmentation
# runs, how replicas are laid out at the same global batch) and where the same data lives (its identity,
# not its path, is compared). num_epochs may change: the schedule then stretches to the new end. Any other
# difference from the run's config.json is refused: it would change the weights' meaning or the batches.
RESUME_MAY_CHANGE = (
    "num_epochs", "steps_per_loop", "log_every_steps", "eval_every_epochs", "checkpoint_every_steps",
    "summary_flush_secs", "summary_worst_images", "profile_steps", "progress_bar", "keep_checkpoints", "export",
    "stop_exit_code", "export_precision", "export_versions",
    "tta", "eval_batch_size", "eval_steps", "bn_statistics_images", "data_dir", "deterministic", "jit_compile",
    "logical_cpus", "strategy", "cluster", "cluster_port", "cluster_wait_secs", "allow_cpu", "lease_secs",
    "model.fast_kernels", "model.sync_bn",
    "input.verify_checksums", "input.probe_batches", "input.data_service", "input.augment_on")
# Keys added since runs were first written, with the value that reproduces what a run from before did: a
# config.json without one is compared as if it held that value, so a resume cannot turn it on unnoticed.
ADDED_SINCE = {"augment.cutout_inside": False, "augment.cutout_fill": "black", "augment.brightness": 0.0,
               "augment.contrast": 0.0, "model.last_group_convs": 0}
# What the workers of one run may differ in: where each finds the data (its identity is compared), and
# what only the chief does or each shows on its own. All else sets the schedule of collectives or the
# batches, so it must be alike on every worker.
WORKERS_MAY_DIFFER = ("data_dir", "progress_bar", "summary_flush_secs", "keep_checkpoints", "export", "allow_cpu",
                      "cluster_wait_secs", "lease_secs", "export_versions", "stop_exit_code",
                      "input.verify_checksums", "input.probe_batches")

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
  """Refuses a workdir that is a file, or a non-empty directory holding other files than a run's (FILES)
  unless it has a run's run.json: then the others (a tool's report) are left alone. Reads only."""
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


def make_writable(workdir: str) -> None:
  """Creates `workdir` if need be and proves it can be written (a probe file, removed); after the read-only
  checks, so that a refused start leaves a workdir as it was."""
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
  """The chief's newest checkpoint that reads back whole, which every worker restores (a non-chief's own,
  in tmp/, written only because saving is collective, may be missing or one save behind). Newer damaged
  ones (a truncated or corrupted file after a full disk, a half-finished copy) are named in a warning and
  passed over; when every checkpoint there is damaged, refuses in one line rather than start from step 0."""
  directory = os.path.join(workdir, "checkpoints")
  found = tf.io.gfile.glob(os.path.join(directory, "ckpt-*.index"))
  paths = sorted((p[:-len(".index")] for p in found if re.fullmatch(r"ckpt-\d+", os.path.basename(p)[:-6])),
                 key=checkpoint_step, reverse=True)
  damaged = []
  for path in paths:
    problem = _damage(path)
    if problem is None:
      if damaged:
        logging.warning("passed over damaged checkpoint(s) %s; resuming from %s",
                        "; ".join(f"{p} ({why})" for p, why in damaged), path)
      return path
    damaged.append((path, problem))
  if damaged:
    raise TrainingError(f"every checkpoint in {directory} is damaged (newest: {damaged[0][0]}: {damaged[0][1]}); "
                        "restore the directory from a copy, or give a new workdir to start again")
  return None


def checkpoint_step(path: str) -> int:
  return int(path.rsplit("-", 1)[1])


def _damage(path: str) -> str | None:
  """Why the checkpoint at `path` cannot be restored whole (its index or a tensor unreadable, a checksum
  that does not match), or None. Reads every tensor once: the bundle reader checks each one's CRC."""
  try:
    reader = tf.train.load_checkpoint(path)
    for name in reader.get_variable_to_shape_map():
      reader.get_tensor(name)
  except (tf.errors.UnavailableError, tf.errors.DeadlineExceededError):
    raise  # storage out of reach now: not a damaged file
  except (tf.errors.OpError, ValueError, IndexError) as e:  # IndexError: a file shorter than its index says
    return faults.first_line(str(getattr(e, "message", e)))[:200] or type(e).__name__
  return None


def started_precision(workdir: str) -> str | None:
  """The mixed_precision in `workdir`'s config.json when it has a checkpoint to resume: what a resume keeps
  (a run with no checkpoint yet starts afresh, and may choose again)."""
  try:
    if not tf.io.gfile.glob(os.path.join(workdir, "checkpoints", "ckpt-*.index")):
      return None
    return _read_json(workdir, "config.json").get("mixed_precision")
  except (tf.errors.OpError, ValueError, AttributeError):
    return None


def _read_json(workdir: str, name: str) -> dict:
  path = os.path.join(workdir, name)
  return fileio.read_json(path) if tf.io.gfile.exists(path) else {}


def comparable(config, leave_out: tuple[str, ...]) -> dict:
  """The resolved config as {dotted key: value} (JSON values), less the keys in `leave_out`."""
  return {k: v for k, v in flat_config(json.loads(config.to_json_best_effort())) if k not in leave_out}


def differences(before: dict, now_: dict) -> list[str]:
  """The keys whose values differ between two `comparable` configs, the model's first, its name leading (the
  telling ones when a whole other config file was given), then sorted; keys only one side has (renamed or
  added since) do not count."""
  keys = [k for k in before if k in now_ and before[k] != now_[k]]
  return sorted(keys, key=lambda k: (k != "model.name", not k.startswith("model."), k))


def _values(config: dict, keys: list[str]) -> str:
  return ", ".join(f"{k}={config[k]!r}" for k in keys)


def check_resumable(config, workdir: str, data: dict, steps_per_epoch: int, workers: int) -> None:
  """Refuses to resume a workdir whose run differs from this command in anything but RESUME_MAY_CHANGE (its
  config.json), in its data's identity (run.json's `data`, `manifest.identity`; for a run.json written
  before it was recorded, the steps per epoch) or, with streaming input, whose shares depend on it, in the
  number of workers; in one line naming the key, both values and the workdir. Reads only."""
  written = dict(flat_config(_read_json(workdir, "config.json")))
  if written:
    written = {**ADDED_SINCE, **written}
  before = {k: v for k, v in written.items() if k not in RESUME_MAY_CHANGE}
  keys = differences(before, comparable(config, RESUME_MAY_CHANGE))
  if keys:
    raise TrainingError(f"workdir {workdir} holds a run with {_values(before, keys)}; this command has "
                        f"{_values(comparable(config, ()), keys)}: resume with the same "
                        f"value{'s' if len(keys) > 1 else ''}, or give a new workdir")
  run = _read_json(workdir, "run.json")
  if "data" not in run and run.get("steps_per_epoch", steps_per_epoch) != steps_per_epoch:
    raise TrainingError(f"workdir {workdir} holds a run of {run['steps_per_epoch']} steps per epoch; this command "
                        f"has {steps_per_epoch} (other data, or another batch): resume with the same, or give a new "
                        "workdir")
  if "data" in run and run["data"]["digest"] != data["digest"]:
    raise TrainingError(f"workdir {workdir} holds a run trained on other data than {config.data_dir} "
                        f"({manifest_lib.describe_difference(run['data'], data)}): resume on the shards it "
                        "started with, or give a new workdir")
  if not config.input.cache_in_memory and "workers" in run.get("distribution", {}):
    if run["distribution"]["workers"] != workers:
      raise TrainingError(f"workdir {workdir} holds a run of {run['distribution']['workers']} worker(s) streaming "
                          f"its input, whose shares depend on them; this command has {workers}: resume with as "
                          "many workers, or give a new workdir")


def check_same_run(strategy, config, data: dict) -> None:
  """Refuses to start unless every worker runs the same config (less WORKERS_MAY_DIFFER) on the same data
  (a collective: each worker's view is gathered on all): every worker then refuses with the same line,
  naming the first key or the data that differs, the chief's value and the worker's."""
  mine = json.dumps({"config": comparable(config, WORKERS_MAY_DIFFER), "data": data}, sort_keys=True)
  views = [json.loads(text) for text in distribute.gather_texts(strategy, mine)]
  chief = views[0]
  for index, view in enumerate(views[1:], 1):
    key = next(iter(differences(chief["config"], view["config"])), None)
    if key:
      fix = ("mixed_precision=auto chose by each worker's hardware: give every worker the same "
             "--config.mixed_precision" if key == "mixed_precision" else "start every worker with the same command")
      raise distribute.refuse_together(strategy, TrainingError(
          f"worker {index} was started with {key}={view['config'][key]!r}, the chief with "
          f"{key}={chief['config'][key]!r}: {fix}"))
    if set(chief["config"]) != set(view["config"]):
      raise distribute.refuse_together(strategy, TrainingError(
          f"worker {index} runs another version of the trainer than the chief (their configs have other keys): "
          "install the same code on every worker"))
    if view["data"] != chief["data"]:
      raise distribute.refuse_together(strategy, TrainingError(
          f"worker {index} reads other data than the chief "
          f"({manifest_lib.describe_difference(chief['data'], view['data'])}): give every worker the same shards "
          "(one gs:// path, or identical copies)"))

def check_same_checkpoint(strategy, latest: str | None) -> None:
  """Refuses to start unless every worker found the same latest checkpoint (a collective)."""
  step = -1 if latest is None else checkpoint_step(latest)
  if not distribute.same_on_every_worker(strategy, step):
    raise distribute.refuse_together(strategy, TrainingError(
        f"the workers see different latest checkpoints (this one: {latest or 'none'}); {SHARED}"))


def check_lease(workdir: str, run_id: str) -> None:
  """Refuses a non-chief worker that does not see the lease the chief has just taken for run `run_id`
  (trainer/lease.py): another workdir, or a node-local copy, where a later resume could not restore the
  chief's checkpoints. Reads only."""
  path = os.path.join(workdir, lease_lib.FILENAME)
  try:
    seen = fileio.read_json(path).get("run_id") if tf.io.gfile.exists(path) else None
  except (ValueError, AttributeError, tf.errors.OpError):
    seen = None
  if seen != run_id:
    raise TrainingError(f"this worker does not see the lease of run {run_id} in {path} (it sees "
                        f"{'run ' + seen if seen else 'none'}), which the chief has just taken; {SHARED}")


NO_SPACE = "No space left on device"  # TensorFlow's file systems and Python's ENOSPC alike
_WRITERS = {"checkpoints": "a checkpoint", "tmp": "a checkpoint", "export": "the SavedModel",
            "serving": "the SavedModel's TF Serving copy", "summaries": "TensorBoard's events"}


def out_of_space(error: BaseException, workdir: str, needed, latest: str | None):
  """For a write to `workdir` that found its disk full: removes the temporaries the failed writes left
  (they hold space and no reader looks at them) and returns the one line to stop with, naming the file, what
  it was part of, the space it needs (`needed()`: bytes by the workdir's top-level name, asked only then)
  and the space free, and the checkpoint a resume starts from. For any other error: None."""
  if isinstance(error, tf.errors.OpError):
    message = error.message
  elif isinstance(error, OSError) and error.errno == errno.ENOSPC:
    message = f"{error.filename or workdir}; {NO_SPACE}"
  else:
    return None
  if NO_SPACE not in message:
    return None
  try:
    needed = needed()
  except Exception:  # pylint: disable=broad-except  (the sizes are a courtesy; the line is what matters)
    needed = {}
  path = faults.first_line(message).split(";")[0].strip()
  path = re.sub(r"(^|/)\.tmp-[0-9a-f]{8}-", r"\1", path)  # the final names, not the temporaries'
  path = re.sub(r"_temp/part-.*$", "", path)  # the checkpoint manager's: ckpt-N_temp/part-...
  top = os.path.relpath(path, workdir).split(os.sep)[0] if "://" not in path else ""
  top = "export" if top.endswith("-export") else top
  remove_temporaries(workdir)
  free = _free_bytes(path)
  free = f"{_size(free)} free there" if free is not None else "no more room there"
  return TrainingError(
      f"no space left on device for {path} ({_WRITERS.get(top, 'the run')}): "
      f"{'it needs about ' + _size(needed[top]) + ', ' if needed.get(top) else ''}{free}; "
      f"{'the newest checkpoint, ' + latest + ', is intact' if latest else 'no checkpoint was written'}: make room "
      "(or copy the workdir with its checkpoints to a larger disk and give that workdir), then run the same "
      "command to resume")


def remove_temporaries(workdir: str) -> None:
  """Removes what interrupted writes left in the workdir: `.tmp-*` files and directories (export, serving
  versions, JSON files) and the checkpoint manager's `*_temp` directories."""
  patterns = (".tmp-*", "serving/.tmp-*", "checkpoints/*_temp*", "tmp/*/*_temp*")
  for leftover in fileio.temporaries(workdir, patterns):
    fileio.remove_quietly(leftover)


def _free_bytes(path: str) -> int | None:
  """Bytes free on the local filesystem holding `path` (its nearest existing ancestor); None on gs://."""
  if "://" in path:
    return None
  path = os.path.abspath(path)
  while not os.path.exists(path):
    path = os.path.dirname(path)
  return shutil.disk_usage(path).free


def _size(size: int) -> str:
  return f"{size / 2**20:.1f} MB" if size >= 2**20 else f"{size / 2**10:.0f} KB"


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
               saved_step: int, restored: str | None = None, lost=None):
    directory = os.path.join(workdir, "checkpoints")
    if not distribute.is_chief(strategy):
      directory = os.path.join(workdir, "tmp", f"checkpoints-{distribute.worker_id(strategy)}")
    self.manager = tf.train.CheckpointManager(checkpoint, directory, max_to_keep=keep, step_counter=step)
    self.saved_step = saved_step  # the last step this run saved or restored (-1: none), alike on every worker
    self._restored = restored  # until this run saves: not the manager's latest, which may be a damaged one
    self._strategy = strategy
    self._lost = lost or (lambda: None)  # the lease's: why this run may no longer write, or None

  def save(self, step: int) -> str:
    """Checkpoints `step` unless this run already has it; every worker decides alike. Returns the path."""
    if self.saved_step != step:
      lost = self._lost()  # the chief's lease, voted: every worker takes part in a save, or none does
      if distribute.any_worker(self._strategy, lost is not None):
        raise distribute.refuse_together(self._strategy, TrainingError(
            lost or "the chief no longer holds the workdir's lease; its log says why"))
      self.manager.save(checkpoint_number=step)
      self.saved_step, self._restored = step, None
    return self.latest

  @property
  def latest(self) -> str | None:
    """The newest checkpoint of this run: the one it restored until it saves one of its own."""
    return self._restored or self.manager.latest_checkpoint


def write_config(workdir: str, config) -> None:
  fileio.atomic_write(os.path.join(workdir, "config.json"), config.to_json_best_effort(indent=2) + "\n")


def write_run(workdir: str, segment: dict | None = None, **fields) -> None:
  """run.json: `fields` (status, steps, distribution, metrics...) with the versions, commit and host; with
  `segment` (this start's `start_step`, `end_step`, `replicas`, `workers`), `segments`: every start's of the
  run, the earlier ones from the run.json this write replaces."""
  if segment is not None:
    # Only the starts before the step this one resumed from, each ending where the next starts: a kill
    # leaves a start's end_step as its last write had it, and its steps after the checkpoint resumed from
    # were trained again.
    try:
      before = _read_json(workdir, "run.json").get("segments", [])
    except (ValueError, OSError, tf.errors.OpError):  # unreadable: the history is lost, not the run
      before = []
    earlier = [s for s in before if s["start_step"] < segment["start_step"]]
    ends = [s["start_step"] for s in earlier[1:]] + [segment["start_step"]]
    fields["segments"] = [dict(s, end_step=end) for s, end in zip(earlier, ends)] + [segment]
  fileio.write_json(os.path.join(workdir, "run.json"), {
      **fields, "ended": now(),
      "versions": {"project": pipeline.project_version(), "tensorflow": tf.__version__, "keras": keras.__version__,
                   "python": platform.python_version()},
      "git_commit": _git_commit(), "host": platform.node()})


def _git_commit() -> str | None:
  try:
    out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=os.path.dirname(os.path.abspath(__file__)),
                         capture_output=True, text=True, timeout=10, check=True)
    return out.stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
