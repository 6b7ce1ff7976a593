"""What goes wrong while training, turned into something a person can act on: stop requests
(SIGTERM/SIGINT) become a checkpoint and a clean exit, TensorFlow's data and peer errors become one line."""

import contextlib
import re
import signal
import threading

import tensorflow as tf

from trainer import distribute


class TrainingError(RuntimeError):
  """Training cannot go on (bad config for the hardware, non-finite loss); the message says why."""


@contextlib.contextmanager
def data_errors_as_training_errors():
  """Turns what TensorFlow raises for bad records or a lost peer into one readable TrainingError."""
  try:
    yield
  except tf.errors.UnavailableError as e:  # multi-worker: a peer died or became unreachable
    culprits = e.message.split("unhealthy", 1)[-1]  # the tasks named after "... are unhealthy", if any
    tasks = sorted(set(re.findall(r"/job:\w+/replica:\d+/task:\d+", culprits)))
    raise TrainingError(f"lost contact with {', '.join(tasks) or 'another worker'}; restart every worker with "
                        "the same command to resume from the last checkpoint") from None
  except tf.errors.NotFoundError as e:
    if "is not in the workers list" not in e.message:
      raise
    raise TrainingError("input.data_service: the tf.data service dispatcher must list its workers "
                        "(DispatcherConfig(worker_addresses=[...])), so that each makes its own share of the "
                        "batches and every batch is made once") from None
  except (tf.errors.InvalidArgumentError, tf.errors.DataLossError) as e:
    raise TrainingError(f"bad training data: {first_line(e.message)}") from None


def first_line(message: str) -> str:
  """The informative part of a TensorFlow error message."""
  message = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", message).strip()
  line = message.splitlines()[0] if message else ""
  match = re.search(r"assertion failed: \[(.*)\]$", line)
  if match:
    return match.group(1)
  line = re.sub(r"^Error in user-defined function passed to .*? transformation with iterator: \S+: ", "", line)
  return line.replace("Name: <unknown>, ", "")


class StopRequest:
  """SIGTERM/SIGINT ask the loop to stop at the next loop boundary: the steps in flight finish, a
  checkpoint is written, and the process exits 0. Restarting the same command resumes exactly there."""

  def __init__(self):
    self.signal = None
    self._previous = {}

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # Python delivers signals there only
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc):
    for sig, handler in self._previous.items():
      signal.signal(sig, handler)

  def _handle(self, signum, frame):
    del frame
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now
    self.signal = signal.Signals(signum).name

  def agreed(self, strategy) -> bool:
    """True on every worker if any worker was asked to stop, so that all workers stop after the same
    step and take the same path after it (a collective: every worker asks at the same loop boundary)."""
    return distribute.any_worker(strategy, self.signal is not None)
