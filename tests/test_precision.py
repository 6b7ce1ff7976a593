"""trainer/precision.py: what mixed_precision="auto" trains in, on each kind of hardware (none of it needed),
and that a resumed run keeps the precision it started with."""

import json
import os

import pytest

from configs import deep
from trainer import precision
from trainer import train

AMX = frozenset({"avx512f", "avx512_bf16", "amx_bf16", "amx_tile"})
ZEN4 = frozenset({"avx512f", "avx512_bf16"})
AVX2 = frozenset({"avx2", "fma"})


@pytest.mark.parametrize("hardware,policy,why", [
    (precision.Hardware((("NVIDIA A100-SXM4-40GB", (8, 0)),), AVX2), "mixed_bfloat16",
     "GPU NVIDIA A100-SXM4-40GB, compute capability 8.0: bf16 tensor cores"),
    (precision.Hardware((("NVIDIA L4", (8, 9)),) * 2, AVX2), "mixed_bfloat16", "bf16 tensor cores"),
    (precision.Hardware((("Tesla T4", (7, 5)),), AMX), "mixed_float16",  # the GPU decides, not the host CPU
     "GPU Tesla T4, compute capability 7.5: fp16 tensor cores, no fast bf16 (float16 with loss scaling)"),
    (precision.Hardware((("Tesla V100", (7, 0)), ("NVIDIA A100", (8, 0))), AVX2), "mixed_float16", "V100"),
    (precision.Hardware((("Tesla P100", (6, 0)),), AVX2), "float32", "no tensor cores"),
    (precision.Hardware((("mystery", None),), AVX2), "float32", "unknown compute capability"),
    (precision.Hardware((), AMX), "mixed_bfloat16", "CPU with AMX: oneDNN's bf16 kernels"),
    (precision.Hardware((), ZEN4), "mixed_bfloat16", "CPU with AVX512_BF16"),
    (precision.Hardware((), AVX2), "float32", "CPU without AVX512_BF16 or AMX"),
    (precision.Hardware((), frozenset({"avx512f"})), "float32", "converted in software"),
], ids=["a100", "two-l4", "t4", "v100-with-a100", "p100", "unknown-gpu", "amx-cpu", "zen4-cpu", "avx2-cpu",
        "avx512-without-bf16"])
def test_auto_chooses_by_hardware(hardware, policy, why):
  chosen, reason = precision.choose(hardware)
  assert chosen == policy and why in reason
  assert precision.fast_bf16(hardware) == (policy == "mixed_bfloat16")


def test_resolve_keeps_an_explicit_policy_and_a_resumed_runs(monkeypatch):
  config = deep.get_config("smoke")
  assert config.mixed_precision == "auto"
  why = precision.resolve(config, started_with=None, hardware=precision.Hardware((), AVX2))
  assert config.mixed_precision == "float32" and why == "auto: CPU without AVX512_BF16 or AMX: bf16 would be " \
      "converted in software"
  config = deep.get_config("smoke")
  assert precision.resolve(config, started_with="float32", hardware=precision.Hardware((), AMX)) == \
      "auto: as the run started (its config.json)" and config.mixed_precision == "float32"
  config.mixed_precision = "mixed_float16"
  assert precision.resolve(config, started_with="float32") == "as configured"
  assert config.mixed_precision == "mixed_float16"  # a resume then refuses the difference (workdir.py)
  seen = []
  a100 = precision.Hardware((("NVIDIA A100", (8, 0)),), AVX2)
  monkeypatch.setattr(precision, "detect", lambda on_cpu=False: seen.append(on_cpu) or (
      precision.Hardware((), AVX2) if on_cpu else a100))
  config.logical_cpus = 2  # trains on logical CPUs: the GPUs do not count
  config.mixed_precision = "auto"
  precision.resolve(config)
  assert seen == [True] and config.mixed_precision == "float32"
  config.logical_cpus, config.mixed_precision = 0, "auto"
  precision.resolve(config)
  assert seen == [True, False] and config.mixed_precision == "mixed_bfloat16"


@pytest.mark.slow
def test_a_run_records_its_choice_and_a_resume_keeps_it(synthetic_dir, tmp_path):
  """Started in float32, resumed with "auto" (here: whatever this CPU has), the run goes on in float32. The
  log line: tests/test_faults.py's sigterm test, which reads the trainer's output."""
  workdir = str(tmp_path / "run")
  config = deep.get_config("smoke")
  config.update(data_dir=synthetic_dir, num_epochs=1, mixed_precision="auto", export=False)
  train.train_and_evaluate(config, workdir)
  policy, why = precision.choose(precision.detect())
  run = json.load(open(os.path.join(workdir, "run.json")))
  assert run["precision"] == {"mixed_precision": policy, "why": f"auto: {why}"}
  assert json.load(open(os.path.join(workdir, "config.json")))["mixed_precision"] == policy

  other = str(tmp_path / "other")
  config = deep.get_config("smoke")
  config.update(data_dir=synthetic_dir, num_epochs=1, mixed_precision="float32", export=False)
  train.train_and_evaluate(config, other)
  config = deep.get_config("smoke")
  config.update(data_dir=synthetic_dir, num_epochs=2, export=False)
  train.train_and_evaluate(config, other)
  run = json.load(open(os.path.join(other, "run.json")))
  assert run["start_step"] == 4 and run["end_step"] == 8
  assert run["precision"] == {"mixed_precision": "float32", "why": "auto: as the run started (its config.json)"}
