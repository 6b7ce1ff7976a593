"""tools.doctor, the benchmarks (step, input, accuracy) and tools.predict as a user runs them (subprocesses, the
smoke config), and predict's streaming and output files."""

import csv
import json
import os
import re
import struct
import subprocess
import sys

from absl import flags
import keras
import numpy as np
import pytest
import tensorflow as tf

from configs import deep
from configs import mlp
from pipeline import cifar10
from pipeline import manifest as manifest_lib
from pipeline import ops
from tests import trainer_overrides
from tools import benchmark_accuracy
from tools import benchmark_input
from tools import benchmark_step
from tools import convert
from tools import converted
from tools import doctor
from tools import evaluate as evaluate_tool
from tools import predict as predict_tool
from tools import report
from tools import run_status
from trainer import export as export_lib
from trainer import layers as layers_lib
from trainer import models
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


def test_doctor_budget_times_the_steps_after_the_first_traced_one():
  """The budget went from before the model was built: on a loaded CI host (2026-12-07) building and tracing
  took all 30 s of it and doctor timed no step. 2 s hold 2 steps of 32 images, not the tracing (9 s here);
  a budget too short for any step still times one."""
  config, strategy = deep.get_config("smoke"), tf.distribute.MirroredStrategy(["/cpu:0"])
  for budget, steps, timed in ((2.0, 2, 2), (1e-6, 3, 1)):
    done, rate, first, loss = doctor.time_step(config, strategy, "float32", steps=steps, budget=budget)
    assert (done, np.isfinite(loss)) == (timed, True) and rate > 0 and first > 0, budget


@pytest.mark.parametrize("override,expected", [
    ("--config.global_batch_size=0", "global_batch_size=0 must be an integer >= 1"),  # was a FAIL line of TF's words
    ("--config.mixed_precision=fp8", "mixed_precision='fp8' is not one of: "),
])
def test_doctor_refuses_a_config_the_trainer_would_refuse_before_any_check(program, override, expected):
  result = program(doctor, SMOKE, override)
  assert result.returncode == 1 and result.stdout == "", result
  assert result.stderr.strip().splitlines()[-1].startswith(f"doctor: error: {expected}"), result.stderr


def test_doctor_fails_a_step_that_diverges():
  result = _tool("tools.doctor", SMOKE, "--config.optimizer.learning_rate=1e30", "--steps=5", "--budget_secs=30")
  assert result.returncode == 1, result.stdout + result.stderr
  assert re.search(r"^FAIL step float32 +loss is (nan|inf)", result.stdout, re.M), result.stdout
  assert re.match(r"doctor: \d check\(s\) failed \(step float32", result.stdout.splitlines()[-1])


