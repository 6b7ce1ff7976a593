"""The CPUs this process may run on, which size the input pipeline's threads.

os.cpu_count() counts the machine's CPUs. A process may run on fewer: SLURM binds a task to the CPUs it was
given (task/affinity, task/cgroup), as do taskset and a container's cpuset; that is the affinity mask, which
TensorFlow's own thread pools go by. Where SLURM binds no CPUs (TaskPlugin=task/none, or a cgroup that does
not constrain cores), the mask is the whole shared node, and SLURM_CPUS_PER_TASK still says how many CPUs
the job was given per task.
"""

import dataclasses
import os


@dataclasses.dataclass(frozen=True)
class Cpus:
  """How many CPUs this process may run on, and what said so."""
  count: int
  why: str  # e.g. "2 in this process's affinity mask; SLURM_CPUS_PER_TASK=8"


def usable(environ=None) -> Cpus:
  """The CPUs of this process's affinity mask, or SLURM_CPUS_PER_TASK when it is set and smaller
  (`environ`: os.environ)."""
  environ = os.environ if environ is None else environ
  mask = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
  count, why = mask, f"{mask} in this process's affinity mask"
  per_task = environ.get("SLURM_CPUS_PER_TASK", "").strip()
  if per_task:
    why += f"; SLURM_CPUS_PER_TASK={per_task}"
    if per_task.isdigit() and 0 < int(per_task) < mask:
      count = int(per_task)
  return Cpus(count, why)
