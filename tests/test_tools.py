"""tools.doctor and tools.benchmark_step as a user runs them (subprocesses, the smoke config)."""

import os
import re
import subprocess
import sys

import pytest

from trainer import precision

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMOKE = "--config=configs/deep.py:smoke"


def _tool(*args, timeout=300):
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout)


def test_doctor_checks_this_machine_and_passes():
  result = _tool("tools.doctor", SMOKE, "--steps=3", "--budget_secs=30")
  assert result.returncode == 0, result.stdout + result.stderr
  lines = result.stdout.splitlines()
  checks = {line.split()[1]: line.split()[0] for line in lines[:-1]}
  assert {"software", "cpu", "precision", "gpu", "all-reduce", "xla", "step"} <= set(checks), lines
  assert checks["all-reduce"] == "OK" and checks["xla"] == "OK"
  policy, why = precision.choose(precision.detect())  # the trainer's own decision: one, not two
  assert re.search(rf"^OK +precision +mixed_precision=auto trains in {policy} here \({re.escape(why)}\)$", result.stdout,
                   re.M), result.stdout
  steps = {line.split()[2]: line for line in lines if line.split()[1] == "step"}
  assert set(steps) == {"float32", policy}, lines  # float32, and what deep.py's "auto" picks here
  assert re.search(r"^OK .* [\d,.]+ images/s over 3 steps of 32", steps["float32"])
  if policy == "mixed_bfloat16":
    assert re.search(r"^OK .* images/s over 3 steps of 32", steps["mixed_bfloat16"]), steps
  assert lines[-1].startswith("doctor: all checks passed in ")


def test_doctor_fails_a_step_that_diverges():
  result = _tool("tools.doctor", SMOKE, "--config.optimizer.learning_rate=1e30", "--steps=5", "--budget_secs=30")
  assert result.returncode == 1, result.stdout + result.stderr
  assert re.search(r"^FAIL step float32 +loss is (nan|inf)", result.stdout, re.M), result.stdout
  assert re.match(r"doctor: \d check\(s\) failed \(step float32", result.stdout.splitlines()[-1])


@pytest.mark.slow
def test_benchmark_step_prints_mfu_fit_and_replica_ratios(synthetic_dir):
  result = _tool("tools.benchmark_step", SMOKE, f"--config.data_dir={synthetic_dir}", "--steps=1", "--windows=1")
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  flops = float(re.search(r"train step: ([\d.]+) GFLOP per image \(forward ([\d.]+)", out).group(1))
  forward = float(re.search(r"forward ([\d.]+) counted", out).group(1))
  assert flops >= 3 * forward > 0
  assert re.search(r"peak probe, conv 3x3 in bfloat16: [\d,]+ GFLOP/s", out)
  assert re.search(r"^peak probe \(the faster of the two\) +median +[\d,.]+ +min +[\d,.]+ +max +[\d,.]+ GFLOP/s$", out, re.M), out
  for name in ("MFU", "custom loop / fit", "2 / 1 replicas"):
    assert float(re.search(rf"^{re.escape(name)}: ([\d.]+)$", out, re.M).group(1)) > 0, out
