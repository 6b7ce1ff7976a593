"""Metric writers (clu's five methods, in our own words): the trainer hands every worker one, so that all
run the same code; only the chief's also writes TensorBoard events, and every worker logs its line.

  write_scalars(step, {"train/loss": 0.3, ...})   write_images(step, {"name": uint8 or [0, 1] [N, H, W, C]})
  write_hparams({"key": value})                   flush()    close()
"""

import datetime
import sys

from absl import logging
import keras
import tensorflow as tf


class MetricWriter:
  """The interface, and the writer that writes nothing."""

  def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
    pass

  def write_images(self, step: int, images: dict) -> None:
    pass

  def write_hparams(self, hparams: dict) -> None:
    pass

  def flush(self) -> None:
    pass

  def close(self) -> None:
    pass


class SummaryWriter(MetricWriter):
  """TensorBoard event files in `logdir`. Buffered: events reach the file at most every `flush_secs` and
  on flush/close, not per call; on gs:// every flush re-uploads the event file, so per-step flushing would
  cost more than the training."""

  def __init__(self, logdir: str, flush_secs: float):
    self._writer = tf.summary.create_file_writer(logdir, max_queue=10000, flush_millis=int(flush_secs * 1000))

  def write_scalars(self, step, scalars):
    with self._writer.as_default(step=step):
      for name, value in scalars.items():
        tf.summary.scalar(name, value)

  def write_images(self, step, images):
    with self._writer.as_default(step=step):
      for name, value in images.items():
        tf.summary.image(name, value)

  def write_hparams(self, hparams):
    """The HParams dashboard: `hparams` (tuples as text) against the validation and train metrics."""
    from tensorboard.plugins.hparams import api as hp  # pylint: disable=g-import-not-at-top
    values = {k: v if isinstance(v, (bool, int, float, str)) else str(v) for k, v in hparams.items()}
    with self._writer.as_default():
      hp.hparams_config(hparams=[hp.HParam(k) for k in values],
                        metrics=[hp.Metric("validation/accuracy"), hp.Metric("validation/loss"),
                                 hp.Metric("train/loss")])
      hp.hparams(values)

  def flush(self):
    self._writer.flush()

  def close(self):
    self._writer.close()


class ConsoleWriter(MetricWriter):
  """The log lines: one per train report (step, epoch, loss, accuracy, learning rate, images/s, ETA) and
  one per validation, and a Keras progress bar on a terminal when `progress_bar`."""

  def __init__(self, total_steps: int, steps_per_epoch: int, global_batch_size: int, progress_bar: bool = False):
    self.total_steps, self.steps_per_epoch, self.batch = total_steps, steps_per_epoch, global_batch_size
    self._bar = (keras.utils.Progbar(total_steps, unit_name="step", stateful_metrics=["loss", "accuracy", "images/s"])
                 if progress_bar and sys.stdout.isatty() else None)

  def write_scalars(self, step, scalars):
    if "train/loss" in scalars:
      rate = scalars.get("train/images_per_sec", 0.0)
      eta = (self.total_steps - step) * self.batch / max(rate, 1e-9)
      logging.info("step %d/%d epoch %.2f loss %.4f accuracy %.4f lr %.4g %.0f images/s ETA %s", step,
                   self.total_steps, step / self.steps_per_epoch, scalars["train/loss"],
                   scalars["train/accuracy"], scalars.get("train/learning_rate", float("nan")), rate,
                   datetime.timedelta(seconds=round(eta)))
      if self._bar:
        self._bar.update(step, [("loss", scalars["train/loss"]), ("accuracy", scalars["train/accuracy"]),
                                ("images/s", rate)])
    evaluated = {k.split("/", 1)[1]: v for k, v in scalars.items() if k.startswith("validation/")}
    if evaluated:
      logging.info("epoch %d validation: %s", step // self.steps_per_epoch, format_metrics(evaluated))


class MultiWriter(MetricWriter):
  """Writes to each of `writers`."""

  def __init__(self, writers: list[MetricWriter]):
    self._writers = writers

  def write_scalars(self, step, scalars):
    for w in self._writers:
      w.write_scalars(step, scalars)

  def write_images(self, step, images):
    for w in self._writers:
      w.write_images(step, images)

  def write_hparams(self, hparams):
    for w in self._writers:
      w.write_hparams(hparams)

  def flush(self):
    for w in self._writers:
      w.flush()

  def close(self):
    for w in self._writers:
      w.close()


def format_metrics(metrics: dict) -> str:
  """`loss 0.1234 accuracy 0.9000 count 5000`: floats to 4 places."""
  return " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in metrics.items())


def create_default_writer(logdir: str, *, chief: bool, flush_secs: float, console: ConsoleWriter) -> MetricWriter:
  """The chief's: TensorBoard events in `logdir` and the console; any other worker's: the console only."""
  return MultiWriter([SummaryWriter(logdir, flush_secs), console]) if chief else console
