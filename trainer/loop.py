"""The outer loop (orbit's Controller, in small): train loops of `Learner.train` between boundaries, and a
list of periodic actions asked at each boundary whether it is their time (clu's PeriodicAction).

The multi-worker rule: every worker runs the same actions at the same steps and takes the same decisions;
only what a writer writes differs. So the step triggers of the actions set the train-loop lengths, and an
action's `every_secs` trigger (seen at the first boundary after, and so not alike on every worker) is for
work that is not collective.
"""

import dataclasses
import math
import time

from absl import logging
import numpy as np
import tensorflow as tf

from trainer import distribute
from trainer import evaluation
from trainer import figures
from trainer import writers
from trainer.faults import TrainingError


def default_clock() -> float:
  return time.monotonic()


@dataclasses.dataclass
class Loop:
  """What one train loop did: the step it reached, its steps, its seconds and `Learner.train`'s metrics."""
  step: int
  steps: int
  seconds: float
  metrics: dict


class PeriodicAction:
  """Calls `act(step)` at the loop boundaries where it is due: at multiples of `every_steps` (one period or
  several), at `on_steps`, or once `every_secs` seconds of `clock` have passed since it last ran (or was
  made). Subclasses may also watch every loop (`observe`) and act before one (`before`). Counts its runs
  and their seconds, reported under `name` (run.json's timing; "" = not reported)."""

  name = ""

  def __init__(self, *, every_steps: int | tuple[int, ...] = (), every_secs: float = 0.0, on_steps=(),
               clock=None):
    periods = (every_steps,) if isinstance(every_steps, int) else tuple(every_steps)
    self.periods = tuple(p for p in periods if p > 0)
    self.on_steps = frozenset(on_steps)
    self.every_secs = every_secs
    self.clock = clock or default_clock
    self._last_time = self.clock()
    self.runs, self.seconds = 0, 0.0

  def next_step(self, step: int) -> int | None:
    """The first step after `step` where a step trigger fires; None if none will."""
    candidates = [(step // p + 1) * p for p in self.periods] + [s for s in self.on_steps if s > step]
    return min(candidates) if candidates else None

  def due(self, step: int) -> bool:
    return (any(step % p == 0 for p in self.periods) or step in self.on_steps or
            bool(self.every_secs and self.clock() - self._last_time >= self.every_secs))

  def before(self, step: int) -> None:
    """Called before each train loop, which starts at `step`."""

  def observe(self, loop: Loop) -> None:
    """Called after each train loop, before `act`."""

  def __call__(self, loop: Loop) -> bool:
    """Observes `loop`; runs the action if it is due at `loop.step`. Returns whether it ran."""
    self.observe(loop)
    if not self.due(loop.step):
      return False
    start = self.clock()
    self.act(loop.step)
    self._last_time = self.clock()
    self.runs, self.seconds = self.runs + 1, self.seconds + self._last_time - start
    return True

  def act(self, step: int) -> None:
    raise NotImplementedError

  def close(self) -> None:
    """Called once when the loop ends, however it ends."""

  def timing(self) -> dict:
    """{name: {runs, secs}} for run.json; empty when unnamed or never run."""
    if not self.name or not self.runs:
      return {}
    return {self.name: {"runs": self.runs, "secs": round(self.seconds, 3)}}


class Timeline(PeriodicAction):
  """Never runs; watches every loop for the run's timing: when the first and the last train loop of this
  process ended, the first loop's steps and seconds, and the seconds inside all loops. First in the list
  of actions, so that the others' work does not count as the loops'."""

  def __init__(self, clock=None):
    super().__init__(clock=clock)
    self.loops, self.first_steps, self.first_seconds, self.train_seconds, self.later_steps = 0, 0, 0.0, 0.0, 0
    self.first_end = self.last_end = None

  def observe(self, loop):
    self.last_end = self.clock()
    if not self.loops:
      self.first_end, self.first_steps, self.first_seconds = self.last_end, loop.steps, loop.seconds
    else:
      self.later_steps += loop.steps
    self.loops += 1
    self.train_seconds += loop.seconds

  def first_step_end(self) -> float | None:
    """When the first step ended, estimated: the first loop's end less its other steps at the later loops'
    mean seconds per step (its own end when there were none), but at most at the first loop's own mean, so
    the estimate stays inside that loop when later loops ran slower (a busier machine)."""
    if self.first_end is None:
      return None
    if not self.later_steps:
      return self.first_end
    per_step = min((self.train_seconds - self.first_seconds) / self.later_steps,
                   self.first_seconds / self.first_steps)
    return self.first_end - (self.first_steps - 1) * per_step

  def act(self, step):
    del step


class ReportProgress(PeriodicAction):
  """Writes train/loss, accuracy, learning_rate (and loss_scale) and images_per_sec, over the loops since
  its last report. Images/s count the time inside train loops only: evaluation, checkpoints and
  summaries between loops are not the step's."""

  name = "train_summaries"

  def __init__(self, writer: writers.MetricWriter, global_batch_size: int, optimizer_scalars, **trigger):
    super().__init__(**trigger)
    self.writer, self.batch, self.optimizer_scalars = writer, global_batch_size, optimizer_scalars
    self.last = {}  # the last report, without the train/ prefix
    self._reset()

  def _reset(self):
    self._steps, self._seconds, self._loss, self._correct, self._count = 0, 0.0, 0.0, 0.0, 0

  def observe(self, loop):
    count = loop.metrics["count"]
    self._steps += loop.steps
    self._seconds += loop.seconds
    self._loss += loop.metrics["loss"] * count
    self._correct += loop.metrics["accuracy"] * count
    self._count += count

  def act(self, step):
    count = max(self._count, 1)
    self.last = {"loss": self._loss / count, "accuracy": self._correct / count, **self.optimizer_scalars(),
                 "images_per_sec": self._steps * self.batch / max(self._seconds, 1e-9)}
    self.writer.write_scalars(step, {f"train/{k}": v for k, v in self.last.items()})
    self._reset()


class EpochTimer(PeriodicAction):
  """Writes train/epoch_seconds at each epoch's end: wall time from before its first train loop, so the
  epoch's own logs and checkpoints count, the previous epoch's validation does not. Not for an epoch this
  process started in the middle (a resumed run)."""

  def __init__(self, writer: writers.MetricWriter, steps_per_epoch: int, clock=None):
    super().__init__(every_steps=steps_per_epoch, clock=clock)
    self.writer, self.steps_per_epoch = writer, steps_per_epoch
    self._start = None

  def before(self, step):
    if step % self.steps_per_epoch == 0:
      self._start = self.clock()

  def act(self, step):
    if self._start is not None:
      self.writer.write_scalars(step, {"train/epoch_seconds": self.clock() - self._start})
    self._start = None


class EpochAudit(PeriodicAction):
  """At each epoch's end, logs how many images the epoch trained and a digest of their ids (`end_epoch`,
  which also starts the next epoch's count), and writes train/epoch_images. Runs before the epoch's
  checkpoint, which then holds the zeroed count. An epoch stopped and resumed any number of times logs
  the same as one run straight through: what tools.chaos_resume checks in the default mode."""

  def __init__(self, writer: writers.MetricWriter, end_epoch, steps_per_epoch: int):
    super().__init__(every_steps=steps_per_epoch)
    self.writer, self.end_epoch, self.steps_per_epoch = writer, end_epoch, steps_per_epoch

  def act(self, step):
    audit = self.end_epoch()
    logging.info("epoch %d trained %d images, id digest %s", step // self.steps_per_epoch, audit["images"],
                 audit["digest"])
    self.writer.write_scalars(step, {"train/epoch_images": audit["images"]})


class Evaluate(PeriodicAction):
  """Scores the validation split (with the EMA weights when there are any) and writes validation/*; with
  `worst` (the chief, config.summary_worst_images > 0) also its confusion matrix and worst images.
  `dataset` is a distributed dataset or a function making one at the first evaluation. Not due at
  `final_step`: the final evaluation scores those weights (`final`) in the same pass as its views."""

  name = "validation"

  def __init__(self, evaluator: evaluation.Evaluator, dataset, writer: writers.MetricWriter, *,
               class_names, worst: int, denormalize, final_step: int | None = None, **trigger):
    super().__init__(**trigger)
    self.evaluator, self.dataset, self.writer = evaluator, dataset, writer
    self.class_names, self.worst, self.denormalize = list(class_names), worst, denormalize
    self.final_step = final_step
    self.last = {}
    self.figure_seconds = 0.0

  def due(self, step):
    return step != self.final_step and super().due(step)

  def act(self, step):
    with evaluation.averaged_weights(self.evaluator.state):
      self.last = self._evaluate(step, "none")

  def final(self, step: int, views: str, model) -> dict:
    """The final evaluation's pass over the split, of `model` (the final weights as served), with test-time
    `views`: writes the curve's point at `step` from the image's own view (as `act`), validation/tta_loss
    and tta_accuracy, and the figures of the views' predictions. Returns the metrics (evaluate's)."""
    return self._evaluate(step, views, model)

  def _evaluate(self, step: int, views: str, model=None) -> dict:
    if callable(self.dataset):
      self.dataset = self.dataset()
    metrics, details = self.evaluator.evaluate(self.dataset, views=views, worst=self.worst, model=model)
    scalars = dict(metrics)
    if views != "none":
      scalars = {"loss": metrics["single_view_loss"], "accuracy": metrics["single_view_accuracy"],
                 "count": metrics["count"], "tta_loss": metrics["loss"], "tta_accuracy": metrics["accuracy"]}
    self.writer.write_scalars(step, {f"validation/{k}": v for k, v in scalars.items()})
    if self.worst:
      start = self.clock()
      self.writer.write_images(step, self._figures(details))
      self.figure_seconds += self.clock() - start
    return metrics

  def timing(self):
    """The passes over the split, and apart from them the figures (confusion matrix, worst images)."""
    if not self.runs:
      return {}
    passes = {"validation": {"runs": self.runs, "secs": round(self.seconds - self.figure_seconds, 3)}}
    if not self.worst:
      return passes
    return {**passes, "validation_figures": {"runs": self.runs, "secs": round(self.figure_seconds, 3)}}

  def _figures(self, details: dict) -> dict[str, np.ndarray]:
    images = {"validation/confusion_matrix":
              figures.summary_image(figures.confusion(details["confusion"], self.class_names))}
    worst = details.get("worst")
    if worst is not None and len(worst["labels"]):
      images["validation/worst_misclassified"] = figures.summary_image(figures.predictions(
          self.denormalize(worst["images"]), worst["labels"], worst["predicted"], worst["probability"],
          self.class_names))
    return images


class Checkpoint(PeriodicAction):
  """Calls `save(step)`, which every worker must reach alike (saving is collective)."""

  name = "checkpoint"

  def __init__(self, save, **trigger):
    super().__init__(**trigger)
    self.save = save

  def act(self, step):
    self.save(step)


class Profile(PeriodicAction):
  """A profiler trace of train steps [first, end) into `directory`, where TensorBoard's profile plugin
  finds it (plugins/profile/<run>/*.xplane.pb). Every worker cuts its loops at the two steps; only the
  one with `trace` (the chief) traces."""

  def __init__(self, steps: tuple[int, ...], directory: str, trace: bool):
    super().__init__(on_steps=steps)
    self.range, self.directory, self.trace = tuple(steps), directory, trace
    self.active = False

  def before(self, step):
    if self.trace and self.range and not self.active and self.range[0] <= step < self.range[1]:
      tf.profiler.experimental.start(self.directory)
      self.active = True
      logging.info("profiling steps %d to %d into %s", step, self.range[1] - 1, self.directory)

  def act(self, step):
    if self.active and step >= self.range[1]:
      self.close()

  def close(self):
    if self.active:
      tf.profiler.experimental.stop()
      self.active = False


def loop_length(step: int, total_steps: int, steps_per_epoch: int, steps_per_loop: int,
                actions: list[PeriodicAction]) -> int:
  """Steps to run before Python must act again: to the next multiple of `steps_per_loop`, the epoch's
  end (it decides which variables train), the end, or any action's next step trigger."""
  nearest = [total_steps, (step // steps_per_epoch + 1) * steps_per_epoch]
  nearest += [(step // steps_per_loop + 1) * steps_per_loop] if steps_per_loop > 0 else []
  nearest += [s for s in (a.next_step(step) for a in actions) if s is not None]
  return min(nearest) - step


def train_loops(learner, iterator, actions: list[PeriodicAction], *, start_step: int, total_steps: int,
        steps_per_epoch: int, steps_per_loop: int, stop_requested, last_checkpoint, clock=None) -> bool:
  """Trains from `start_step` to `total_steps`, running `actions` at each loop boundary, until the end or
  until `stop_requested()` (asked after every loop, the last included: a collective) says so. Returns
  whether it stopped early. A non-finite loss raises before any action, so no checkpoint holds it."""
  clock = clock or default_clock
  step = start_step
  try:
    while step < total_steps:
      num_steps = loop_length(step, total_steps, steps_per_epoch, steps_per_loop, actions)
      for action in actions:
        action.before(step)
      start = clock()
      metrics = learner.train(iterator, num_steps, step // steps_per_epoch)
      loop = Loop(metrics["step"], metrics["step"] - step, clock() - start, metrics)
      step = loop.step
      if not math.isfinite(metrics["loss"]):
        raise distribute.refuse_together(learner.strategy, TrainingError(  # the loss is every replica's mean
            f"loss is {metrics['loss']} at step {step}; stopped without saving. The last good checkpoint is "
            f"{last_checkpoint() or 'none (none was written yet)'}"))
      for action in actions:
        action(loop)
      if stop_requested():
        return True
    return False
  finally:
    for action in actions:
      action.close()
