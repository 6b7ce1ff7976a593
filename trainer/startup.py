"""Start-up, in the order it happens, up to the first step. Each step refuses in one line; a refusal on
any worker is every worker's (`agreed`, a collective), and a refused start leaves the workdir as it was.

  1. precision  mixed_precision="auto" resolved for this hardware, or kept as the run started (precision.py);
                op determinism
  2. cluster    this task's cluster (cluster.py), its GPUs given and seen (gpus.py), the tasks met within
                cluster_wait_secs (rendezvous.py), the strategy (distribute.py)
  3. agreement  each worker's checks of the config and the data (checks.py, the manifest), then the same
                config and data on every worker (workdir.check_same_run)
  4. lease      the chief takes the workdir's lease (lease.py); every worker learns its run id
  5. workdir    the workdir's checks; a resume's config against the run's; the checkpoint every worker
                resumes from (workdir.py)
  6. state      the model, optimizer and averages made and restored (steps.py); config.json; the writers;
                run.json saying "running"

`prepare` does steps 1 and 2, before the caller's stop request (MultiWorkerMirroredStrategy's coordination
service installs a SIGTERM handler of its own, which would replace it); `begin` the rest.
"""

import dataclasses
import os

from absl import logging
import keras
import ml_collections
import tensorflow as tf

from pipeline import manifest as manifest_lib
from trainer import checks
from trainer import data
from trainer import distribute
from trainer import lease as lease_lib
from trainer import loop
from trainer import precision
from trainer import steps
from trainer import workdir as workdir_lib
from trainer import writers
from trainer.faults import TrainingError


@dataclasses.dataclass
class Run:
  """Everything one call of train.train_and_evaluate works with, from its start (begin) to its end."""
  config: ml_collections.ConfigDict
  workdir: str
  strategy: tf.distribute.Strategy
  manifest: dict
  data: dict  # the data's identity (manifest.identity): what a resume and every worker compare
  steps_per_epoch: int
  state: steps.State
  checkpoints: workdir_lib.Checkpoints
  writer: writers.MetricWriter
  started: str
  start_step: int
  since: float  # time.monotonic() where this process's timing starts (the end of its imports)
  precision: dict  # the mixed-precision policy trained in, and why (precision.resolve)
  metrics: dict = dataclasses.field(default_factory=dict)
  timing: dict = dataclasses.field(default_factory=dict)  # run.json's: fixed and per-epoch costs, seconds
  validation: loop.Evaluate | None = None  # the periodic validation, which the final evaluation finishes
  served: keras.Model | None = None  # the final weights in the export's precision (export.serving_model)
  last_loop_end: float | None = None
  lease: lease_lib.Lease | None = None  # the chief's: one run per workdir (trainer/lease.py)
  run_id: str = ""  # this start's, named by the lease and compared by every worker

  @property
  def chief(self) -> bool:
    return distribute.is_chief(self.strategy)

  @property
  def total_steps(self) -> int:
    return self.config.num_epochs * self.steps_per_epoch

  def record(self, status: str, **extra) -> None:
    """run.json, with this start's segment: its steps and the replicas and workers that trained them (a
    resume may change those; the earlier starts' segments are kept)."""
    step, layout = int(self.state.step.numpy()), distribute.describe(self.strategy)
    segment = {"start_step": self.start_step, "end_step": step, "replicas": layout["replicas"],
               "workers": layout["workers"]}
    workdir_lib.write_run(self.workdir, segment, status=status, started=self.started, start_step=self.start_step,
                          end_step=step, total_steps=self.total_steps,
                          steps_per_epoch=self.steps_per_epoch, data=self.data, precision=self.precision,
                          distribution=layout, metrics=self.metrics, timing=self.timing, **extra)


def prepare(config, workdir: str) -> tuple[tf.distribute.Strategy, dict]:
  """Steps 1 and 2 (the module docstring). Returns the strategy and the precision chosen, with why."""
  why = precision.resolve(config, started_with=workdir_lib.started_precision(workdir))
  logging.info("training in %s (%s)", config.mixed_precision, why)
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  return distribute.make_strategy(config), {"mixed_precision": config.mixed_precision, "why": why}


def begin(config, workdir: str, strategy, since: float, chosen: dict) -> Run:
  """Steps 3 to 6 (the module docstring), under the caller's stop request: returns the Run, its state
  restored from the latest checkpoint if there is one, with config.json and a run.json saying "running"
  (what the next start checks a resume against, even if this one is killed) written."""
  started = workdir_lib.now()
  distribute.log_devices(strategy)
  manifest, identity, steps_per_epoch = agreed(strategy, lambda: _check_config_and_data(config, strategy))
  workdir_lib.check_same_run(strategy, config, identity)
  lease, run_id = _take_lease(config, workdir, strategy)
  try:
    return _resume_or_begin(config, workdir, strategy, since, chosen, started, manifest, identity,
                            steps_per_epoch, lease, run_id)
  except BaseException:
    if lease:
      lease.release(refused=True)
    raise


