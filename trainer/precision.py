"""Which mixed-precision policy pays on the hardware at hand: the one decision `mixed_precision="auto"`
makes in the trainer and tools.doctor reports.

  GPU of compute capability >= 8.0 (A100, H100, L4, RTX 30xx+)  -> mixed_bfloat16 (no loss scaling)
  GPU of compute capability 7.x (V100, T4, RTX 20xx)            -> mixed_float16 with dynamic loss scaling
  older GPU                                                     -> float32
  CPU with AMX or AVX512_BF16 (oneDNN's bf16 kernels)           -> mixed_bfloat16
  any other CPU (bf16 converted in software: slower)            -> float32
"""

import dataclasses

import tensorflow as tf

from trainer import cpu

POLICIES = ("float32", "mixed_float16", "mixed_bfloat16")
CHOICES = POLICIES + ("auto",)
BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@dataclasses.dataclass(frozen=True)
class Hardware:
  """What the decision looks at: the GPUs the run trains on (name, compute capability) and the CPU's flags."""
  gpus: tuple[tuple[str, tuple[int, int] | None], ...] = ()
  cpu_flags: frozenset[str] = frozenset()


def cpu_has_bf16(flags: frozenset[str]) -> bool:
  """Whether oneDNN has bf16 kernels on a CPU with these flags: AVX512_BF16 or AMX."""
  return bool(set(BF16_CPU_FLAGS) & flags)


def detect(on_cpu: bool = False) -> Hardware:
  """This machine's hardware; `on_cpu`: the run trains on the CPU (logical_cpus), whatever GPUs there are."""
  gpus = () if on_cpu else tuple(
      (details.get("device_name", gpu.name), details.get("compute_capability"))
      for gpu in tf.config.list_physical_devices("GPU")
      for details in [tf.config.experimental.get_device_details(gpu)])
  return Hardware(gpus, cpu.flags())


def fast_bf16(hardware: Hardware) -> bool:
  """Whether bf16 has kernels faster than float32's: every GPU of compute capability >= 8.0, or on a CPU
  AMX or AVX512_BF16."""
  if hardware.gpus:
    return all(c and c >= (8, 0) for _, c in hardware.gpus)
  return cpu_has_bf16(hardware.cpu_flags)


def choose(hardware: Hardware) -> tuple[str, str]:
  """(policy, why in a few words) for training on `hardware`; several GPUs: the slowest decides."""
  if hardware.gpus:
    known = [c for _, c in hardware.gpus if c]
    capability = min(known) if len(known) == len(hardware.gpus) else None
    name = hardware.gpus[0][0]
    if capability is None:
      return "float32", f"GPU {name} of unknown compute capability"
    cc = f"{name}, compute capability {capability[0]}.{capability[1]}"
    if capability >= (8, 0):
      return "mixed_bfloat16", f"GPU {cc}: bf16 tensor cores"
    if capability >= (7, 0):
      return "mixed_float16", f"GPU {cc}: fp16 tensor cores, no fast bf16 (float16 with loss scaling)"
    return "float32", f"GPU {cc}: no tensor cores"
  if "amx_bf16" in hardware.cpu_flags:
    return "mixed_bfloat16", "CPU with AMX: oneDNN's bf16 kernels"
  if "avx512_bf16" in hardware.cpu_flags:
    return "mixed_bfloat16", "CPU with AVX512_BF16: oneDNN's bf16 kernels"
  return "float32", "CPU without AVX512_BF16 or AMX: bf16 would be converted in software"


def resolve(config, started_with: str | None = None, hardware: Hardware | None = None) -> str:
  """Replaces `config.mixed_precision="auto"` by a policy, in place, and returns why. A resumed run keeps the
  policy it `started_with` (its config.json's), so a resume on other hardware trains on as it began."""
  if config.mixed_precision != "auto":
    return "as configured"
  if started_with in POLICIES:
    config.mixed_precision = started_with
    return "auto: as the run started (its config.json)"
  config.mixed_precision, why = choose(hardware or detect(on_cpu=bool(config.logical_cpus)))
  return f"auto: {why}"
