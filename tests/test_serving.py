"""The export where models are served: its precision, TF Serving's layout and warmup file, the LiteRT and
ONNX conversions (tools/convert.py) and the tools that run them (tools/converted.py)."""

import importlib
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow_serving.apis import prediction_log_pb2

from pipeline import input_pipeline
from tools import convert
from tools import converted
from tools import predict as predict_tool
from trainer import export as export_lib
from trainer import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run(smoke_runs):
  """deep.py:smoke trained in mixed_bfloat16 on 1 replica, exported with the defaults."""
  return smoke_runs(1)


def _dtypes(export_dir: str) -> dict[str, set[str]]:
  """Every op of the SavedModel's graph and function library -> the dtypes in its attributes."""
  saved = saved_model_pb2.SavedModel()
  with open(os.path.join(export_dir, "saved_model.pb"), "rb") as f:
    saved.ParseFromString(f.read())
  graph = saved.meta_graphs[0].graph_def
  found = {}
  for node in list(graph.node) + [n for f in graph.library.function for n in f.node_def]:
    for value in node.attr.values():
      for dtype in [value.type] + list(value.list.type):
        if dtype:
          found.setdefault(node.op, set()).add(tf.dtypes.as_dtype(dtype).name)
  return found


def test_a_bf16_run_exports_a_float32_graph(run):
  workdir, metrics, config = run
  assert config.mixed_precision == "mixed_bfloat16" and config.export_precision == "float32"
  dtypes = _dtypes(os.path.join(workdir, "export"))
  assert "Conv2D" in dtypes and not [op for op, types in dtypes.items() if "bfloat16" in types]
  assert not {"Erfc"} & set(dtypes)  # GELU as erf: an op LiteRT fuses and ONNX has
  assert metrics["validation"]["count"] == 200


def test_tf_serving_layout_and_warmup_requests_for_every_signature(run):
  workdir, _, config = run
  serving = os.path.join(workdir, "serving")
  assert sorted(os.listdir(serving)) == ["8"]  # the train step; nothing temporary left
  version = os.path.join(serving, "8")
  assert os.path.exists(os.path.join(version, "saved_model.pb"))
  logs = [prediction_log_pb2.PredictionLog.FromString(r.numpy())
          for r in tf.data.TFRecordDataset(os.path.join(version, export_lib.WARMUP_FILE))]
  requests = [log.predict_log.request for log in logs]
  assert sorted((r.model_spec.signature_name, len(logs)) for r in requests) == sorted(
      (name, len(logs)) for name in ("serving_default", "serve_bytes", "serve_examples")
      for _ in export_lib.WARMUP_BATCHES)
  examples = [tf.make_ndarray(r.inputs["examples"]) for r in requests if r.model_spec.signature_name == "serve_examples"]
  shipped = tf.train.Example.FromString(examples[-1][-1]).features.feature  # the records ship with the model:
  assert shipped["image/id"].bytes_list.value[0].startswith(b"warmup-")  # not the data's ids and labels
  assert shipped["image/class/label"].int64_list.value[0] == 0
  loaded = export_lib.load(version)
  first = None
  for request in requests:  # each request runs its signature, on real validation images: the same answers
    signature = loaded.signatures[request.model_spec.signature_name]
    (key, proto), = request.inputs.items()
    out = signature(**{key: tf.constant(tf.make_ndarray(proto))})["probabilities"].numpy()
    assert out.shape[0] in export_lib.WARMUP_BATCHES
    first = out[0] if first is None else first
    np.testing.assert_allclose(out[0], first, atol=1e-6)
  exported = export_lib.load(os.path.join(workdir, "export")).signatures["serving_default"]
  layer = keras.layers.TFSMLayer(os.path.join(workdir, "export"), call_endpoint="serving_default")  # Keras 3
  images8 = next(iter(input_pipeline.build_eval_dataset(config.data_dir, "test", batch_size=8)))["images"]
  np.testing.assert_array_equal(layer(images8)["probabilities"].numpy(), exported(images=images8)["probabilities"].numpy())
  images = next(iter(input_pipeline.build_eval_dataset(config.data_dir, "validation", batch_size=1)))["images"]
  np.testing.assert_allclose(exported(images=images)["probabilities"].numpy()[0], first, atol=1e-6)


def test_versions_are_numbered_kept_once_written_and_the_oldest_removed(tmp_path):
  export_dir = tmp_path / "export"
  (export_dir / "variables").mkdir(parents=True)
  (export_dir / "saved_model.pb").write_bytes(b"graph")
  (export_dir / "variables" / "variables.index").write_bytes(b"index")
  versions = str(tmp_path / "serving")
  for n, step in enumerate((10, 20, 30, 20)):
    (export_dir / "saved_model.pb").write_bytes(f"graph {n}".encode())
    export_lib.publish_version(str(export_dir), versions, step, keep=2)
  assert sorted(os.listdir(versions)) == ["20", "30"]
  # A version once published is never replaced (TF Serving would not reload it): the first copy of 20.
  assert (tmp_path / "serving" / "20" / "saved_model.pb").read_bytes() == b"graph 1"
  assert (tmp_path / "serving" / "30" / "variables" / "variables.index").read_bytes() == b"index"


@pytest.mark.parametrize("name,overrides", [
    ("deep", {}), ("default", {"model.sync_bn": True, "model.fast_kernels": False}),
    ("vgg_small", {}), ("mlp", {})], ids=["airbench", "resnet-sync_bn-keras_layers", "plain_cnn-dropout", "mlp"])
