r"""Renders a finished (or running) training run as one HTML page with PNG figures.

  python -m tools.report --workdir=/tmp/run              # writes /tmp/run/report/index.html + *.png
  python -m tools.report --workdir=gs://b/run --output_dir=/tmp/report

From the run's TensorBoard summaries: learning curves (train and validation loss and accuracy per epoch)
and throughput over time. From its export, run on the validation split (the test split if there is no
validation split): the confusion matrix, per-class accuracy and sample predictions with their images. And
the run's config, status and the data's manifest. Every file is written atomically; index.html last.
"""

import trainer  # pylint: disable=unused-import  # first: see tools/__init__.py

import html
import json
import os
import sys

from absl import app
from absl import flags
import numpy as np
import tensorflow as tf

from pipeline import fileio
from pipeline import input_pipeline
from pipeline import manifest as manifest_lib
from trainer import export as export_lib
from trainer import figures
from trainer import main as trainer_main
from trainer import workdir as workdir_lib

FLAGS = flags.FLAGS
SAMPLES = 24  # sample predictions shown


def define_flags(flag_values: flags.FlagValues = flags.FLAGS):
  """Command-line flags; defined only when run as a program, so modules import side by side (and a test may
  define them on a FlagValues of its own)."""
  on = {"flag_values": flag_values}
  flags.DEFINE_string("workdir", None, "A trainer workdir (local or gs://).", **on)
  flags.DEFINE_string("output_dir", None, "Where index.html and the PNGs go; default WORKDIR/report.", **on)
  trainer_main.require_paths(["workdir"], flag_values)


class ReportError(Exception):
  """The workdir lacks what a report needs."""


def read_scalars(summary_dir: str) -> dict[str, list[tuple[int, float]]]:
  """{tag: [(step, value), ...]} from every event file under `summary_dir`, sorted by step."""
  scalars: dict[str, dict[int, float]] = {}
  for path in sorted(tf.io.gfile.glob(os.path.join(summary_dir, "events.out.tfevents.*"))):
    for record in tf.data.TFRecordDataset(path):
      event = tf.compat.v1.Event.FromString(record.numpy())
      for value in event.summary.value:
        if value.metadata.plugin_data.plugin_name == "scalars" or value.HasField("simple_value"):
          number = value.simple_value if value.HasField("simple_value") else float(tf.make_ndarray(value.tensor))
          scalars.setdefault(value.tag, {})[event.step] = number
  return {tag: sorted(points.items()) for tag, points in scalars.items()}


def predictions(export_dir: str, data_dir: str, split: str):
  """Labels, predicted classes, top probabilities and the first SAMPLES images of `split`."""
  model = export_lib.load(export_dir)
  labels, predicted, top, images = [], [], [], []
  for batch in input_pipeline.build_eval_dataset(data_dir, split, batch_size=1000):
    out = model.signatures["serving_default"](images=batch["images"])
    labels.append(batch["labels"].numpy())
    predicted.append(out["classes"].numpy())
    top.append(out["probabilities"].numpy().max(1))
    if sum(len(i) for i in images) < SAMPLES:
      images.append(batch["images"].numpy())
  return (np.concatenate(labels), np.concatenate(predicted), np.concatenate(top),
          np.concatenate(images)[:SAMPLES])


def _table(rows) -> str:
  cells = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(str(v))}</td></tr>" for k, v in rows)
  return f"<table>{cells}</table>"


PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<style>
body {{ font-family: sans-serif; margin: 2em; max-width: 1100px; }}
table {{ border-collapse: collapse; margin-bottom: 1.5em; }}
th, td {{ border: 1px solid #ccc; padding: 2px 8px; text-align: left; font-size: 13px; }}
th {{ background: #f4f4f4; }}
img {{ max-width: 100%; }}
</style></head>
<body>
<h1>{title}</h1>
{summary}
<h2>Learning curves</h2><img id="learning_curves" src="learning_curves.png" alt="learning curves">
<h2>Confusion matrix ({split})</h2><img id="confusion_matrix" src="confusion_matrix.png" alt="confusion matrix">
<h2>Per-class accuracy ({split})</h2><img id="per_class_accuracy" src="per_class_accuracy.png" alt="per-class accuracy">
<h2>Sample predictions ({split})</h2><img id="samples" src="samples.png" alt="sample predictions">
<h2>Throughput</h2><img id="throughput" src="throughput.png" alt="throughput">
<h2>Config</h2>{config}
<h2>Data (manifest)</h2>{manifest}
<script>
window.addEventListener("load", () => {{
  const images = Array.from(document.images);
  document.body.dataset.imagesLoaded = images.filter(i => i.complete && i.naturalWidth > 0).length;
  document.body.dataset.imagesTotal = images.length;
}});
</script>
</body></html>
"""


def report(workdir: str, output_dir: str | None = None) -> str:
  """Writes the report; returns the path of index.html."""
  output_dir = output_dir or os.path.join(workdir, "report")
  config_path, run_path = os.path.join(workdir, "config.json"), os.path.join(workdir, "run.json")
  for path in (config_path, os.path.join(workdir, "export", "saved_model.pb")):
    if not tf.io.gfile.exists(path):
      raise ReportError(f"{workdir}: no {os.path.relpath(path, workdir)}; is this a finished trainer workdir?")
  config = fileio.read_json(config_path)
  run = fileio.read_json(run_path) if tf.io.gfile.exists(run_path) else {}
  manifest = manifest_lib.load(config["data_dir"])
  split = "validation" if "validation" in manifest["splits"] else "test"
  names = list(manifest_lib.class_names(manifest))
  scalars = read_scalars(os.path.join(workdir, "summaries"))
  steps_per_epoch = run.get("total_steps", 0) / max(config["num_epochs"], 1) or 1.0

  labels, predicted, top, images = predictions(os.path.join(workdir, "export"), config["data_dir"], split)
  matrix = np.zeros((len(names), len(names)), np.int64)
  np.add.at(matrix, (labels, predicted), 1)
  pngs = {
      "learning_curves.png": figures.learning_curves(scalars, steps_per_epoch),
      "confusion_matrix.png": figures.confusion(matrix, names),
      "per_class_accuracy.png": figures.per_class(matrix, names),
      "samples.png": figures.predictions(images, labels, predicted, top, names),
      "throughput.png": figures.throughput(scalars, steps_per_epoch),
  }
  tf.io.gfile.makedirs(output_dir)
  for name, data in pngs.items():
    fileio.atomic_write(os.path.join(output_dir, name), data)
  accuracy = float(np.mean(labels == predicted))
  summary = _table([("workdir", workdir), ("status", run.get("status", "running or unknown")),
                    ("steps", f"{run.get('end_step', '?')} / {run.get('total_steps', '?')}"),
                    (f"{split} accuracy (export)", f"{accuracy:.4f} ({int(np.sum(labels == predicted))}/{len(labels)})"),
                    ("started", run.get("started", "")), ("ended", run.get("ended", "")),
                    ("versions", json.dumps(run.get("versions", {}))), ("git commit", run.get("git_commit", ""))])
  manifest_rows = [("encoding", manifest.get("encoding", "")), ("source", json.dumps(manifest.get("source", {})))]
  manifest_rows += [(f"split {s}", f"{info['num_examples']} images in {info['num_shards']} shards")
                    for s, info in manifest["splits"].items()]
  page = PAGE.format(title=html.escape(f"Training report: {config.get('model', {}).get('name', '')} "
                                       f"in {workdir}"),
                     summary=summary, split=split, config=_table(workdir_lib.flat_config(config)), manifest=_table(manifest_rows))
  index = os.path.join(output_dir, "index.html")
  fileio.atomic_write(index, page)
  return index


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  try:
    index = report(FLAGS.workdir, FLAGS.output_dir)
  except (ReportError, manifest_lib.ManifestError, FileNotFoundError) as e:
    print(f"report: error: {e}", file=sys.stderr)
    sys.exit(1)
  print(f"wrote {index}")


if __name__ == "__main__":
  define_flags()
  app.run(main)