@pytest.mark.slow
def test_benchmark_step_prints_mfu_fit_replica_ratios_kernels_layers_and_ops(synthetic_dir):
  """Every part of the tool in one run (each run pays TensorFlow's start-up, the peak probe and the step's
  tracing again)."""
  result = _tool("tools.benchmark_step", SMOKE, f"--config.data_dir={synthetic_dir}", "--steps=1", "--windows=1",
                 "--probe_secs=0.1", "--kernels", "--layers", "--ops",
                 "--config.model.whiten_bias_epochs=1")  # of 2 epochs: the later, frozen, wins the tie
  assert result.returncode == 0, result.stderr[-3000:]
  assert "is deprecated" not in result.stderr, result.stderr[-3000:]  # TensorFlow's, from the FLOP count's profiler
  out = result.stdout
  flops = float(re.search(r"^train step of epoch 1 \(1 trainable variables frozen by then; model.fit trains "
                           r"them all\): ([\d.]+) GFLOP per image", out, re.M).group(1))
  forward = float(re.search(r"forward ([\d.]+) counted", out).group(1))
  unmade = float(re.search(r"less ([\d.]+) of gradient products not made", out).group(1))
  assert flops >= 3 * forward - unmade > 0 and unmade > 0  # the frozen whitening conv's gradients at least
  compute = benchmark_step.COMPUTE_DTYPES[precision.choose(precision.detect())[0]].name  # what `auto` picks here
  assert re.search(rf"peak probe, conv 3x3 \(500x15x15x256 -> 256\) in {compute}: [\d,]+ GFLOP/s sustained, "
                   r"[\d,]+ its fastest call \(medians of the windows\)", out), out
  assert re.search(rf"peak probe, conv as group0_conv0 \(250x\d+x\d+x\d+ -> \d+\) in {compute}: [\d,]+ GFLOP/s",
                   out), out  # the model's own shapes
  assert re.search(r"^peak probe \(the fastest of each window\) +median +[\d,.]+ +min +[\d,.]+ +max +[\d,.]+ GFLOP/s$",
                   out, re.M), out
  assert re.search(r"^peak: (conv|matmul) .+, the probe of the highest median: median +[\d,.]+ +min +[\d,.]+ +max "
                   r"+[\d,.]+ GFLOP/s$", out, re.M), out
  assert re.search(r"^\(MFU against each window's fastest probe instead: [\d.]+; against the fastest single call "
                   r"of its 0.1 s of probes: [\d.]+\)$", out, re.M), out
  for name in ("MFU", "custom loop / fit", "custom loop at epoch 0 (the variables fit trains) / fit",
               "2 / 1 replicas"):
    assert float(re.search(rf"^{re.escape(name)}: ([\d.]+)$", out, re.M).group(1)) > 0, out
  lines = out.strip().splitlines()
  assert sum(l.startswith("train step, ") for l in lines) == 2
  assert any(re.fullmatch(r"fast / keras: \d+\.\d\d", l) for l in lines)
  layers = {l.split()[0] for l in lines[lines.index(next(l for l in lines if l.startswith("layer "))) + 1:]
            if re.match(r"\w+ +[\dx]+ +[\d.]+ +[\d.]+ +[\d.]+$", l)}
  assert {"whiten", "group0_conv0", "group0_bn0", "logits"} <= layers, lines
  # The op profile of the real step: in bf16 smoke's 15x15 group takes oneDNN's kernel gradient (its 7x7
  # group the shifted matmuls), in float32 every kernel gradient is forward convs (layers.Conv2D).
  assert re.match(r"op profile: [\d.]+ s of ops summed over threads in [\d.]+ s of wall time, 32 images",
                  next(l for l in lines if l.startswith("op profile:")))
  shares = {l.rsplit(None, 2)[0]: float(l.rsplit(None, 1)[1].rstrip("%")) for l in lines
            if re.match(r".+ +[\d.]+ +[\d.]+%$", l)}
  # Only entries of 5% and more alone: a one-step profile is ~0.02 s of ops, and under load smaller ones fell
  # under the tool's 0.5% cut (the 7x7 group's backward matmuls at ~1.1%, its forward conv at ~1.9%).
  # float32: layers.Conv2D's own, compiled by XLA; bf16: TensorFlow's own
  kernel_gradient = "Conv2D (kernel gradient, XLA)" if compute == "float32" else "Conv2DBackpropFilter"
  assert {kernel_gradient, "group0_conv0 backward", "group1_conv0 backward", "optimizer",
          "XLA (GELU, max-pool gradient)"} <= set(shares), lines
  if compute == "float32":
    assert not any(op.startswith("Conv2DBackpropFilter") for op in shares), lines
  assert all(0 <= share <= 100 for share in shares.values())


def test_benchmark_step_refuses_an_epoch_the_config_does_not_train(synthetic_dir):
  result = _tool("tools.benchmark_step", SMOKE, f"--config.data_dir={synthetic_dir}", "--config.num_epochs=2",
                 "--epoch=2")
  assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr[-2000:]
  assert result.stderr.strip().splitlines()[-1] == "benchmark_step: error: --epoch=2: the config trains epochs 0 to 1"


@pytest.mark.parametrize("tool", [benchmark_step, benchmark_input])
@pytest.mark.parametrize("override,expected", [
    ("--config.data_dir=", "data_dir is empty: set --config.data_dir"),  # was a ManifestError traceback
    ("--config.data_dir={tmp}/none", "{tmp}/none/manifest.json: not found"),
    ("--config.global_batch_size=0", "global_batch_size=0 must be an integer >= 1"),  # was a ZeroDivisionError
    ("--config.global_batch_size=5000 --config.steps_per_epoch=0",  # was a ZeroDivisionError or an IndexError
     "global_batch_size=5000 is larger than the train split (600 images)"),
    ("--config.model.name=vit", "model.name='vit' is not one of: "),  # was a ValueError after the first lines
    ("--config.augment.flip=sideways", "augment.flip='sideways' is not one of: "),
])
def test_the_benchmarks_refuse_a_bad_data_dir_or_config_in_one_line(program, synthetic_dir, tmp_path, tool, override,
                                                                     expected):
  name = tool.__name__.rsplit(".", 1)[-1]
  override = override.format(tmp=tmp_path)
  if not override.startswith("--config.data_dir"):
    override = f"--config.data_dir={synthetic_dir} {override}"
  result = program(tool, SMOKE, *override.split())
  assert result.returncode == 1 and result.stdout == "", result
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f"{name}: error: {expected.format(tmp=tmp_path)}"), result.stderr