def test_the_serving_copy_computes_what_the_trained_model_does(name, overrides):
  """export.serving_model rebuilds the model and copies each weight by its path; in float32 both give the
  same logits (every builder; dropout, synchronized BatchNorm and Keras's own layers on the trained side)."""
  config = importlib.import_module(f"configs.{name}").get_config("smoke")
  for key, value in overrides.items():
    config[key.split(".")[0]][key.split(".")[1]] = value
  config.mixed_precision = "float32"
  keras.mixed_precision.set_dtype_policy("float32")
  model = models.build(config.model)
  for weight in model.weights:  # not the initial values: a weight left uncopied would show
    weight.assign(np.random.default_rng(len(weight.path)).normal(0.5, 0.1, weight.shape).astype("float32"))
  served = export_lib.serving_model(model, config, models.CIFAR10)
  assert served is not model
  x = tf.constant(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), tf.float32)
  np.testing.assert_allclose(served(x, training=False).numpy(), model(x, training=False).numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("to", ["litert", "onnx"])
def test_float32_conversions_give_the_savedmodels_classes(run, tmp_path, to):
  workdir, _, config = run
  export_dir = os.path.join(workdir, "export")
  output = convert.convert(export_dir, to, output=str(tmp_path / f"model{convert.SUFFIX[to]}"),
                           data_dir=config.data_dir)
  model = converted.load(output)
  saved = converted.SavedModel(export_dir)
  assert model.class_names == saved.class_names and model.image_shape == (32, 32, 3)
  counts = convert.agreement(saved, model, config.data_dir, "validation", 64)
  assert counts["images"] == 200 and counts["agree"] == 200
  images = next(iter(input_pipeline.build_eval_dataset(config.data_dir, "test", batch_size=8)))["images"].numpy()
  np.testing.assert_allclose(model.probabilities(images), saved.probabilities(images), atol=1e-5)


@pytest.mark.parametrize("to", ["litert", "onnx"])
def test_int8_conversions_are_calibrated_and_run(run, tmp_path, to):
  workdir, _, config = run
  export_dir = os.path.join(workdir, "export")
  output = convert.convert(export_dir, to, "int8", output=str(tmp_path / f"m{convert.SUFFIX[to]}"),
                           data_dir=config.data_dir, calibration_count=64)
  model = converted.load(output)
  images = next(iter(input_pipeline.build_eval_dataset(config.data_dir, "test", batch_size=32)))["images"].numpy()
  probabilities = model.probabilities(images)
  np.testing.assert_allclose(probabilities.sum(-1), 1.0, atol=2e-2)
  saved = converted.SavedModel(export_dir).probabilities(images)
  assert 0 < np.abs(probabilities - saved).max() < 0.2  # quantized: near the float model, not equal to it


def test_int8_without_data_and_output_a_directory_are_refused(run, tmp_path):
  workdir, _, _ = run
  export_dir = os.path.join(workdir, "export")
  with pytest.raises(converted.ModelError, match="--quantize=int8 calibrates on train images: give --data_dir"):
    convert.convert(export_dir, "litert", "int8")
  with pytest.raises(converted.ModelError, match=f"--output={tmp_path} is a directory"):
    convert.convert(export_dir, "litert", output=str(tmp_path))
  bad = tmp_path / "bad.tflite"
  bad.write_bytes(b"not a model")
  with pytest.raises(converted.ModelError, match="bad.tflite: not a LiteRT model"):
    converted.load(str(bad))
  with pytest.raises(converted.ModelError, match="missing.onnx: no such model file"):
    converted.load(str(tmp_path / "missing.onnx"))


def _cli(*args):
  result = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True, text=True, timeout=300)
  return result.returncode, result.stdout, result.stderr


@pytest.mark.slow
def test_convert_and_predict_commands_on_a_tflite_file(run, tmp_path):
  """The issue's acceptance 4: tools.predict on a .tflite prints the SavedModel's class, in its own format."""
  workdir, _, config = run
  export_dir = os.path.join(workdir, "export")
  output = str(tmp_path / "model.tflite")
  code, out, err = _cli("tools.convert", f"--model={export_dir}", "--to=litert", f"--output={output}",
                        f"--data_dir={config.data_dir}")
  assert code == 0, err
  lines = out.strip().splitlines()
  assert lines[0].startswith(f"wrote {output}: LiteRT, quantize=none, ") and "MB" in lines[0]
  assert lines[1:] == ["split: validation  images: 200", lines[2], "same class as the SavedModel: 1.0000 (0 differ)",
                       "accuracy: " + lines[2].split(": ")[1]]
  images = next(iter(input_pipeline.build_eval_dataset(config.data_dir, "test", batch_size=3)))["images"]
  paths = []
  for i, image in enumerate(images):
    paths.append(str(tmp_path / f"{i}.png"))
    tf.io.write_file(paths[-1], tf.io.encode_png(image))
  code, out, err = _cli("tools.predict", f"--model={output}", *paths)
  assert code == 0, err
  expected = predict_tool.predict(export_dir, paths)
  assert [line.split("\t")[:2] for line in out.strip().splitlines()] == [[p, top[0][0]] for p, top in expected]
  code, _, err = _cli("tools.convert", f"--model={export_dir}", "--to=onnx", "--quantize=int8")
  assert code == 1 and "Traceback" not in err
  assert err.strip().splitlines()[-1] == "convert: error: --quantize=int8 calibrates on train images: give --data_dir"
  code, _, err = _cli("tools.predict", f"--model={tmp_path}/none.tflite", paths[0])
  assert code == 1 and err.strip().splitlines()[-1] == f"predict: error: {tmp_path}/none.tflite: no such model file"
