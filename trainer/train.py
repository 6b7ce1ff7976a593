"""The trainer, as a table of contents: `train_and_evaluate(config, workdir)`.

Where each concern lives: start-up up to the first step (precision, cluster, strategy, the workers'
agreement, the workdir's lease and checks, the resume) in trainer/startup.py, in the order it happens; the
state and the train step in trainer/steps.py (`Learner.train`), evaluation
and precise BatchNorm in trainer/evaluation.py (`Evaluator.evaluate`), the outer loop and its periodic
actions (report, epoch timer, validation, checkpoint, profile) in trainer/loop.py, the metric writers in
trainer/writers.py, the workdir's checks and files in trainer/workdir.py, the data adapters in
trainer/data.py, stop requests and error messages in trainer/faults.py.
"""

import concurrent.futures
import contextlib
import functools
import math
import os
import time

from absl import logging
import tensorflow as tf

from pipeline import manifest as manifest_lib
from pipeline import ops
from trainer import data
from trainer import distribute
from trainer import evaluation
from trainer import export as export_lib
from trainer import faults
from trainer import loop
from trainer import models
from trainer import startup
from trainer import steps
from trainer import workdir as workdir_lib
from trainer import writers
from trainer.faults import TrainingError  # pylint: disable=unused-import  (part of this module's API)
from trainer.startup import Run


def train_and_evaluate(config, workdir: str, *, since: float | None = None) -> dict:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; evaluates the final weights on
  every split the data has and exports them. Returns the final metrics (with `stopped_by` when a stop request
  ended it early). A stop request (SIGTERM, SIGINT)
  at any point after start-up ends in a checkpoint and a clean return; the same command resumes.
  run.json's timing counts start-up from `since` (time.monotonic() at the end of trainer.main's imports;
  by default this call)."""
  since = time.monotonic() if since is None else since
  strategy, chosen = startup.prepare(config, workdir)
  with faults.StopRequest() as stop, faults.data_errors_as_training_errors():
    run = startup.begin(config, workdir, strategy, since, chosen)
    try:
      stopped = _train(run, stop, ready=_first_start(run) if run.start_step == 0 else lambda: None)
      if not stopped:
        with _timed(run, "final_evaluation_secs"):
          stopped = _final_evaluation(run, stop)
      exported = not stopped and run.chief and config.export
      if exported:
        _export(run)
      if not stopped:
        _fixed_cost(run, exported)
    except BaseException as e:
      full = run.chief and workdir_lib.out_of_space(e, workdir, lambda: _space_needed(run), run.checkpoints.latest)
      _end(run, "failed", error=faults.describe(full or e))
      if full:
        raise full from None
      raise
    _end(run, f"stopped by {stop.cause}" if stopped else "finished")
  return dict(run.metrics, stopped_by=stop.cause) if stopped else run.metrics


def _first_start(run: Run):
  """Before a fresh run's first step: data-dependent layers set from the data (each worker computes them,
  then takes the chief's bits: machines may differ in the last ones),
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
    kernels = [(layer, distribute.from_chief(run.strategy, kernel)) for layer, kernel in computed.result()]
    if models.set_from_data(kernels):
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
      data.train_dataset_fn(config, run.manifest, run.steps_per_epoch, run.start_step, run.run_id)))
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


def _export(run: Run) -> None:
  """The chief's export of the final weights (the serving copy the final evaluation scored), with its TF
  Serving version (trainer/export.py); only while this run still holds the workdir's lease."""
  config = run.config
  run.lease.check()
  mean, std = data.normalization_for(config, run.manifest)
  with _timed(run, "export_secs"):
    path = export_lib.export(run.served, os.path.join(run.workdir, "export"), mean=mean, std=std,
                             class_names=manifest_lib.class_names(run.manifest), tta=config.tta,
                             versions=os.path.join(run.workdir, "serving"), version=int(run.state.step.numpy()),
                             keep_versions=config.export_versions)
  logging.info("exported SavedModel to %s, computing in %s%s", path, config.export_precision,
               f"; TF Serving's versions in {run.workdir}/serving" if config.export_versions else "")


def _fixed_cost(run: Run, exported: bool) -> None:
  """run.json's and the log's fixed costs: from the start to the first step's end, from the last step to
  the export written (or the end)."""
  if run.last_loop_end is None:
    return
  end = "last_step_to_export_secs" if exported else "last_step_to_end_secs"
  run.timing[end] = round(time.monotonic() - run.last_loop_end, 3)
  logging.info("fixed cost: %.1f s from the start to the first step's end, %.1f s from the last step to %s",
               run.timing["start_to_first_step_secs"], run.timing[end], "the export written" if exported else "the end")


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
    if run.chief and not (run.lease and run.lease.lost):  # a lost lease: the workdir is another run's now
      run.record(status, **({"error": error} if error else {}))
    run.writer.close()
  except Exception as e:  # pylint: disable=broad-except
    if not error:
      raise
    # One line: the caller's error is the one to read (on a full disk, this one is the same).
    logging.warning("could not record the failure in %s/run.json: %s", run.workdir, faults.describe(e))
  finally:
    if run.lease:
      run.lease.release()