@pytest.mark.parametrize("flag", ["--warmup=-1", "--windows=0", "--batches=0", "--steps=-1"])
def test_benchmark_input_flags_out_of_range_are_named(program, flag):
  with pytest.raises(flags.IllegalFlagValueError, match=f"^flag {re.escape(flag)}: "):
    program(benchmark_input, SMOKE, flag)


def test_alternating_windows_rotate_the_order_every_round():
  """No variant always runs right after the same other: A B C, B C A, C A B, A B C, after a warm-up round
  whose rates are dropped."""
  calls = []
  measures = {name: (lambda name=name: calls.append(name) or float(len(calls))) for name in "ABC"}
  rates = benchmark_input.alternating_windows(measures, 3)
  assert "".join(calls) == "ABC" "BCA" "CAB" "ABC"
  assert rates == {"A": [6.0, 8.0, 10.0], "B": [4.0, 9.0, 11.0], "C": [5.0, 7.0, 12.0]}


def test_sustained_seconds_time_calls_back_to_back_for_the_span_and_twice_at_least(monkeypatch):
  """On a clock that each call moves by its own duration: calls until the span is covered, two at least."""
  now, calls = [0.0], []
  monkeypatch.setattr(benchmark_step.time, "perf_counter", lambda: now[0])

  def run(durations=(0.5, 0.1, 0.5, 9.0)):
    now[0] += durations[len(calls)]
    calls.append(None)

  assert benchmark_step._sustained_seconds(run, 0.8) == pytest.approx((1.1 / 3, 0.1))  # 0.6 s fell short
  assert len(calls) == 3
  calls.clear()
  benchmark_step._sustained_seconds(run, 0.0)
  assert len(calls) == 2


def test_training_flops_count_the_dense_products_each_step_makes(synthetic_dir):
  """A dense net's FLOPs are its products: 2 x in x out per layer and image forward, x3 with the backward
  pass, less the first layer's input gradient (the images need none) (+ a bias add per output the profiler
  counts too), times the images of every step of the run."""
  config = mlp.get_config("smoke")
  config.data_dir = synthetic_dir
  manifest = manifest_lib.load(synthetic_dir)
  widths = [32 * 32 * 3, *config.model.dense, 10]
  products = sum(2 * a * b for a, b in zip(widths, widths[1:]))
  made = 3 * products - 2 * widths[0] * widths[1]
  images = config.num_epochs * config.steps_per_epoch * config.global_batch_size
  flops = benchmark_step.training_flops(config, manifest)
  assert made * images <= flops <= (made + 3 * sum(widths[1:])) * images


def test_the_step_flops_leave_out_the_gradients_of_frozen_layers_and_of_what_feeds_them():
  """deep.py: the whitening conv's kernel is frozen and its input is the images, so neither of its gradient
  products is made; once its bias freezes (epoch 3 of 10), group0_conv0's input gradient is not either.
  The benchmark runs the step most epochs run: epoch 3's."""
  config = deep.get_config()
  model = models.build(config.model)
  by_name = {layer.name: layer for layer in model.layers}
  product = lambda name: 2.0 * np.prod(by_name[name].output.shape[1:]) * np.prod(by_name[name].kernel.shape[:-1])
  whitening = next(layer.name for layer in model.layers if isinstance(layer, layers_lib.PatchWhitening))
  assert config.model.whiten_bias_epochs == 3 and config.num_epochs == 10
  for epoch in (0, 2):
    assert benchmark_step.unmade_gradient_flops(model, epoch) == pytest.approx(2 * product(whitening))
  for epoch in (3, 9):
    assert benchmark_step.unmade_gradient_flops(model, epoch) == pytest.approx(
        2 * product(whitening) + product("group0_conv0"))
  assert benchmark_step.run_epoch(model, config.num_epochs) == 3
  assert benchmark_step.run_epoch(model, 5) == 0  # 3 epochs train the bias, 2 do not
  assert benchmark_step.run_epoch(model, 6) == 3  # a tie: the later set
  per_epoch = [benchmark_step.step_flops(config, model, epoch)[0] for epoch in (0, 3)]
  assert per_epoch[0] - per_epoch[1] == pytest.approx(product("group0_conv0"))


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  """configs/mlp.py:smoke, untrained, exported as the trainer exports: predict needs its signatures and class
  names, not its accuracy."""
  keras.mixed_precision.set_dtype_policy("float32")
  path = str(tmp_path_factory.mktemp("mlp") / "export")
  return export_lib.export(models.build(mlp.get_config("smoke").model), path, mean=cifar10.MEAN, std=cifar10.STD,
                           class_names=cifar10.CLASS_NAMES)


