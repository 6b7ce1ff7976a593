"""The host CPU as /proc/cpuinfo describes it, read without TensorFlow: `import trainer` decides the host
allocator from it before TensorFlow is imported, and precision.py picks bf16 from its flags."""

import os
import platform
import sys

# The flags for which TensorFlow's x86 Linux builds turn oneDNN on by default (IsMKLEnabled in
# tensorflow/core/util/util.cc); tests/test_startup.py checks this against TensorFlow's own answer.
ONEDNN_FLAGS = ("avx512_vnni", "avx512_bf16", "avx_vnni", "amx_tile", "amx_int8", "amx_bf16")


def _cpuinfo(key: str) -> str | None:
  """The first value of `key` in /proc/cpuinfo (Linux); None elsewhere."""
  try:
    with open("/proc/cpuinfo", encoding="utf-8") as f:
      for line in f:
        if line.split(":", 1)[0].strip() == key:
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return None


def flags() -> frozenset[str]:
  return frozenset((_cpuinfo("flags") or "").split())


def model() -> str:
  return _cpuinfo("model name") or platform.processor() or "unknown"


def onednn_pays() -> bool:
  """Whether turning oneDNN on pays where TensorFlow leaves it off: x86 CPUs with AVX2 and FMA (measured on a
  Zen 3 in float32, docs/results.md)."""
  return {"avx2", "fma"} <= flags()


def onednn_enabled(environ=os.environ) -> bool:
  """Whether TensorFlow runs its CPU ops with oneDNN: its own answer once it is imported (it reads
  TF_ENABLE_ONEDNN_OPTS at its import); before, TF_ENABLE_ONEDNN_OPTS if set to a boolean, else the CPU's
  flags."""
  if "tensorflow" in sys.modules:
    from tensorflow.python.util import _pywrap_util_port  # pylint: disable=g-import-not-at-top
    return bool(_pywrap_util_port.IsMklEnabled())
  setting = environ.get("TF_ENABLE_ONEDNN_OPTS", "").strip().lower()
  if setting in ("0", "1", "true", "false"):
    return setting in ("1", "true")
  return bool(set(ONEDNN_FLAGS) & flags())
