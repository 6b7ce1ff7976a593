r"""Turns CIFAR-10, CIFAR-100 or your own images into sharded TFRecords plus `manifest.json`.

  python -m tools.make_tfrecords --source=tfds --output_dir=/data/cifar10
  python -m tools.make_tfrecords --source=tfds --dataset=cifar100 --output_dir=/data/cifar100
  python -m tools.make_tfrecords --source=cifar-100-python.tar.gz --label=coarse --output_dir=/data/c100-coarse
  python -m tools.make_tfrecords --source=photos/ --image_size=64 --output_dir=/data/photos64
  python -m tools.make_tfrecords --source=cifar-10-python.tar.gz --output_dir=gs://bucket/cifar10
  python -m tools.make_tfrecords --source=jpegs.tar.gz --output_dir=/tmp/c10   # a tar.gz of class folders of JPEGs
  python -m tools.make_tfrecords --source=synthetic --output_dir=/tmp/fake
  python -m tools.make_tfrecords --verify --output_dir=/tmp/c10

An image folder or tar holds `<split>/<class_name>/<image>` (split: train or test): its images are
decoded to RGB (grey and RGBA converted) and must share one size, or are all fitted to --image_size (the
largest central crop of that aspect ratio, resized bilinearly with antialiasing: pipeline/ops.fit_image,
which the export's serve_bytes applies to photos too). The manifest records the image shape, the class
names and the train split's per-channel statistics: what the trainer, the model and the export read.

A seeded, class-stratified validation split is carved out of train. Shards are written in parallel, each
under a temporary name and renamed when complete; the manifest is written last, so a directory with a
manifest is complete. The same inputs and flags give byte-identical shards.
"""

import trainer  # pylint: disable=unused-import  # first: see tools/__init__.py

import concurrent.futures
import contextlib
import os
import signal
import sys
import threading
import time

from absl import app
from absl import flags
from absl import logging
import numpy as np
import tensorflow as tf

import pipeline
from pipeline import cpus
from pipeline import cifar10
from pipeline import fileio
from pipeline import manifest as manifest_lib
from pipeline import records
from tools import sources

FLAGS = flags.FLAGS

def define_flags(flag_values: flags.FlagValues = flags.FLAGS):
  """Command-line flags; defined only when run as a program, so modules import side by side (and a test may
  define them on a FlagValues of its own)."""
  on = {"flag_values": flag_values}
  flags.DEFINE_string("source", "tfds", "tfds | synthetic | path to an official archive, image folder or tar.", **on)
  flags.DEFINE_string("output_dir", None, "Where shards and manifest.json go (local or gs://).", **on)
  flags.DEFINE_integer("num_shards", 16, "Shards for train; validation and test get proportionally fewer, "
                       "no split more than its images.", lower_bound=1, **on)
  flags.DEFINE_integer("val_size", 5000, "Validation images carved out of train, stratified by class; 0 = none.",
                       **on)
  flags.DEFINE_integer("seed", 0, "Seed of the validation split and of the shard order.", lower_bound=0, **on)
  flags.DEFINE_enum("encoding", "raw", ["raw", "png"], "raw: 3072 uint8 bytes per image (fastest); png: smaller.",
                    **on)
  flags.DEFINE_bool("verify", False, "Re-read --output_dir and check it against its manifest; write nothing.", **on)
  flags.DEFINE_integer("synthetic_train_size", 50000, "Images in the synthetic train split.", lower_bound=1, **on)
  flags.DEFINE_integer("synthetic_test_size", 10000, "Images in the synthetic test split.", lower_bound=1, **on)
  flags.DEFINE_integer("workers", 0, "Parallel shard writers; 0 = one per CPU core.", lower_bound=0, **on)
  flags.DEFINE_list("image_size", [], "H or H,W: fit every image of a folder or tar to this size (pixels); "
                    "unset: all images must share one size.", **on)
  flags.DEFINE_string("dataset", "cifar10", "With --source=tfds: the tensorflow-datasets name (cifar10, cifar100, "
                      "...).", **on)
  flags.DEFINE_enum("label", "fine", list(sources.LABELS), "CIFAR-100's labels: fine (100 classes) or coarse (20).",
                    **on)