def _check_config_and_data(config, strategy) -> tuple[dict, dict, int]:
  """This worker's checks of the config and the data. Returns the manifest, the data's identity and the
  steps per epoch."""
  manifest, steps_per_epoch = checks.check_config_and_data(config, strategy.num_replicas_in_sync,
                                                           verify=config.input.verify_checksums)
  return manifest, manifest_lib.identity(manifest), steps_per_epoch


def _take_lease(config, workdir: str, strategy) -> tuple[lease_lib.Lease | None, str]:
  """The chief takes the workdir's lease (trainer/lease.py: one run per workdir) once the workdir passes the
  read-only checks; every worker learns the run id it names. Returns the lease (the chief's; None on the
  other workers) and the run id."""
  chief, taken = distribute.is_chief(strategy), []

  def take():
    workdir_lib.check(workdir)
    if chief:
      taken.append(lease_lib.acquire(workdir, config.lease_secs))

  try:
    agreed(strategy, take)
  except BaseException:
    for lease in taken:  # another worker refused: the workdir is left as it was
      lease.release(refused=True)
    raise
  lease = taken[0] if taken else None
  run_id = distribute.gather_texts(strategy, lease.run_id if lease else "")[0]
  if lease:
    lease.keep()
  logging.info("run %s holds %s", run_id, os.path.join(workdir, lease_lib.FILENAME))
  return lease, run_id


def _resume_or_begin(config, workdir, strategy, since, chosen, started, manifest, identity, steps_per_epoch, lease,
                     run_id) -> Run:
  """Steps 5 and 6, holding the lease."""
  latest = agreed(strategy, lambda: _check_workdir(config, workdir, strategy, identity, steps_per_epoch, run_id))
  workdir_lib.check_same_checkpoint(strategy, latest)
  state = steps.make_state(config, strategy, steps_per_epoch, data.model_shape(manifest))
  if latest:
    agreed(strategy, lambda: workdir_lib.restore(state.checkpoint, latest))
    logging.info("resumed from %s at step %d", latest, int(state.step.numpy()))
  start_step = int(state.step.numpy())
  checkpoints = workdir_lib.Checkpoints(strategy, state.checkpoint, state.step, workdir, config.keep_checkpoints,
                                        saved_step=start_step if latest else -1, restored=latest,
                                        lost=lease.lost_why if lease else None)
  chief = distribute.is_chief(strategy)
  if chief:  # _check_workdir made the directory
    workdir_lib.write_config(workdir, config)
  console = writers.ConsoleWriter(config.num_epochs * steps_per_epoch, steps_per_epoch, config.global_batch_size,
                                  progress_bar=chief and config.progress_bar)
  writer = writers.create_default_writer(os.path.join(workdir, "summaries"), chief=chief,
                                         flush_secs=config.summary_flush_secs, console=console)
  run = Run(config, workdir, strategy, manifest, identity, steps_per_epoch, state, checkpoints, writer, started,
            start_step, since, chosen, lease=lease, run_id=run_id)
  if chief:
    run.record("running")
  return run


def _check_workdir(config, workdir: str, strategy, identity: dict, steps_per_epoch: int,
                   run_id: str) -> str | None:
  """This worker's checks of the workdir, read-only until they pass, then that it can write there. Returns
  the checkpoint to resume from (the chief's newest intact one) or None."""
  workdir_lib.check(workdir)
  if not distribute.is_chief(strategy):
    workdir_lib.check_lease(workdir, run_id)
  latest = workdir_lib.latest_checkpoint(workdir)
  if latest:  # a run that never checkpointed may be retried with other values
    workdir_lib.check_resumable(config, workdir, identity, steps_per_epoch, distribute.describe(strategy)["workers"])
    step = workdir_lib.checkpoint_step(latest)
    if config.input.data_service and step % steps_per_epoch:
      raise TrainingError(f"{latest} is at step {step}, inside epoch {step // steps_per_epoch + 1}: the tf.data "
                          "service hands out batches in the order its workers make them, so the rest of that "
                          "epoch cannot be told apart; resume with --config.input.data_service='' (the same "
                          "batches, made in this process)")
  workdir_lib.make_writable(workdir)
  return latest


def agreed(strategy, check):
  """Runs the start-up `check` on every worker and returns its result. If it refuses on any worker,
  every worker refuses (a collective), so none is left waiting for a peer that quit."""
  try:
    result, problem = check(), None
  except (TrainingError, manifest_lib.ManifestError, ValueError, OSError, tf.errors.OpError) as e:
    result, problem = None, e
  if distribute.any_worker(strategy, problem is not None):
    raise distribute.refuse_together(strategy, problem or TrainingError("another worker refused to start; its log "
                                                                         "says why"))
  return result
