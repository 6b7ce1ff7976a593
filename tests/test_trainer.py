"""trainer/: one step on 2 replicas equals 1 replica; a smoke run end to end with its export; resume; NaN."""

import glob
import importlib
import io
import json
import os
import re
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
import tensorflow as tf

from configs import deep
from configs import default
from pipeline import input_pipeline
from pipeline import manifest as manifest_lib
from pipeline import ops
from pipeline import records
from tools import evaluate as evaluate_tool
from tools import predict as predict_tool
from tools import report as report_tool
from trainer import distribute
from trainer import export as export_lib
from trainer import models
from trainer import optim
from trainer import data
from trainer import evaluation
from trainer import steps
from trainer import train
from trainer import views

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REQUIRED_KEYS = ("data_dir", "num_epochs", "global_batch_size", "seed", "deterministic", "mixed_precision",
                 "logical_cpus")


def _smoke(data_dir, **overrides):
  config = deep.get_config("smoke")
  config.data_dir = data_dir
  config.update(overrides)
  return config


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_every_config_loads(path):
  name = os.path.basename(path)[:-3]
  if name == "__init__":
    return
  module = importlib.import_module(f"configs.{name}")
  for arg in (None, "smoke"):
    config = module.get_config(arg)
    for key in REQUIRED_KEYS:
      assert key in config, f"{name}: {key}"
    assert config.mixed_precision in ("float32", "mixed_float16", "mixed_bfloat16", "auto")
    models.build(config.model)
  with pytest.raises(ValueError, match="unknown config variant"):
    module.get_config("nope")


@pytest.mark.parametrize("arg,widths,optimizer", [
    (None, (128, 384, 384), "muon"), ("airbench94", (64, 256, 256), "muon"), ("sgd", (64, 256, 256), "sgd"),
    ("airbench94,smoke", (8, 16), "muon")])
def test_deep_variants(arg, widths, optimizer):
  config = deep.get_config(arg)
  assert (config.model.widths, config.optimizer.name) == (widths, optimizer)
  if optimizer == "muon" and "smoke" not in (arg or ""):
    assert config.model.logit_scale == 1 / widths[-1]  # airbench94_muon divides by the last width


CONFIG_NAMES = sorted(os.path.basename(p)[:-3] for p in glob.glob(os.path.join(ROOT, "configs", "*.py"))
                      if not p.endswith("__init__.py"))


@pytest.mark.parametrize("name", [n for n in CONFIG_NAMES if n != "default"])
def test_every_config_trains_a_few_steps(name, synthetic_dir, tmp_path):
  config = importlib.import_module(f"configs.{name}").get_config("smoke")
  config.update(data_dir=synthetic_dir, num_epochs=1, steps_per_epoch=2, export=False)
  metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(metrics["train"]["loss"]) and metrics["validation"]["count"] == 200


def _one_step(strategy, config, images, labels):
  state = steps.make_state(config, strategy, steps_per_epoch=10)
  models.initialize_from_data(state.model, lambda: images)
  initial = [v.numpy() for v in state.model.weights]
  dataset = strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensors({"images": images, "labels": labels}).repeat())
  steps.Learner(config, strategy, state).train(iter(dataset), 1, 0)
  return initial, [v.numpy() for v in state.model.weights]


@pytest.mark.parametrize("module,clip_norm", [(default, 0.0), (default, 0.05), (deep, 0.0)],
                         ids=["resnet", "resnet_clipped", "airbench"])
def test_one_step_on_two_replicas_equals_one_replica(module, clip_norm):
  config = module.get_config("smoke")
  config.mixed_precision = "float32"  # bf16 rounding differs with the batch split
  config.optimizer.clip_norm = clip_norm  # clipping must use the global gradient's norm on any layout
  config.model.sync_bn = True  # batch statistics over the global batch, as on one replica
  config.optimizer.warmup_epochs = 0.0
  rng = np.random.default_rng(0)
  images = tf.constant(rng.normal(size=(32, 32, 32, 3)), tf.float32)
  labels = tf.constant(rng.integers(0, 10, 32), tf.int64)
  single = distribute.make_strategy(config)
  config.logical_cpus = 2
  double = distribute.make_strategy(config)
  assert (single.num_replicas_in_sync, double.num_replicas_in_sync) == (1, 2)
  init1, one = _one_step(single, config, images, labels)
  init2, two = _one_step(double, config, images, labels)
  for a, b in zip(init1, init2):
    np.testing.assert_array_equal(a, b)
  assert any(not np.allclose(a, b) for a, b in zip(init1, one))  # the step did change the weights
  for a, b in zip(one, two):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("module", [default, deep], ids=["resnet", "airbench"])