class VerifyError(ValueError):
  """A shard disagrees with the manifest."""


class Interrupted(BaseException):  # not an Exception: no `except Exception` on the way may take it for an error
  """SIGINT or SIGTERM arrived while writing: the shards under way are dropped, the directory is as it was."""


STOP = threading.Event()  # set by a stop signal: the writer threads leave their shard at once
MIN_IMAGE_SIDE = 8  # pixels: the smallest images the models can pool down (configs/default.py's stages)


PUBLISHING = threading.Event()  # set once `publish` starts swapping the new files in: then the run completes


@contextlib.contextmanager
def stop_on_signals():
  """SIGINT and SIGTERM stop the writing in a fraction of a second (the writer threads see STOP between
  records); once `publish` has begun swapping the new files in, the run completes instead, so a stop never
  leaves a directory half swapped nor says "as it was" of a directory that holds the new dataset."""
  STOP.clear()
  PUBLISHING.clear()

  def handle(signum, frame):
    del frame
    if not PUBLISHING.is_set():
      STOP.set()
      raise Interrupted(f"stopped by {signal.Signals(signum).name}")

  previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
  try:
    yield
  finally:
    for sig, handler in previous.items():
      signal.signal(sig, handler)
    STOP.clear()
    PUBLISHING.clear()


def split_validation(train: sources.Split, val_size: int, seed: int,
                     num_classes: int = cifar10.NUM_CLASSES) -> dict[str, sources.Split]:
  """Carves a class-stratified validation split out of `train`; both come back shuffled by `seed`.

  Each class gives `val_size * class_share` images, the remainders going to the largest fractions, so
  50,000 balanced images and val_size=5,000 give exactly 500 per class.
  """
  rng = np.random.default_rng(seed)
  n = len(train)
  if not 0 <= val_size < n:
    raise sources.SourceError(f"--val_size={val_size} must be in [0, {n}) for a train split of {n} images")
  counts = np.bincount(train.labels, minlength=num_classes)
  exact = val_size * counts / n
  quota = np.floor(exact).astype(int)
  quota[np.argsort(-(exact - quota), kind="stable")[:val_size - quota.sum()]] += 1
  val_idx = np.concatenate([rng.permutation(np.flatnonzero(train.labels == k))[:quota[k]]
                            for k in range(len(counts))]).astype(int)
  train_idx = np.setdiff1d(np.arange(n), val_idx)
  pick = lambda s, idx: sources.Split(s.images[idx], s.labels[idx], [s.ids[i] for i in idx])
  out = {"train": pick(train, rng.permutation(train_idx))}
  if val_size:
    out["validation"] = pick(train, rng.permutation(val_idx))
  return out


def shard_counts(sizes: dict[str, int], num_shards: int) -> dict[str, int]:
  """Train (or, without one, the largest split) gets `num_shards`; the others proportionally fewer, at
  least one; no split more shards than images."""
  largest = sizes.get("train", max(sizes.values()))
  return {split: min(n, max(1, round(num_shards * n / largest))) for split, n in sizes.items()}  # no empty shard


def _encode(image: np.ndarray, encoding: str) -> bytes:
  return image.tobytes() if encoding == "raw" else tf.io.encode_png(image).numpy()


def write_shard(path: str, split: sources.Split, indices: np.ndarray, encoding: str, num_classes: int) -> dict:
  """Writes one shard under a temporary name beside `path`; returns its manifest entry with `tmp`, the
  file to rename to `path` (None when `path` already holds the same bytes)."""
  tmp = fileio.temp_name(path)
  with tf.io.TFRecordWriter(tmp) as writer:
    for n, i in enumerate(indices):
      if n % 256 == 0 and STOP.is_set():
        raise Interrupted(f"{path} not finished")
      writer.write(records.serialize_example(_encode(split.images[i], encoding), encoding,
                                             int(split.labels[i]), split.ids[i], split.images.shape[1:]))
  digest = fileio.sha256_file(tmp)
  if tf.io.gfile.exists(path) and fileio.sha256_file(path) == digest:
    tf.io.gfile.remove(tmp)
    tmp = None
  counts = np.bincount(split.labels[indices], minlength=num_classes)
  return {"file": os.path.basename(path), "num_records": len(indices), "class_counts": counts.tolist(),
          "sha256": digest, "tmp": tmp}


