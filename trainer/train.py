"""The trainer, as a table of contents: `train_and_evaluate(config, workdir)`.

Where each concern lives: the state and the train step in trainer/steps.py (`Learner.train`), evaluation
and precise BatchNorm in trainer/evaluation.py (`Evaluator.evaluate`), the outer loop and its periodic
actions (report, epoch timer, validation, checkpoint, profile) in trainer/loop.py, the metric writers in
trainer/writers.py, the workdir's checks and files in trainer/workdir.py, the data adapters in
trainer/data.py, stop requests and error messages in trainer/faults.py.
"""

import concurrent.futures
import contextlib
import dataclasses
import functools
import math
import os
import time

from absl import logging
import keras
import ml_collections
import tensorflow as tf

from pipeline import manifest as manifest_lib
from pipeline import ops
from trainer import checks
from trainer import data
from trainer import distribute
from trainer import evaluation
from trainer import export as export_lib
from trainer import faults
from trainer import loop
from trainer import models
from trainer import precision
from trainer import steps
from trainer import workdir as workdir_lib
from trainer import writers
from trainer.faults import TrainingError  # pylint: disable=unused-import  (part of this module's API)


@dataclasses.dataclass
class Run:
  """Everything one call of train_and_evaluate works with."""
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

  @property
  def chief(self) -> bool:
    return distribute.is_chief(self.strategy)

  @property
  def total_steps(self) -> int:
    return self.config.num_epochs * self.steps_per_epoch