@pytest.mark.parametrize("knob", ["jit_compile", "keras_layers"])
def test_step_variants_equal_the_plain_step_on_two_replicas(module, knob):
  """jit_compile compiles each replica's forward and backward pass (the iterator and the cross-replica
  update cannot be compiled); model.fast_kernels=False trains with Keras's own BatchNormalization and
  Activation instead of the fused kernel and XLA GELU. Either takes the plain step, up to float reordering."""
  config = module.get_config("smoke")
  config.mixed_precision = "float32"
  config.logical_cpus = 2
  config.optimizer.warmup_epochs = 0.0
  rng = np.random.default_rng(1)
  images = tf.constant(rng.normal(size=(32, 32, 32, 3)), tf.float32)
  labels = tf.constant(rng.integers(0, 10, 32), tf.int64)
  strategy = distribute.make_strategy(config)
  init, plain = _one_step(strategy, config, images, labels)
  if knob == "jit_compile":
    config.jit_compile = True
  else:
    config.model.fast_kernels = False
  init_variant, variant = _one_step(strategy, config, images, labels)
  for a, b in zip(init, init_variant):
    np.testing.assert_array_equal(a, b)
  assert any(not np.allclose(a, b) for a, b in zip(init, plain))
  for a, b in zip(plain, variant):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module", params=[2, 1], ids=["2replicas", "1replica"])
def trained(request, smoke_runs):
  """The smoke config trained on 2 replicas and on 1, exported (conftest.smoke_runs)."""
  return smoke_runs(request.param)


def test_smoke_run_writes_checkpoint_summaries_export_and_run_files(trained):
  workdir, _, _ = trained
  assert tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints")).endswith("ckpt-8")
  events = glob.glob(os.path.join(workdir, "summaries", "events.out.tfevents.*"))
  assert events
  tags = {v.tag for e in tf.data.TFRecordDataset(events) for v in tf.compat.v1.Event.FromString(
      e.numpy()).summary.value}
  assert {"train/loss", "train/accuracy", "train/learning_rate", "train/images_per_sec", "train/epoch_seconds",
          "input/images_per_sec", "validation/accuracy", "validation/loss", "train/augmented_inputs",
          "validation/confusion_matrix", "validation/worst_misclassified", "_hparams_/experiment",
          "_hparams_/session_start_info"} <= tags
  assert glob.glob(os.path.join(workdir, "summaries", "plugins", "profile", "*", "*.xplane.pb"))  # profile_steps
  assert os.path.exists(os.path.join(workdir, "export", "saved_model.pb"))
  config = json.load(open(os.path.join(workdir, "config.json")))
  run = json.load(open(os.path.join(workdir, "run.json")))
  assert run["end_step"] == 8 and run["distribution"]["replicas"] == max(config["logical_cpus"], 1)
  assert run["metrics"]["test"]["count"] == 200
  assert not [n for n in os.listdir(workdir) if n.startswith(".tmp")]
  timing = run["timing"]  # 2 epochs of 4 steps, loops of 2: validation and a checkpoint after each epoch
  assert timing["train_loops"] == 4 and timing["first_loop_steps"] == 2
  assert {k: v["runs"] for k, v in timing["actions"].items()} == {
      "train_summaries": 4, "validation": 1, "validation_figures": 1, "checkpoint": 2}  # the last: final evaluation
  parts = (timing["final_evaluation_secs"], timing["export_secs"])
  assert 0 < min(parts) and sum(parts) <= timing["last_step_to_export_secs"]
  assert 0 < timing["train_loop_secs"] and 0 < timing["start_to_first_step_secs"]


@pytest.mark.parametrize("split", ["validation", "test"])
def test_evaluate_tool_on_export_matches_trainer(trained, split):
  workdir, metrics, config = trained
  correct, total = evaluate_tool.evaluate(os.path.join(workdir, "export"), config.data_dir, split, 64)
  assert total == metrics[split]["count"]
  assert abs(correct / total - metrics[split]["accuracy"]) < 1e-6