def channel_stats(images: np.ndarray) -> tuple[list[float], list[float]]:
  """Per-channel mean and std in [0, 1] units, in float64 over chunks to keep memory flat."""
  total = np.zeros(3)
  total_sq = np.zeros(3)
  for chunk in np.array_split(images, max(1, len(images) // 4096)):
    pixels = chunk.reshape(-1, 3).astype(np.float64) / 255.0
    total += pixels.sum(0)
    total_sq += np.square(pixels).sum(0)
  count = images.shape[0] * images.shape[1] * images.shape[2]
  mean = total / count
  return [round(float(m), 6) for m in mean], [round(float(s), 6) for s in np.sqrt(total_sq / count - mean ** 2)]


def write_all(output_dir: str, splits: dict[str, sources.Split], num_shards: int, encoding: str,
              workers: int, num_classes: int) -> list[dict]:
  """Writes every split's shards in parallel, logging progress; returns the shard entries in order."""
  counts = shard_counts({k: len(v) for k, v in splits.items()}, num_shards)
  jobs = []
  for name, split in splits.items():
    for i, idx in enumerate(np.array_split(np.arange(len(split)), counts[name])):
      jobs.append((name, os.path.join(output_dir, manifest_lib.shard_name(name, i, counts[name])), idx))
  total = sum(len(j[2]) for j in jobs)
  start, done, entries = time.time(), 0, {}
  with concurrent.futures.ThreadPoolExecutor(workers or cpus.usable().count) as pool:
    futures = {pool.submit(write_shard, path, splits[name], idx, encoding, num_classes): (name, path)
               for name, path, idx in jobs}
    for future in concurrent.futures.as_completed(futures):
      name, path = futures[future]
      try:
        entries[path] = dict(split=name, **future.result())
      except (tf.errors.OpError, OSError) as e:  # a full disk, a lost bucket: the old dataset stays
        for f in futures:
          f.cancel()
        message = (e.message if isinstance(e, tf.errors.OpError) else str(e)).strip().splitlines()[0]
        reason = message.split("; ", 1)[-1] if ".tmp-" in message.split("; ", 1)[0] else message  # not the temp name
        raise sources.SourceError(f"{path}: cannot be written ({reason}); the data in {output_dir} is as "
                                  "it was") from None
      done += entries[path]["num_records"]
      logging.info("shards %d/%d  images %d/%d  %.0f images/s", len(entries), len(jobs), done, total,
                   done / max(time.time() - start, 1e-9))
  return [entries[path] for _, path, _ in jobs]


def _remove_temporaries(output_dir: str) -> None:
  for leftover in fileio.temporaries(output_dir):
    tf.io.gfile.remove(leftover)


def publish(output_dir: str, shards: list[dict], manifest: dict) -> None:
  """Swaps the new shards in for the old ones and writes the manifest: the old manifest goes only now,
  once every new shard is complete, so a run that fails before leaves the old dataset usable."""
  manifest_path = os.path.join(output_dir, manifest_lib.FILENAME)
  PUBLISHING.set()
  if tf.io.gfile.exists(manifest_path):  # the directory is incomplete until the new manifest lands
    tf.io.gfile.remove(manifest_path)
  for shard in shards:
    if shard["tmp"]:
      tf.io.gfile.rename(shard["tmp"], os.path.join(output_dir, shard["file"]), overwrite=True)
  written = {s["file"] for s in shards}
  for stale in manifest_lib.list_shards(output_dir):  # from an earlier run with other --num_shards
    if stale not in written:
      tf.io.gfile.remove(os.path.join(output_dir, stale))
  fileio.write_json(manifest_path, manifest)


def build_manifest(source: sources.Source, splits: dict[str, sources.Split], shards: list[dict], *,
                   encoding: str, seed: int, val_size: int) -> dict:
  split_info = {}
  for name, split in splits.items():
    info = {"num_examples": len(split), "num_shards": sum(s["split"] == name for s in shards),
            "class_counts": np.bincount(split.labels, minlength=len(source.class_names)).tolist()}
    if name == "train":
      info["mean"], info["std"] = channel_stats(split.images)
    split_info[name] = info
  return {
      "format_version": 1,
      "tool": "tools.make_tfrecords", "tool_version": pipeline.project_version(),
      "source": {"name": source.name, "kind": source.kind, "checksum": source.checksum},
      "class_names": list(source.class_names),
      "image_shape": list(source.image_shape),
      "encoding": encoding, "seed": seed, "val_size": val_size,
      "splits": split_info,
      "shards": [{k: v for k, v in s.items() if k != "tmp"} for s in shards],
  }


def summary_table(manifest: dict, columns: int = 10) -> str:
  """Images per split and class; the first `columns` classes (CIFAR-100 has 100)."""
  names = manifest["class_names"][:columns]
  width = max(8, *(len(n) for n in names))
  header = f"{'split':<11}{'shards':>7}{'images':>8}  " + " ".join(f"{n:>{width}}" for n in names)
  if len(manifest["class_names"]) > columns:
    header += f"  ... {len(manifest['class_names'])} classes"
  lines = [header]
  for split, info in manifest["splits"].items():
    counts = " ".join(f"{c:>{width}}" for c in info["class_counts"][:len(names)])
    lines.append(f"{split:<11}{info['num_shards']:>7}{info['num_examples']:>8}  {counts}")
  return "\n".join(lines)


def check_splits_kept(output_dir: str, splits: dict) -> None:
  """Refuses to write over a dataset that has shards of a split these `splits` lack (a test-only source, or
  --val_size=0, into the directory of an earlier run): publishing would remove them."""
  lost = sorted({name.split("-")[0] for name in manifest_lib.list_shards(output_dir)} - set(splits))
  if lost:
    raise sources.SourceError(
        f"--output_dir={output_dir} holds {' and '.join(lost)} shards that this source and these flags do not "
        f"write; writing there would remove them: give another --output_dir, or delete "
        f"{os.path.join(output_dir, lost[0] + '-*')} yourself first")


def make(source_name: str, output_dir: str, *, num_shards: int = 16, val_size: int = 5000, seed: int = 0,
         encoding: str = "raw", workers: int = 0, synthetic_sizes: tuple[int, int] = (50000, 10000),
         image_size: tuple[int, int] | None = None, dataset: str = "cifar10", label: str = "fine") -> dict:
  """Loads the source (sources.load: `image_size`, `dataset`, `label`), splits it, writes shards and the
  manifest; returns the manifest."""
  start = time.time()
  if not output_dir:  # the shards would land in the current directory
    raise sources.SourceError("--output_dir is empty: give the directory the shards and manifest go to")
  fileio.check_bucket(output_dir)
  if tf.io.gfile.exists(output_dir) and not tf.io.gfile.isdir(output_dir):
    raise sources.SourceError(f"--output_dir={output_dir} is a file, not a directory")
  source = sources.load(source_name, seed=seed, synthetic_sizes=synthetic_sizes, image_size=image_size,
                        dataset=dataset, label=label)
  logging.info("loaded %s (%s): %s in %.1fs", source.name, source.kind,
               ", ".join(f"{k} {len(v)}" for k, v in source.splits.items()), time.time() - start)
  if len(source.class_names) < manifest_lib.MIN_CLASSES:
    raise sources.SourceError(f"{source_name}: {manifest_lib.describe_classes(source.class_names)}; a classifier "
                              f"needs at least {manifest_lib.MIN_CLASSES}: an image folder or tar holds a "
                              "<split>/<class_name>/ folder per class")
  if min(source.image_shape[:2]) < MIN_IMAGE_SIDE:
    raise sources.SourceError(f"{source_name}: images of {'x'.join(map(str, source.image_shape[:2]))} pixels; the "
                              f"models need at least {MIN_IMAGE_SIDE}x{MIN_IMAGE_SIDE}: pass --image_size to fit "
                              "them to a larger size")
  splits = {}
  if "train" in source.splits:
    splits = split_validation(source.splits["train"], val_size, seed, len(source.class_names))
  else:  # a held-out set to score: there is no train split to carve a validation split from
    logging.info("%s has no train split: writing its test split only", source.name)
  if "test" in source.splits:
    splits["test"] = source.splits["test"]
  check_splits_kept(output_dir, splits)
  tf.io.gfile.makedirs(output_dir)
  _remove_temporaries(output_dir)  # from a run killed half-way
  try:
    shards = write_all(output_dir, splits, num_shards, encoding, workers, len(source.class_names))
    manifest = build_manifest(source, splits, shards, encoding=encoding, seed=seed, val_size=val_size)
  except BaseException:  # a full disk, Ctrl-C: this run's temporary files go, the old dataset stays
    _remove_temporaries(output_dir)
    raise
  publish(output_dir, shards, manifest)
  images = sum(len(s) for s in splits.values())
  unchanged = sum(s["tmp"] is None for s in shards)
  print(summary_table(manifest))
  print(f"wrote {len(shards)} shards, {images} images to {output_dir} in {time.time() - start:.1f}s "
        f"({images / (time.time() - start):.0f} images/s)")
  if unchanged == len(shards):
    print(f"all {len(shards)} shards are byte-identical to the ones already there")
  elif unchanged:
    print(f"{unchanged} of {len(shards)} shards were byte-identical to the ones already there")
  return manifest


def verify(output_dir: str) -> None:
  """Checks every shard's checksum, record count and class counts against the manifest."""
  manifest = manifest_lib.load(output_dir)
  total = 0
  for entry in manifest["shards"]:
    path = os.path.join(output_dir, entry["file"])
    digest = fileio.sha256_file(path)
    if digest != entry["sha256"]:
      raise VerifyError(f"{path}: sha256 {digest[:12]}... differs from the manifest's {entry['sha256'][:12]}...")
    labels = []
    try:
      for batch in tf.data.TFRecordDataset(path).batch(4096).map(records.parse_batch):
        labels.append(batch[records.LABEL].numpy())
    except tf.errors.OpError as e:
      raise VerifyError(f"{path}: unreadable record ({e.message.splitlines()[0]})") from None
    labels = np.concatenate(labels) if labels else np.zeros([0], np.int64)
    counts = np.bincount(labels, minlength=manifest_lib.num_classes(manifest)).tolist()
    if len(labels) != entry["num_records"] or counts != entry["class_counts"]:
      raise VerifyError(f"{path}: {len(labels)} records with class counts {counts}; the manifest says "
                        f"{entry['num_records']} with {entry['class_counts']}")
    total += len(labels)
  print(summary_table(manifest))
  print(f"verify: OK: {len(manifest['shards'])} shards, {total} records match {manifest_lib.FILENAME}")


def parse_image_size(values: list[str]) -> tuple[int, int] | None:
  """--image_size=H or H,W -> (H, W); unset -> None."""
  if not values:
    return None
  try:
    sizes = [int(v) for v in values]
  except ValueError:
    sizes = []
  if len(sizes) not in (1, 2) or min(sizes) < MIN_IMAGE_SIDE:
    raise sources.SourceError(f"--image_size={','.join(values)}: give H or H,W in pixels, each at least "
                              f"{MIN_IMAGE_SIDE}, e.g. 64 or 64,48")
  return (sizes[0], sizes[-1])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
  if not FLAGS.output_dir:
    raise app.UsageError("--output_dir is required")
  try:
    if FLAGS.verify:
      verify(FLAGS.output_dir)
    else:
      with stop_on_signals():
        make(FLAGS.source, FLAGS.output_dir, num_shards=FLAGS.num_shards, val_size=FLAGS.val_size,
             seed=FLAGS.seed, encoding=FLAGS.encoding, workers=FLAGS.workers,
             synthetic_sizes=(FLAGS.synthetic_train_size, FLAGS.synthetic_test_size),
             image_size=parse_image_size(FLAGS.image_size), dataset=FLAGS.dataset, label=FLAGS.label)
  except Interrupted as e:
    print(f"make_tfrecords: {e.args[0]}: the shards under way were removed; {FLAGS.output_dir} is as it was",
          file=sys.stderr)
    sys.exit(130)
  except (sources.SourceError, manifest_lib.ManifestError, VerifyError, fileio.StorageError) as e:
    print(f"make_tfrecords: error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  define_flags()
  app.run(main)
