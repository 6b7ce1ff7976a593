r"""Prints the TF_CONFIG of one task of a cluster whose hosts follow a pattern: what a Kubernetes indexed Job
(each pod knows only its JOB_COMPLETION_INDEX) or another launcher sets before starting the trainer, with no
JSON quoted by hand.

  export TF_CONFIG="$(python -m tools.tf_config --workers=2 --index=$JOB_COMPLETION_INDEX \
      --address='cifar-deep-{index}.cifar-deep:2222')"

Worker 0 is the chief. Imports no TensorFlow: it runs in well under a second.
"""

import json
import re
import sys

from absl import app
from absl import flags

FLAGS = flags.FLAGS


def define_flags():
  flags.DEFINE_integer("workers", None, "Tasks in the cluster (the Job's completions).", lower_bound=1, required=True)
  flags.DEFINE_integer("index", None, "This task's index, 0 to workers - 1 (JOB_COMPLETION_INDEX).", lower_bound=0,
                       required=True)
  flags.DEFINE_string("address", None, "host:port of task {index}, e.g. job-{index}.service:2222.", required=True)


def tf_config(workers: int, index: int, address: str) -> dict:
  """TF_CONFIG's dict: `workers` tasks of the job `worker` at `address` with {index} filled in; this task `index`."""
  if "{index}" not in address or not re.fullmatch(r"[^\s:]+:\d+", address.replace("{index}", "0")):
    raise ValueError(f"--address={address!r}: give host:port with {{index}} in the host, e.g. job-{{index}}.svc:2222")
  if not 0 <= index < workers:
    raise ValueError(f"--index={index} is not a task of --workers={workers} (0 to {workers - 1})")
  return {"cluster": {"worker": [address.replace("{index}", str(i)) for i in range(workers)]},
          "task": {"type": "worker", "index": index}}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    print(json.dumps(tf_config(FLAGS.workers, FLAGS.index, FLAGS.address)))
  except ValueError as e:
    print(f"tf_config: error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