def _images(folder, count: int) -> list[str]:
  """`count` PNGs of noise, of other sizes than the model's (predict fits them)."""
  rng = np.random.default_rng(0)
  paths = []
  for i in range(count):
    paths.append(str(folder / f"{i}.png"))
    tf.io.write_file(paths[-1], tf.io.encode_png(rng.integers(0, 256, (24 + 4 * i, 40, 3), dtype=np.uint8)))
  return paths


def _png_header(width: int, height: int) -> bytes:
  """A PNG's signature and IHDR chunk (CRC left 0): what the size check reads; no pixels to decode."""
  return b"\x89PNG\r\n\x1a\n" + struct.pack(">I4sIIBBBBBI", 13, b"IHDR", width, height, 8, 0, 0, 0, 0, 0)


def test_predict_streams_batches_in_input_order(export, tmp_path):
  """The first predictions come when only their batch has been read; batches give what one call on all does."""
  paths = _images(tmp_path, 7)
  taken = []

  def lazily():
    for path in paths:
      taken.append(path)
      yield path

  results = predict_tool.predictions(converted.load(export), lazily(), top_k=3, batch_size=3)
  first = next(results)
  assert first.path == paths[0] and taken == paths[:3]
  streamed = [first] + list(results)
  assert [p.path for p in streamed] == paths and not any(p.error for p in streamed)
  whole = predict_tool.predict(export, paths, top_k=3, batch_size=len(paths))
  for prediction, (path, top) in zip(streamed, whole):
    assert prediction.path == path and [n for n, _ in prediction.top] == [n for n, _ in top]
    np.testing.assert_allclose([q for _, q in prediction.top], [q for _, q in top], atol=1e-6)


def test_predict_command_refuses_an_image_above_the_pixel_limit_and_goes_on(export, tmp_path):
  """A 16000 x 16000 PNG (its header: never decoded) and a text file get one line each on stderr in their
  place; the other files are classified, in order, and the exit status is 1."""
  good = _images(tmp_path, 3)
  big, text = tmp_path / "big.png", tmp_path / "notes.png"
  big.write_bytes(_png_header(16000, 16000))
  text.write_text("not an image")
  result = _tool("tools.predict", f"--model={export}", "--batch_size=2", good[0], str(big), good[1], str(text),
                 good[2])
  assert result.returncode == 1, result.stderr[-3000:]
  expected = predict_tool.predict(export, good)
  assert [line.split("\t") for line in result.stdout.splitlines()] == [
      [path, top[0][0], f"{top[0][1]:.4f}"] for path, top in expected]
  assert [line for line in result.stderr.splitlines() if line.startswith("predict:")] == [
      f"predict: error: {big}: 16000x16000 pixels, more than the limit of {ops.MAX_IMAGE_PIXELS:,}: refused "
      "before decoding",
      f"predict: error: {text}: not a PNG, JPEG, BMP or WebP image (GIF and JPEG XL are refused: their size "
      "cannot be read before decoding)"]
  assert "Traceback" not in result.stderr
  with pytest.raises(predict_tool.InputError, match="16000x16000 pixels, more than the limit"):
    predict_tool.predict(export, [good[0], str(big)])


