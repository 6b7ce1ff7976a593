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

from absl import flags
import keras
import numpy as np
import pytest
import tensorflow as tf

from configs import deep
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
  config.update(data_dir=synthetic_dir, num_epochs=1, steps_per_epoch=2, export=False, summary_worst_images=0)
  metrics = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(metrics["train"]["loss"]) and metrics["validation"]["count"] == 200


@pytest.fixture(scope="module", params=[2, 1], ids=["2replicas", "1replica"])
def trained(request, smoke_runs):
  """The smoke config trained on 2 replicas and on 1, exported (conftest.smoke_runs)."""
  return smoke_runs(request.param)


@pytest.fixture(scope="module")
def exported(smoke_runs):
  """The smoke run on 1 replica: for the tools' flags and the export's signatures as clients see them, which
  the replica count of the training does not change."""
  return smoke_runs(1)


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


@pytest.mark.parametrize("tool,args,expected", [
    (evaluate_tool, ["--data_dir=data", "--batch_size=0"],
     "flag --batch_size=0: 0 is not a positive integer"),  # was a traceback
    (predict_tool, ["--top_k=0"], "flag --top_k=0: 0 is not a positive integer"),  # printed no class at all
    (predict_tool, ["--batch_size=0"], "flag --batch_size=0: 0 is not a positive integer"),
], ids=["evaluate", "predict-top_k", "predict-batch_size"])
def test_tool_flags_out_of_range_are_named(tool, args, expected):
  """The tool's flags parsed as its program parses them (absl prints the error and exits 1), on a FlagValues of
  their own in this process."""
  values = flags.FlagValues()
  tool.define_flags(values)
  with pytest.raises(flags.IllegalFlagValueError, match=f"^{re.escape(expected)}$"):
    values(["tool", "--model=export", *args])


@pytest.mark.slow
def test_rest_json_requests_match_the_signatures(exported, tmp_path, program):
  import base64  # pylint: disable=g-import-not-at-top
  workdir, _, config = exported
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
  # The command, as a user would give it a request body (in this process: conftest's `program`), prints the
  # same answer.
  path = tmp_path / "request.json"
  path.write_text(json.dumps(requests["row"]))
  result = program(predict_tool, f"--model={export}", f"--json={path}")
  assert result.returncode == 0, result.stderr[-2000:]
  np.testing.assert_allclose([p["probabilities"] for p in json.loads(result.stdout)["predictions"]], expected,
                             atol=1e-6)
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({"instances": [{"pixels": rows[0]}]}))
  result = program(predict_tool, f"--model={export}", f"--json={bad}")
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1] == ("predict: error: signature serving_default takes input(s) "
                                                    "images; the request has pixels")


def test_saved_model_cli_lists_the_signatures(exported):
  workdir, _, _ = exported
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


def test_batch_must_divide_by_replicas(synthetic_dir, tmp_path):
  with pytest.raises(train.TrainingError, match="global_batch_size=33 does not divide by the 2 replicas"):
    train.train_and_evaluate(_smoke(synthetic_dir, logical_cpus=2, global_batch_size=33), str(tmp_path))


def test_cli_without_data_dir_is_one_line_error(tmp_path, trainer_refused):
  assert trainer_refused(deep.get_config("smoke"), str(tmp_path)).startswith("trainer: error: data_dir is empty")


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


def test_one_device_strategy(synthetic_dir, tmp_path):
  metrics = train.train_and_evaluate(_smoke(synthetic_dir, strategy="one_device", export=False, num_epochs=1),
                                     str(tmp_path / "run"))
  run = json.load(open(tmp_path / "run" / "run.json"))
  assert run["distribution"]["strategy"] == "OneDeviceStrategy" and run["end_step"] == 4
  assert 0.0 <= metrics["validation"]["accuracy"] <= 1.0