def train_and_evaluate(config, workdir: str, *, since: float | None = None) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; evaluates the final weights on
  every split the data has and exports them. Returns the final metrics (with `stopped_by` when a stop request
  ended it early). A stop request (SIGTERM, SIGINT)
  at any point after start-up ends in a checkpoint and a clean return; the same command resumes.
  run.json's timing counts start-up from `since` (time.monotonic() at the end of trainer.main's imports;
  by default this call)."""
  since = time.monotonic() if since is None else since
  why = precision.resolve(config, started_with=workdir_lib.started_precision(workdir))
  logging.info("training in %s (%s)", config.mixed_precision, why)
  if config.deterministic:
    tf.config.experimental.enable_op_determinism()
  # Before our SIGTERM handler: MultiWorkerMirroredStrategy's coordination service installs its own, which
  # would replace ours and leave a stop request unseen.
  strategy = distribute.make_strategy(config)
  with faults.StopRequest() as stop, faults.data_errors_as_training_errors():
    run = _start(config, workdir, strategy, since, {"mixed_precision": config.mixed_precision, "why": why})
    try:
      workdir_lib.check_shared(run.strategy, workdir)
      stopped = _train(run, stop, ready=_first_start(run) if run.start_step == 0 else lambda: None)
      if not stopped:
        with _timed(run, "final_evaluation_secs"):
          stopped = _final_evaluation(run, stop)
      exported = not stopped and run.chief and config.export
      if exported:
        mean, std = data.normalization_for(config, run.manifest)
        step = int(run.state.step.numpy())
        with _timed(run, "export_secs"):
          path = export_lib.export(run.served, os.path.join(workdir, "export"), mean=mean, std=std,
                                   class_names=manifest_lib.class_names(run.manifest), tta=config.tta,
                                   warmup_records=data.sample_records(config, run.manifest, WARMUP_IMAGES),
                                   versions=os.path.join(workdir, "serving"), version=step,
                                   keep_versions=config.export_versions)
        logging.info("exported SavedModel to %s, computing in %s%s", path, config.export_precision,
                     f"; version {step} in {workdir}/serving" if config.export_versions else "")
      if not stopped and run.last_loop_end is not None:
        end = "last_step_to_export_secs" if exported else "last_step_to_end_secs"
        run.timing[end] = round(time.monotonic() - run.last_loop_end, 3)
        logging.info("fixed cost: %.1f s from the start to the first step's end, %.1f s from the last step to "
                     "%s", run.timing["start_to_first_step_secs"], run.timing[end],
                     "the export written" if exported else "the end")
    except BaseException as e:
      full = run.chief and workdir_lib.out_of_space(e, workdir, _space_needed(run), run.checkpoints.latest)
      _end(run, "failed", error=faults.describe(full or e))
      if full:
        raise full from None
      raise
    _end(run, f"stopped by {stop.cause}" if stopped else "finished")
  return dict(run.metrics, stopped_by=stop.cause) if stopped else run.metrics


def _start(config, workdir: str, strategy, since: float, chosen: dict) -> Run:
  """Checks, state restored from the latest checkpoint if there is one, config.json and a run.json saying
  "running" (what the next start checks a resume against, even if this one is killed)."""
  started = workdir_lib.now()
  distribute.log_devices(strategy)
  manifest, identity, steps_per_epoch = _agreed(strategy, lambda: _check_config_and_data(config, strategy))
  workdir_lib.check_same_run(strategy, config, identity)
  latest = _agreed(strategy, lambda: _check_workdir(config, workdir, strategy, identity, steps_per_epoch))
  workdir_lib.check_same_checkpoint(strategy, latest)
  state = steps.make_state(config, strategy, steps_per_epoch, data.model_shape(manifest))
  if latest:
    _agreed(strategy, lambda: workdir_lib.restore(state.checkpoint, latest))
    logging.info("resumed from %s at step %d", latest, int(state.step.numpy()))
  start_step = int(state.step.numpy())
  checkpoints = workdir_lib.Checkpoints(strategy, state.checkpoint, state.step, workdir, config.keep_checkpoints,
                                        saved_step=start_step if latest else -1, restored=latest)
  chief = distribute.is_chief(strategy)
  if chief:  # _check_workdir made the directory
    workdir_lib.write_config(workdir, config)
  console = writers.ConsoleWriter(config.num_epochs * steps_per_epoch, steps_per_epoch, config.global_batch_size,
                                  progress_bar=chief and config.progress_bar)
  writer = writers.create_default_writer(os.path.join(workdir, "summaries"), chief=chief,
                                         flush_secs=config.summary_flush_secs, console=console)
  run = Run(config, workdir, strategy, manifest, identity, steps_per_epoch, state, checkpoints, writer, started,
            start_step, since, chosen)
  if chief:
    _write_run_json(run, "running")
  return run


def _check_config_and_data(config, strategy) -> tuple[dict, dict, int]:
  """This worker's checks of the config and the data. Returns the manifest, the data's identity and the
  steps per epoch."""
  checks.check_config(config, strategy.num_replicas_in_sync)
  manifest = manifest_lib.load(config.data_dir)
  if config.input.verify_checksums:
    manifest_lib.verify_checksums(config.data_dir, manifest, manifest["splits"])
  return manifest, manifest_lib.identity(manifest), data.steps_per_epoch_for(config, manifest)


def _check_workdir(config, workdir: str, strategy, identity: dict, steps_per_epoch: int) -> str | None:
  """This worker's checks of the workdir, read-only until they pass, then that it can write there. Returns
  the checkpoint to resume from (the chief's newest intact one) or None."""
  workdir_lib.check(workdir)
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


def _agreed(strategy, check):
  """Runs the start-up `check` on every worker and returns its result. If it refuses on any worker,
  every worker refuses (a collective), so none is left waiting for a peer that quit."""
  try:
    result, problem = check(), None
  except (TrainingError, manifest_lib.ManifestError, ValueError, OSError, tf.errors.OpError) as e:
    result, problem = None, e
  if distribute.any_worker(strategy, problem is not None):
    raise problem or TrainingError("another worker refused to start; its log says why")
  return result


WARMUP_IMAGES = max(export_lib.WARMUP_BATCHES)  # real images in the export's warmup requests


def _first_start(run: Run):
  """Before a fresh run's first step: data-dependent layers set from the data (the same on every worker),
  and, from the chief, the HParams, a grid of augmented inputs and (`input.probe_batches`) the input
  pipeline's own rate. Reading the images and computing the layers' values starts in a background thread
  (TensorFlow's ops, which release the GIL, so it overlaps the tracing of the train step; no collective);
  returns the function that waits for them and does the rest, to call before the first step."""
  config = run.config
  first = functools.cache(lambda: data.first_train_images(config))
  pool = concurrent.futures.ThreadPoolExecutor(1)
  computed = pool.submit(models.compute_from_data, run.state.model,
                         lambda: data.data_init_images(config, run.manifest, first()))

  def ready():
    if models.set_from_data(computed.result()):
      for averages in (run.state.ema, run.state.lookahead):
        if averages:
          averages.reset()
    if run.chief:
      run.writer.write_hparams(dict(workdir_lib.flat_config(config.to_dict())))
      run.writer.write_images(0, {"train/augmented_inputs": data.input_grid(config, run.manifest, first())})
      if config.input.probe_batches:
        rate = data.input_rate(config, run.manifest)
        run.writer.write_scalars(0, {"input/images_per_sec": rate})
        logging.info("input pipeline alone: %.0f images/s", rate)

  pool.shutdown(wait=False)  # its thread ends with the task
  return ready


def _train(run: Run, stop: faults.StopRequest, ready) -> bool:
  """The train loops and their periodic actions, after `ready()` (the first start's); returns whether a
  stop was requested (on any worker: every worker returns the same), after saving a checkpoint there."""
  config, strategy = run.config, run.strategy
  learner = steps.Learner(config, strategy, run.state, *data.normalization_for(config, run.manifest))
  iterator = iter(strategy.distribute_datasets_from_function(
      data.train_dataset_fn(config, run.manifest, run.steps_per_epoch, run.start_step)))
  if run.start_step < run.total_steps:
    learner.trace(iterator, run.start_step // run.steps_per_epoch)
  ready()
  if run.start_step < run.total_steps and stop.agreed(strategy):  # asked during start-up: nothing to save
    logging.info("stopped by %s before the first step. Run the same command to resume.", stop.cause)
    return True
  report, validation, actions = _actions(run, learner)
  run.validation = validation
  timeline = loop.Timeline()
  try:
    stopped = loop.train_loops(learner, iterator, [timeline, *actions], start_step=run.start_step,
                       total_steps=run.total_steps, steps_per_epoch=run.steps_per_epoch,
                       steps_per_loop=config.steps_per_loop, stop_requested=lambda: stop.agreed(strategy),
                       last_checkpoint=lambda: run.checkpoints.latest)
  finally:  # also for run.json when the loop fails
    run.metrics.update({name: a.last for name, a in (("train", report), ("validation", validation)) if a.last})
    run.last_loop_end = timeline.last_end
    run.timing.update(_loop_timing(run, timeline, actions))
  if stopped:  # agreed by every worker: all save here and leave together
    step = int(run.state.step.numpy())
    logging.info("stopped by %s at step %d; checkpoint %s written. Run the same command to resume.",
                 stop.cause, step, run.checkpoints.save(step))
  return stopped


def _loop_timing(run: Run, timeline: loop.Timeline, actions: list) -> dict:
  """run.json's timing of the train loops: start-up to the end of the first step (its tracing and first
  run included; the first loop's other steps taken out at the later loops' rate), seconds inside loops,
  and each action's runs and seconds."""
  timing = {"train_loops": timeline.loops, "train_loop_secs": round(timeline.train_seconds, 3),
            "actions": {k: v for action in actions for k, v in action.timing().items()}}
  if timeline.first_end is not None:
    timing.update(start_to_first_step_secs=round(timeline.first_step_end() - run.since, 3),
                  first_loop_steps=timeline.first_steps, first_loop_secs=round(timeline.first_seconds, 3))
  return timing


@contextlib.contextmanager
def _timed(run: Run, key: str):
  start = time.monotonic()
  try:
    yield
  finally:
    run.timing[key] = round(time.monotonic() - start, 3)


def _actions(run: Run, learner: steps.Learner):
  """What runs between train loops, in order (the epoch timer before validation, which it does not
  count). Returns the train report, the validation and the list of all actions."""
  config, per_epoch = run.config, run.steps_per_epoch
  mean, std = data.normalization_for(config, run.manifest)
  names = manifest_lib.class_names(run.manifest)
  validation = "validation" in run.manifest["splits"]
  report = loop.ReportProgress(run.writer, config.global_batch_size, learner.optimizer_scalars,
                               every_steps=(config.log_every_steps, per_epoch))
  evaluate = loop.Evaluate(evaluation.Evaluator(run.strategy, run.state, len(names)),
                           lambda: data.eval_dataset(config, run.strategy, run.manifest, "validation"),
                           run.writer, class_names=names, worst=config.summary_worst_images if run.chief else 0,
                           denormalize=lambda images: ops.denormalize(images, mean, std).numpy(),
                           final_step=run.total_steps,
                           every_steps=per_epoch * config.eval_every_epochs if validation else ())
  return report, evaluate, [
      report, loop.EpochTimer(run.writer, per_epoch), loop.EpochAudit(run.writer, learner.end_epoch, per_epoch),
      evaluate,
      loop.Checkpoint(run.checkpoints.save, every_steps=(per_epoch, config.checkpoint_every_steps)),
      loop.Profile(tuple(config.profile_steps), os.path.join(run.workdir, "summaries"), trace=run.chief)]


def _final_evaluation(run: Run, stop: faults.StopRequest) -> bool:
  """The final weights (lookahead's, then EMA's, with precise BatchNorm statistics) scored on every split
  with the export's test-time views. Asks for a stop request between its parts (a collective); returns
  whether one came. The checkpoint of the last step is written already and is left as it is."""
  state, config = run.state, run.config
  logging.info("final evaluation of the weights at step %d (views: %s)", int(state.step.numpy()), config.tta)
  if state.lookahead:  # the weights end as their lookahead average (idempotent on a re-run)
    state.lookahead.finish()
  if state.ema:
    state.ema.swap()
  if config.bn_statistics_images:
    batches = evaluation.bn_statistics(run.strategy, state.model,
                                       data.bn_statistics_dataset(config, run.strategy, run.manifest))
    logging.info("BatchNorm statistics re-estimated from %d train images", batches * config.global_batch_size)
  with run.strategy.scope():  # scored as it will be served: in the export's precision
    run.served = export_lib.serving_model(state.model, config, data.model_shape(run.manifest))
  step = int(state.step.numpy())
  for split in data.eval_splits(run.manifest):
    if stop.agreed(run.strategy):
      break
    if split == "validation":  # also the validation curve's last point, and its figures
      run.metrics[split] = run.validation.final(step, config.tta, run.served)
    else:
      run.metrics[split], _ = run.validation.evaluator.evaluate(
          data.eval_dataset(config, run.strategy, run.manifest, split), views=config.tta, model=run.served)
    logging.info("final %s: %s", split, writers.format_metrics(run.metrics[split]))
  else:  # every split scored: one last vote before the export
    if not stop.agreed(run.strategy):
      return False
  logging.info("stopped by %s after the last step, before the export; %s holds the trained weights. Run the "
               "same command to evaluate and export them.", stop.cause, run.checkpoints.latest)
  return True


def _space_needed(run: Run) -> dict[str, int]:
  """Bytes a checkpoint and the export of this run need, by the workdir's name for them: the newest
  checkpoint's files; the served weights plus what the graph and warmup requests add."""
  latest, state = run.checkpoints.latest, run.state
  nbytes = lambda variables: sum(math.prod(v.shape) * tf.as_dtype(v.dtype).size for v in variables)
  if latest:
    checkpoint = sum(tf.io.gfile.stat(p).length for p in tf.io.gfile.glob(f"{latest}.*"))
  else:  # the weights, the optimizer's slots and the averages' copies
    checkpoint = nbytes(state.model.weights) + nbytes(state.optimizer.variables)
    checkpoint += nbytes(state.model.trainable_weights) * bool(state.ema) + nbytes(state.model.weights) * bool(
        state.lookahead)
  export = nbytes((run.served or state.model).weights) + EXPORT_GRAPH_BYTES
  return {"checkpoints": checkpoint, "tmp": checkpoint, "export": export, "serving": export}


EXPORT_GRAPH_BYTES = 2**20  # a SavedModel's graph and warmup requests, beside its weights (deep.py: ~0.3 MB)


def _end(run: Run, status: str, error: str | None = None) -> None:
  """Records how the run ended in run.json (the chief's) and closes the writer. After an `error`, a
  failure here is logged, not raised: the caller raises the error itself."""
  try:
    if run.chief:
      _write_run_json(run, status, **({"error": error} if error else {}))
    run.writer.close()
  except Exception as e:  # pylint: disable=broad-except
    if not error:
      raise
    # One line: the caller's error is the one to read (on a full disk, this one is the same).
    logging.warning("could not record the failure in %s/run.json: %s", run.workdir, faults.describe(e))


def _write_run_json(run: Run, status: str, **extra) -> None:
  workdir_lib.write_run(run.workdir, status=status, started=run.started, start_step=run.start_step,
                        end_step=int(run.state.step.numpy()), total_steps=run.total_steps,
                        steps_per_epoch=run.steps_per_epoch, data=run.data, precision=run.precision,
                        distribution=distribute.describe(run.strategy),
                        metrics=run.metrics, timing=run.timing, **extra)