def test_predict_output_files_are_written_whole(export, tmp_path):
  """CSV and JSON lines hold the classified files; a file appears only once complete (a stopped run leaves
  none, nor its temporary file)."""
  paths = _images(tmp_path, 3)
  bad = str(tmp_path / "bad.png")
  tf.io.write_file(bad, b"not an image")
  model = converted.load(export)
  expected = predict_tool.predict(export, paths, top_k=2)
  out = str(tmp_path / "out")
  for suffix in (".csv", ".jsonl"):
    results = predict_tool.predictions(model, [paths[0], bad, *paths[1:]], top_k=2, batch_size=2)
    assert predict_tool.write_predictions(results, out + suffix, top_k=2) == 1
  with open(out + ".csv", newline="") as f:
    rows = list(csv.reader(f))
  assert rows[0] == ["file", "class", "probability", "class_2", "probability_2"]
  with open(out + ".jsonl") as f:
    lines = [json.loads(line) for line in f]
  for row, line, (path, top) in zip(rows[1:], lines, expected, strict=True):  # other batches: float noise
    assert row[0] == line["file"] == path and row[1::2] == line["classes"] == [n for n, _ in top]
    np.testing.assert_allclose([float(q) for q in row[2::2]], [q for _, q in top], atol=1e-6)
    np.testing.assert_allclose(line["probabilities"], [q for _, q in top], atol=1e-6)

  def stopped():
    yield from predict_tool.predictions(model, paths[:1])
    raise KeyboardInterrupt
  with pytest.raises(KeyboardInterrupt):
    predict_tool.write_predictions(stopped(), str(tmp_path / "stopped.csv"))
  assert sorted(os.listdir(tmp_path)) == sorted(["0.png", "1.png", "2.png", "bad.png", "out.csv", "out.jsonl"])


@pytest.mark.slow
def test_benchmark_predict_measures_memory_order_and_streaming(export):
  result = _tool("tools.benchmark_predict", f"--model={export}", "--files=20", "--batch_size=4")
  assert result.returncode == 0, result.stdout + result.stderr[-3000:]
  lines = result.stdout.splitlines()
  assert re.match(r"^20 files +[\d,]+ +[\d.]+ +[\d.]+ +[\d.]+ +[\d,]+$", lines[3]), lines
  assert lines[-4:-1] == [
      lines[-4], "OK  output in input order (20 lines)", "OK  first line printed before the last file was read"]
  assert lines[-4].startswith("OK  max RSS within 300 MB of one file's")
  assert re.match(r"^max RSS difference: -?\d+ MB$", lines[-1])


@pytest.mark.parametrize("args,expected", [
    (("--runs=0",), "flag --runs=0: 0 is not a positive integer"),  # was a StatisticsError after nothing ran
    (("--first_seed=-1",), "flag --first_seed=-1: -1 is not a non-negative integer"),
])
def test_benchmark_accuracy_flags_out_of_range_are_named(program, args, expected):
  with pytest.raises(flags.IllegalFlagValueError, match=f"^{re.escape(expected)}$"):
    program(benchmark_accuracy, SMOKE, *args)


@pytest.mark.parametrize("args,expected", [
    (("--data_dir=",), "--data_dir is empty"),  # was shards written to the current directory
    (("--source={tmp}/none.tar.gz",), "{tmp}/none.tar.gz: "),  # was a SourceError traceback
    (("--data_dir={tmp}/file",), "--data_dir={tmp}/file is a file, not a directory"),
    (("--workdir={tmp}/file",), "--workdir={tmp}/file is a file, not a directory"),  # was a FileExistsError
    (("--workdir={tmp}/file/runs", "--data_dir={data}"), "[Errno 20] Not a directory: "),  # was a traceback
    (("--config.global_batch_size=0",), "global_batch_size=0 must be an integer >= 1"),  # was after the shards
    (("--config.optimizer.name=lion",), "optimizer.name='lion' is not one of: "),  # was "run 0 failed" after them
])
def test_benchmark_accuracy_refuses_a_bad_data_dir_source_or_config_in_one_line(program, synthetic_dir, tmp_path,
                                                                                  monkeypatch, args, expected):
  (tmp_path / "file").write_text("precious")
  monkeypatch.chdir(tmp_path)  # where an empty --data_dir wrote its shards
  source = ROOT + "/tests/no-such-source.tar.gz"  # not read: each case stops before the shards
  result = program(benchmark_accuracy, f"--config={ROOT}/configs/deep.py:smoke", f"--workdir={tmp_path}/runs",
                   f"--data_dir={tmp_path}/data",
                   f"--source={source}", *(a.format(tmp=tmp_path, data=synthetic_dir) for a in args))
  assert result.returncode == 1 and result.stdout == "", result
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith(f"benchmark_accuracy: error: {expected.format(tmp=tmp_path)}"), result.stderr
  assert sorted(os.listdir(tmp_path)) == ["file"] and (tmp_path / "file").read_text() == "precious"