def test_signatures_agree_with_the_trained_model(trained):
  workdir, _, config = trained
  manifest = manifest_lib.load(config.data_dir)
  mean, std = manifest_lib.normalization(manifest)
  images = next(iter(input_pipeline.build_eval_dataset(config.data_dir, "test", batch_size=16)))["images"]
  keras.mixed_precision.set_dtype_policy(export_lib.PRECISIONS[config.export_precision])  # float32: not bf16
  model = models.build(config.model)
  # The trained model: the last checkpoint's weights moved onto their lookahead average (as the trainer
  # does after the last step), seen through the config's test-time views.
  lookahead = optim.Lookahead(model.variables, 5, 0.5, 8) if config.optimizer.lookahead_every else None
  tf.train.Checkpoint(model=model, **({"lookahead": lookahead.averages} if lookahead else {})).restore(
      tf.train.latest_checkpoint(os.path.join(workdir, "checkpoints"))).expect_partial()
  if lookahead:
    lookahead.finish()
  # Traced, as the export is: TF then fuses the same kernels (conv + BatchNorm) in both, which round alike
  # (run eagerly, the model differed from the export by up to 2.6e-3 in bf16).
  trained_model = tf.function(lambda x: tf.nn.softmax(views.logits(model, x, config.tta)))
  expected = trained_model(ops.normalize(images, mean, std)).numpy()

  loaded = export_lib.load(os.path.join(workdir, "export"))
  out = loaded.signatures["serving_default"](images=images)
  np.testing.assert_allclose(out["probabilities"].numpy(), expected, atol=1e-6)  # trained in bf16, served in float32
  assert out["classes"].dtype == tf.int64 and out["probabilities"].shape == (16, 10)
  np.testing.assert_array_equal(out["classes"].numpy(), out["probabilities"].numpy().argmax(1))
  expected = out["probabilities"].numpy()  # the three signatures run the same graph: equal to 1e-6
  png = tf.stack([tf.io.encode_png(i) for i in images])
  by_bytes = loaded.signatures["serve_bytes"](image_bytes=png)
  np.testing.assert_allclose(by_bytes["probabilities"].numpy(), expected, atol=1e-6)
  serialized = tf.constant([records.serialize_example(i.numpy().tobytes(), "raw", 0, f"x{n}")
                            for n, i in enumerate(images)])
  by_examples = loaded.signatures["serve_examples"](examples=serialized)
  np.testing.assert_allclose(by_examples["probabilities"].numpy(), expected, atol=1e-6)
  assert [n.decode() for n in loaded.class_names.numpy()] == list(manifest_lib.class_names(manifest))


def test_predict_tool(trained, tmp_path):
  workdir, _, config = trained
  manifest = manifest_lib.load(config.data_dir)
  images = next(iter(input_pipeline.build_eval_dataset(config.data_dir, "test", batch_size=3)))["images"]
  paths = []
  for i, image in enumerate(images):
    paths.append(str(tmp_path / f"{i}.png"))
    tf.io.write_file(paths[-1], tf.io.encode_png(image))
  results = predict_tool.predict(os.path.join(workdir, "export"), paths, top_k=3)
  out = export_lib.load(os.path.join(workdir, "export")).signatures["serving_default"](images=images)
  names = manifest_lib.class_names(manifest)
  probabilities = out["probabilities"].numpy()
  for (path, top), p, row in zip(results, paths, probabilities):
    assert path == p and len(top) == 3
    assert [name for name, _ in top] == [names[c] for c in np.argsort(-row, kind="stable")[:3]]
    np.testing.assert_allclose([q for _, q in top], np.sort(row)[::-1][:3], atol=1e-6)


