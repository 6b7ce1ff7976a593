"""GPUs expected against GPUs seen: the first-day failure on a cluster is a job given GPUs whose TensorFlow
sees none (a CPU-only install, CUDA libraries missing, a driver older than TensorFlow's CUDA) and that then
trains on the CPU for hours. What the environment says was given, what TensorFlow sees, and the one line
that says why they differ; tools.doctor prints the same.

What counts as "given": CUDA_VISIBLE_DEVICES when it is set (it decides what CUDA may open: empty or -1
means none), else SLURM's SLURM_STEP_GPUS / SLURM_JOB_GPUS (indices) or SLURM_GPUS_ON_NODE (a count), else
NVIDIA_VISIBLE_DEVICES as a container runtime sets it (indices or UUIDs; `all`, the CUDA images' default
even on machines without a GPU, claims nothing).
"""

import dataclasses
import importlib.util
import os
import socket

import tensorflow as tf

VARIABLES = ("CUDA_VISIBLE_DEVICES", "SLURM_STEP_GPUS", "SLURM_JOB_GPUS", "SLURM_GPUS_ON_NODE",
             "NVIDIA_VISIBLE_DEVICES")
_NONE = ("", "-1", "none", "void", "nodevfiles", "all")


class GpuError(ValueError):
  """GPUs were given to this process and TensorFlow does not see them; the message says why."""


@dataclasses.dataclass(frozen=True)
class Given:
  """GPUs the environment says this process was given: the variable that says so, its value, the GPUs."""
  variable: str
  value: str
  ids: tuple[str, ...]  # indices or UUIDs; for a bare count, "0".."N-1"


def given(environ=None) -> Given | None:
  """What the environment (os.environ) says this process was given (see the module docstring), or None."""
  environ = os.environ if environ is None else environ
  for name in VARIABLES:
    if name not in environ:
      continue
    value = environ[name].strip()
    if value.lower() in _NONE:
      if name == "CUDA_VISIBLE_DEVICES":
        return None  # set, and empty or -1: CUDA opens no GPU whatever the others say
      continue
    if name == "SLURM_GPUS_ON_NODE":
      if not value.isdigit() or not int(value):
        continue
      ids = tuple(str(i) for i in range(int(value)))
    else:
      ids = tuple(part.strip() for part in value.split(",") if part.strip())
    return Given(name, value, ids)
  return None


def seen() -> list:
  """The GPUs TensorFlow sees (physical devices: listing them does not start the runtime)."""
  return tf.config.list_physical_devices("GPU")


def describe(devices) -> str:
  """`0 NVIDIA A100-SXM4-40GB, 1 ...`: each GPU by index and name."""
  names = []
  for index, device in enumerate(devices):
    try:
      names.append(f"{index} {tf.config.experimental.get_device_details(device).get('device_name', device.name)}")
    except (RuntimeError, ValueError):
      names.append(f"{index} {device.name}")
  return ", ".join(names) or "none"


def mismatch(expected: Given | None, count: int) -> str | None:
  """Why `count` GPUs seen falls short of `expected`, in one line with the likely cause and the way to
  train anyway; None when it does not."""
  if expected is None or count >= len(expected.ids):
    return None
  if not tf.test.is_built_with_cuda():
    cause = "this TensorFlow was built without CUDA: install the project with pip install -e \".[cuda]\""
  elif importlib.util.find_spec("nvidia") is None and not count:
    cause = ("the CUDA libraries TensorFlow loads are not installed (pip's nvidia-* packages): install the "
             "project with pip install -e \".[cuda]\"")
  else:
    cause = ("CUDA or the NVIDIA driver did not start for TensorFlow (nvidia-smi shows the driver; a driver older "
             "than TensorFlow's CUDA is the usual cause; python -m tools.doctor says more)")
  anyway = "on the CPU" if not count else f"on the {count} GPU(s) it sees"
  return (f"{expected.variable}={expected.value} gives this process {len(expected.ids)} GPU(s), but TensorFlow "
          f"sees {count or 'none'}: {cause}; or give --config.allow_cpu=True to train {anyway} anyway")


def identity(expected: Given | None, count: int) -> dict:
  """This process's GPUs as the workers compare them: two tasks of one host must not share one."""
  ids = expected.ids[:count] if expected else tuple(str(i) for i in range(count))
  return {"host": socket.gethostname(), "gpus": list(ids)}


def shared(identities: list[dict], names: list[str]) -> str | None:
  """The first two tasks of one host given the same GPU, in one line (`names`: the tasks'), or None."""
  for i, first in enumerate(identities):
    for j in range(i + 1, len(identities)):
      second = identities[j]
      common = sorted(set(first["gpus"]) & set(second["gpus"]))
      if first["host"] == second["host"] and common:
        return (f"{names[i]} and {names[j]} on {first['host']} were both given GPU {', '.join(common)}: give each "
                "task its own GPUs (srun --gpus-per-task, or a CUDA_VISIBLE_DEVICES of its own)")
  return None