@pytest.mark.parametrize("tool,flag", [
    (evaluate_tool, "--model="), (evaluate_tool, "--data_dir="), (predict_tool, "--model="), (convert, "--model="),
    (report, "--workdir="), (run_status, "--workdir="),
])
def test_an_empty_path_flag_is_named_not_read_as_the_current_directory(program, tool, flag):
  required = {evaluate_tool: ["--model=m", "--data_dir=d"], convert: ["--model=m", "--to=onnx"],
              predict_tool: ["--model=m"]}.get(tool, ["--workdir=w"])
  with pytest.raises(flags.IllegalFlagValueError, match=f"^flag {re.escape(flag)}: empty: give a path$"):
    program(tool, *required, flag)


@pytest.mark.slow
def test_benchmark_accuracy_tool_resumes_in_its_workdir(synthetic_dir, tmp_path):
  command = [sys.executable, "-m", "tools.benchmark_accuracy", "--config=configs/deep.py:smoke", "--runs=1",
             f"--data_dir={synthetic_dir}", f"--workdir={tmp_path}", "--config.num_epochs=1",
             "--config.steps_per_epoch=2", *(f"--config.{k}={v}" for k, v in trainer_overrides.LEAN.items())]
  runs = [subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300) for _ in range(2)]
  for result in runs:
    assert result.returncode == 0, result.stderr[-2000:]
  first, second = (r.stdout.splitlines() for r in runs)
  config = deep.get_config("smoke")
  config.update(data_dir=synthetic_dir, num_epochs=1, steps_per_epoch=2)
  pflop = benchmark_step.training_flops(config, manifest_lib.load(synthetic_dir)) / 1e15
  assert first[0] == f"training compute: {pflop:.3g} PFLOP per run (tools.benchmark_step's count)", first
  assert re.fullmatch(r"run 0: validation accuracy [01]\.\d{4} \(\d+/200, from the export\), wall time \d+ s",
                      first[1]), first
  assert first[-1] == first[0].split(" (")[0], first
  assert second[1].endswith("(resumed: this invocation only)") and "(some runs resumed)" in second[-3], second
  with open(tmp_path / "run0.log") as f:
    log = f.read()
  assert "benchmark_accuracy: starting run 0" in log and "benchmark_accuracy: resuming run 0" in log


@pytest.mark.slow
def test_benchmark_input_tool(synthetic_dir):
  result = subprocess.run(
      [sys.executable, "-m", "tools.benchmark_input", "--config=configs/deep.py:smoke",
       f"--config.data_dir={synthetic_dir}", "--warmup=1", "--windows=2", "--batches=3", "--steps=1"],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert any(l.startswith("train pipeline / per-example pipeline:") for l in lines)
  assert any(l.startswith("train step with the pipeline / on a cached batch:") for l in lines)
  assert re.fullmatch(r"images/s: \d+", lines[-1])


@pytest.mark.parametrize("content,code,out", [
    ('{"status": "stopped by SIGTERM"}', 0, "stopped by SIGTERM\n"), (None, 1, ""), ("{", 1, "")])
def test_run_status_prints_the_status_or_one_line_and_exit_1(tmp_path, content, code, out):
  """What deploy/slurm/train.sbatch asks after each start; a local read imports no TensorFlow."""
  if content is not None:
    (tmp_path / "run.json").write_text(content)
  done = subprocess.run([sys.executable, "-X", "importtime", "-m", "tools.run_status", f"--workdir={tmp_path}"],
                        cwd=ROOT, capture_output=True, text=True, timeout=60)
  assert (done.returncode, done.stdout) == (code, out), done.stderr[-2000:]
  errors = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
  assert errors == ([] if code == 0 else [f"run_status: error: {tmp_path}/run.json: no run status "
                                          f"({'FileNotFoundError' if content is None else 'JSONDecodeError'})"])
  assert "tensorflow" not in [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()]