@pytest.mark.parametrize("tool,flag,expected", [
    ("tools.evaluate", "--batch_size=0", "flag --batch_size=0: 0 is not a positive integer"),  # was a traceback
    ("tools.predict", "--top_k=0", "flag --top_k=0: 0 is not a positive integer"),  # printed no class at all
])
def test_tool_flags_out_of_range_are_named(trained, tmp_path, tool, flag, expected):
  workdir, _, config = trained
  image = str(tmp_path / "x.png")
  tf.io.write_file(image, tf.io.encode_png(tf.zeros([40, 30, 3], tf.uint8)))
  args = [f"--data_dir={config.data_dir}"] if tool == "tools.evaluate" else [image]
  result = subprocess.run([sys.executable, "-m", tool, f"--model={workdir}/export", flag, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1 and expected in result.stderr and "Traceback" not in result.stderr, result.stderr


@pytest.mark.slow
def test_rest_json_requests_match_the_signatures(trained, tmp_path):
  import base64  # pylint: disable=g-import-not-at-top
  workdir, _, config = trained
  export = os.path.join(workdir, "export")
  images = next(iter(input_pipeline.build_eval_dataset(config.data_dir, "test", batch_size=4)))["images"]
  loaded = export_lib.load(export)
  expected = loaded.signatures["serving_default"](images=images)["probabilities"].numpy()
  rows = images.numpy().tolist()
  png = [{"b64": base64.b64encode(tf.io.encode_png(i).numpy()).decode()} for i in images]
  requests = {
      "row": {"instances": rows},
      "row_named": {"instances": [{"images": r} for r in rows]},
      "columnar": {"inputs": {"images": rows}},
      "bytes": {"signature_name": "serve_bytes", "instances": png},
  }
  for kind, request in requests.items():
    answer = predict_tool.rest_predict(loaded, request)
    got = (answer["outputs"]["probabilities"] if "outputs" in answer
           else [p["probabilities"] for p in answer["predictions"]])
    np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=kind)
  # The command line, as a user would pipe a request body, prints the same answer.
  path = tmp_path / "request.json"
  path.write_text(json.dumps(requests["row"]))
  result = subprocess.run([sys.executable, "-m", "tools.predict", f"--model={export}", f"--json={path}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  np.testing.assert_allclose([p["probabilities"] for p in json.loads(result.stdout)["predictions"]], expected,
                             atol=1e-6)
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"instances": [{"pixels": rows[0]}]}))
  result = subprocess.run([sys.executable, "-m", "tools.predict", f"--model={export}", f"--json={bad}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == ("predict: error: signature serving_default takes input(s) "
                                                    "images; the request has pixels")


def test_saved_model_cli_lists_the_signatures(trained):
  workdir, _, _ = trained
  cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
  shown = subprocess.run([cli, "show", "--dir", os.path.join(workdir, "export"), "--all"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
  for needle in ("signature_def['serving_default']", "signature_def['serve_bytes']",
                 "signature_def['serve_examples']", "inputs['images'] tensor_info:", "dtype: DT_UINT8",
                 "inputs['image_bytes'] tensor_info:", "inputs['examples'] tensor_info:", "dtype: DT_STRING",
                 "outputs['probabilities'] tensor_info:", "dtype: DT_FLOAT", "outputs['classes'] tensor_info:",
                 "dtype: DT_INT64"):
    assert needle in shown, needle


def test_evaluation_counts_confusion_and_worst_images(synthetic_dir):
  """The confusion matrix adds up to the metrics, and the worst images are the misclassified ones with the
  highest loss over the whole split (across replicas and batches), checked against the model run eagerly."""
  config = _smoke(synthetic_dir, logical_cpus=2)
  strategy = distribute.make_strategy(config)
  state = steps.make_state(config, strategy, steps_per_epoch=4)
  manifest = manifest_lib.load(synthetic_dir)
  dataset = data.eval_dataset(config, strategy, manifest, "test")
  metrics, details = evaluation.Evaluator(strategy, state, 10).evaluate(dataset, worst=5)
  matrix, worst = details["confusion"], details["worst"]
  assert matrix.sum() == metrics["count"] == 200
  assert np.trace(matrix) == round(metrics["accuracy"] * 200)
  mean, std = data.normalization_for(config, manifest)
  everything = next(iter(input_pipeline.build_eval_dataset(synthetic_dir, "test", batch_size=200, mean=mean, std=std)))
  logits = state.model(everything["images"], training=False)
  loss = steps.cross_entropy(everything["labels"], logits, 0.0).numpy()
  wrong = np.argmax(logits, -1) != everything["labels"].numpy()
  expected = np.sort(loss[wrong])[::-1][:5]
  assert len(worst["labels"]) == 5 and np.all(worst["labels"] != worst["predicted"])
  np.testing.assert_allclose(worst["loss"], expected, rtol=1e-4)
  assert worst["images"].shape == (5, 32, 32, 3)


@pytest.mark.parametrize("replicas", [1, 2])
def test_bn_statistics_are_the_average_batch_moments(synthetic_dir, replicas):
  """Re-estimated BatchNorm statistics equal each layer's input moments in training mode, per replica
  batch, averaged over the batches and replicas: checked against the model run eagerly on the same images."""
  config = _smoke(synthetic_dir, logical_cpus=replicas if replicas > 1 else 0, mixed_precision="float32",
                  bn_statistics_images=64)
  strategy = distribute.make_strategy(config)
  assert strategy.num_replicas_in_sync == replicas
  state = steps.make_state(config, strategy, steps_per_epoch=4)
  manifest = manifest_lib.load(synthetic_dir)
  mean, std = data.normalization_for(config, manifest)
  images = next(iter(input_pipeline.build_eval_dataset(synthetic_dir, "train", batch_size=64, mean=mean, std=std)))
  models.initialize_from_data(state.model, lambda: images["images"])
  layers = [layer for layer in state.model.layers if isinstance(layer, keras.layers.BatchNormalization)]
  probe = keras.Model(state.model.inputs, [layer.input for layer in layers])
  per_replica = 32 // replicas  # global batch 32: each replica normalises by its own share
  moments = [[np.array(tf.nn.moments(x, [0, 1, 2])) for x in probe(images["images"][i:i + per_replica], training=True)]
             for i in range(0, 64, per_replica)]
  expected = [np.mean([m[k] for m in moments], axis=0) for k in range(len(layers))]  # [2, channels] per layer

  batches = evaluation.bn_statistics(strategy, state.model, data.bn_statistics_dataset(config, strategy, manifest))
  assert batches * config.global_batch_size == 64
  for layer, (m, v) in zip(layers, expected):
    assert not np.allclose(m, 0.0)  # differs from the initial statistics: the test can see an assignment
    np.testing.assert_allclose(layer.moving_mean.numpy(), m, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(layer.moving_variance.numpy(), v, rtol=1e-4, atol=1e-5)


def test_progress_bar_on_a_terminal(synthetic_dir, tmp_path, monkeypatch):
  class Terminal(io.StringIO):
    def isatty(self):
      return True

  terminal = Terminal()
  monkeypatch.setattr(sys, "stdout", terminal)
  train.train_and_evaluate(_smoke(synthetic_dir, num_epochs=1, export=False), str(tmp_path / "run"))
  shown = terminal.getvalue()
  assert "4/4" in shown and "loss:" in shown and "images/s:" in shown and "\r" in shown, shown


def test_images_per_sec_leave_out_a_checkpoint_between_reports(synthetic_dir, tmp_path, monkeypatch):
  """Each checkpoint takes 1,000 s here (every clock jumps), one after every step and three between two
  reports: train/images_per_sec must stay the step's rate, not fall to ~0.1 images/s."""
  offset = [0.0]
  for name in ("time", "monotonic", "perf_counter"):
    real = getattr(time, name)
    monkeypatch.setattr(time, name, lambda real=real: real() + offset[0])
  save = tf.train.CheckpointManager.save

  def slow_save(self, *args, **kwargs):
    offset[0] += 1000.0
    return save(self, *args, **kwargs)

  monkeypatch.setattr(tf.train.CheckpointManager, "save", slow_save)
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(_smoke(synthetic_dir, export=False, steps_per_loop=1, log_every_steps=4,
                                  checkpoint_every_steps=1, summary_flush_secs=0.1), workdir)
  rates = report_tool.read_scalars(os.path.join(workdir, "summaries"))["train/images_per_sec"]
  assert [step for step, _ in rates] == [4, 8]
  assert min(rate for _, rate in rates) > 5.0, rates


def test_profile_steps_are_checked(synthetic_dir, tmp_path):
  with pytest.raises(train.TrainingError, match=r"profile_steps=\(5, 2\): give \(first, end\)"):
    train.train_and_evaluate(_smoke(synthetic_dir, profile_steps=(5, 2)), str(tmp_path / "run"))


def test_jit_compile_with_sync_bn_is_refused(synthetic_dir, tmp_path):
  config = _smoke(synthetic_dir, jit_compile=True)
  config.model.sync_bn = True
  with pytest.raises(train.TrainingError, match="jit_compile=True cannot compile model.sync_bn"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_resume_continues_the_step_count(synthetic_dir, tmp_path):
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(_smoke(synthetic_dir, num_epochs=1, export=False), workdir)
  assert json.load(open(os.path.join(workdir, "run.json")))["end_step"] == 4
  train.train_and_evaluate(_smoke(synthetic_dir, num_epochs=2, export=False), workdir)
  run = json.load(open(os.path.join(workdir, "run.json")))
  assert (run["start_step"], run["end_step"]) == (4, 8)


@pytest.mark.parametrize("every, validated_at", [(2, [4, 6]), (0, [6])])  # 6: the final evaluation's point
def test_eval_every_epochs_spaces_the_validation_passes(synthetic_dir, tmp_path, every, validated_at):
  workdir = str(tmp_path / "run")
  metrics = train.train_and_evaluate(_smoke(synthetic_dir, num_epochs=3, steps_per_epoch=2, export=False,
                                            eval_every_epochs=every, summary_flush_secs=0.1), workdir)
  events = glob.glob(os.path.join(workdir, "summaries", "events.out.tfevents.*"))
  steps = sorted(e.step for r in tf.data.TFRecordDataset(events) for e in [tf.compat.v1.Event.FromString(r.numpy())]
                 if any(v.tag == "validation/accuracy" for v in e.summary.value))
  assert steps == validated_at
  assert metrics["validation"]["count"] == 200  # the final evaluation always runs
  assert tf.train.get_checkpoint_state(os.path.join(workdir, "checkpoints")).all_model_checkpoint_paths[-1].endswith(
      "ckpt-6")


def test_non_finite_loss_stops_with_the_step(synthetic_dir, tmp_path):
  config = _smoke(synthetic_dir, export=False)
  config.optimizer.learning_rate = 1e30
  with pytest.raises(train.TrainingError, match=r"loss is (nan|inf) at step \d+"):
    train.train_and_evaluate(config, str(tmp_path / "run"))


def test_batch_must_divide_by_replicas(synthetic_dir, tmp_path):
  with pytest.raises(train.TrainingError, match="global_batch_size=33 does not divide by the 2 replicas"):
    train.train_and_evaluate(_smoke(synthetic_dir, logical_cpus=2, global_batch_size=33), str(tmp_path))


def test_cli_without_data_dir_is_one_line_error(tmp_path):
  result = subprocess.run([sys.executable, "-m", "trainer.main", "--config=configs/deep.py:smoke",
                           f"--workdir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith("trainer: error: data_dir is empty")
  assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_benchmark_accuracy_tool_resumes_in_its_workdir(synthetic_dir, tmp_path):
  command = [sys.executable, "-m", "tools.benchmark_accuracy", "--config=configs/deep.py:smoke", "--runs=1",
             f"--data_dir={synthetic_dir}", f"--workdir={tmp_path}", "--config.num_epochs=1",
             "--config.steps_per_epoch=2"]
  runs = [subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300) for _ in range(2)]
  for result in runs:
    assert result.returncode == 0, result.stderr[-2000:]
  first, second = (r.stdout.splitlines() for r in runs)
  assert re.fullmatch(r"training compute: 0\.\d{3} PFLOP per run \(tools.benchmark_step's count\)", first[0]), first
  assert re.fullmatch(r"run 0: validation accuracy [01]\.\d{4} \(\d+/200, from the export\), wall time \d+ s",
                      first[1]), first
  assert first[-1] == first[0].split(" (")[0], first
  assert second[1].endswith("(resumed: this invocation only)") and "(some runs resumed)" in second[-3], second
  with open(tmp_path / "run0.log") as f:
    log = f.read()
  assert "benchmark_accuracy: starting run 0" in log and "benchmark_accuracy: resuming run 0" in log


@pytest.mark.slow
def test_benchmark_step_tool_compares_kernels_and_profiles_layers_and_ops(synthetic_dir):
  result = subprocess.run(
      [sys.executable, "-m", "tools.benchmark_step", "--config=configs/deep.py:smoke",
       f"--config.data_dir={synthetic_dir}", "--windows=1", "--steps=1", "--nofit", "--noreplicas", "--kernels",
       "--layers", "--ops"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-2000:]
  lines = result.stdout.strip().splitlines()
  assert sum(l.startswith("train step, ") for l in lines) == 2
  assert any(re.fullmatch(r"fast / keras: \d+\.\d\d", l) for l in lines)
  layers = {l.split()[0] for l in lines[lines.index(next(l for l in lines if l.startswith("layer "))) + 1:]
            if re.match(r"\w+ +[\dx]+ +[\d.]+ +[\d.]+$", l)}
  assert {"whiten", "group0_conv0", "group0_bn0", "logits"} <= layers, lines
  # The op profile of the real step: smoke's 15x15 group takes oneDNN's kernel gradient, its 7x7 group the
  # shifted matmuls (layers.Conv2D).
  assert re.match(r"op profile: [\d.]+ s of ops summed over threads in [\d.]+ s of wall time, 32 images",
                  next(l for l in lines if l.startswith("op profile:")))
  shares = {l.rsplit(None, 2)[0]: float(l.rsplit(None, 1)[1].rstrip("%")) for l in lines
            if re.match(r".+ +[\d.]+ +[\d.]+%$", l)}
  assert {"Conv2DBackpropFilter", "MatMul (backward)", "group0_conv0 backward", "group1_conv0 backward",
          "group1_conv0 forward", "optimizer", "gelu (XLA)"} <= set(shares), lines
  assert all(0 <= share <= 100 for share in shares.values())
  assert not any(l.startswith(("custom loop / fit", "2 / 1 replicas")) for l in lines)


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


@pytest.mark.parametrize("schedule", ["cosine", "constant", "triangular", "piecewise"])
def test_schedules(schedule):
  from trainer import optim  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.num_epochs, config.optimizer.schedule, config.optimizer.learning_rate = 10, schedule, 1.0
  lr = optim.make_schedule(config, steps_per_epoch=100)
  values = [float(lr(s)) for s in (0, 50, 100, 501, 999)]
  expected = {"cosine": [0.0, 0.5, 1.0, None, None], "constant": [0.0, 0.5, 1.0, 1.0, 1.0],
              "triangular": [0.2, 0.6, 1.0, None, 0.0], "piecewise": [1.0, 1.0, 1.0, 0.1, 0.01]}[schedule]
  for got, want in zip(values, expected):
    if want is not None:
      assert abs(got - want) < 2e-3, (schedule, values)
  assert max(values) <= 1.0 + 1e-6


@pytest.mark.slow
def test_mixed_float16_ema_clipping_and_tta_train_and_match_the_export(synthetic_dir, tmp_path):
  config = _smoke(synthetic_dir, mixed_precision="mixed_float16", tta="flip_translate")
  config.optimizer.update(ema_decay=0.9, clip_norm=1.0, schedule="triangular")
  workdir = str(tmp_path / "run")
  metrics = train.train_and_evaluate(config, workdir)
  assert metrics["train"]["loss_scale"] > 0
  events = glob.glob(os.path.join(workdir, "summaries", "events.out.tfevents.*"))
  tags = {v.tag for e in tf.data.TFRecordDataset(events) for v in tf.compat.v1.Event.FromString(
      e.numpy()).summary.value}
  assert "train/loss_scale" in tags
  correct, total = evaluate_tool.evaluate(os.path.join(workdir, "export"), synthetic_dir, "validation", 64)
  # The export carries the EMA weights and the same test-time views as the trainer's final evaluation.
  assert abs(correct / total - metrics["validation"]["accuracy"]) < 1e-6


def test_ema_update_and_swap():
  import keras  # pylint: disable=g-import-not-at-top
  from trainer import optim  # pylint: disable=g-import-not-at-top
  weight = keras.Variable(1.0)
  ema = optim.EMA([weight], decay=0.9)
  weight.assign(2.0)
  ema.update()
  np.testing.assert_allclose(ema.averages[0].numpy(), 1.1, rtol=1e-6)
  ema.swap()
  np.testing.assert_allclose([weight.numpy(), ema.averages[0].numpy()], [1.1, 2.0], rtol=1e-6)
  ema.swap()
  np.testing.assert_allclose([weight.numpy(), ema.averages[0].numpy()], [2.0, 1.1], rtol=1e-6)


def test_one_device_strategy(synthetic_dir, tmp_path):
  metrics = train.train_and_evaluate(_smoke(synthetic_dir, strategy="one_device", export=False, num_epochs=1),
                                     str(tmp_path / "run"))
  run = json.load(open(tmp_path / "run" / "run.json"))
  assert run["distribution"]["strategy"] == "OneDeviceStrategy" and run["end_step"] == 4
  assert 0.0 <= metrics["validation"]["accuracy"] <= 1.0


def test_tta_views():
  import keras  # pylint: disable=g-import-not-at-top
  keras.mixed_precision.set_dtype_policy("float32")
  inputs = keras.Input((32, 32, 3))
  model = keras.Model(inputs, keras.layers.Lambda(lambda x: x[:, 0, :3, 0])(inputs))  # reads 3 pixels
  images = tf.reshape(tf.range(2 * 32 * 32 * 3, dtype=tf.float32), [2, 32, 32, 3])
  np.testing.assert_allclose(views.logits(model, images, "none"), images[:, 0, :3, 0])
  flipped = 0.5 * (images[:, 0, :3, 0] + images[:, 0, ::-1, 0][:, :3])
  np.testing.assert_allclose(views.logits(model, images, "flip"), flipped)
  read = lambda x: x[:, 0, :3, 0]
  mirror = lambda x: 0.5 * (read(x) + read(tf.reverse(x, axis=[2])))
  padded = tf.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]], mode="REFLECT")
  expected = 0.5 * mirror(images) + 0.25 * mirror(padded[:, :32, :32]) + 0.25 * mirror(padded[:, 2:, 2:])
  averaged, plain = views.logits(model, images, "flip_translate", with_plain=True)
  np.testing.assert_allclose(averaged, expected, rtol=1e-6)
  np.testing.assert_allclose(plain, read(images))
  np.testing.assert_allclose(views.logits(model, images, "flip_translate"), expected, rtol=1e-6)
  with pytest.raises(ValueError, match="tta='sideways' is not one of"):
    views.logits(model, images, "sideways")
  # A replica's empty batch at the end of a split (tf.pad's REFLECT failed on it: found under SLURM).
  assert views.logits(model, images[:0], "flip_translate").shape == (0, 3)


def test_float16_overflow_on_one_replica_skips_the_step_on_every_replica():
  """Replica 1's gradients overflow in float16 (its soft labels weigh 10^4 times too much, so its loss
  and gradients are 10^4 times larger), replica 0's do not: the step is skipped on both replicas and the
  loss scale halves; the next step trains normally."""
  config = deep.get_config("smoke")
  config.update(mixed_precision="mixed_float16", logical_cpus=2)
  config.optimizer.update(clip_norm=0.0, warmup_epochs=0.0)
  rng = np.random.default_rng(0)
  images = tf.constant(rng.normal(size=(32, 32, 32, 3)), tf.float32)
  labels = np.eye(10, dtype=np.float32)[rng.integers(0, 10, 32)]
  heavy = labels.copy()
  heavy[16:] *= 1e4  # replica 1's half of the global batch
  strategy = distribute.make_strategy(config)
  assert strategy.num_replicas_in_sync == 2
  state = steps.make_state(config, strategy, steps_per_epoch=10)
  models.initialize_from_data(state.model, lambda: images)
  learner = steps.Learner(config, strategy, state)
  step = lambda y: learner.train(iter(strategy.experimental_distribute_dataset(
      tf.data.Dataset.from_tensors({"images": images, "labels": tf.constant(y)}).repeat())), 1, 0)
  initial = [v.numpy() for v in state.model.trainable_variables]
  scale = optim.loss_scale(state.optimizer)
  step(heavy)
  assert optim.loss_scale(state.optimizer) == scale / 2
  for a, v in zip(initial, state.model.trainable_variables):
    np.testing.assert_array_equal(a, v.numpy())  # skipped on both replicas
  step(labels)
  after = [v.numpy() for v in state.model.trainable_variables]
  assert all(np.isfinite(a).all() for a in after)
  assert any(not np.array_equal(a, b) for a, b in zip(initial, after))
  assert optim.loss_scale(state.optimizer) == scale / 2
