"""`manifest.json`: what make_tfrecords wrote (per shard and per split), read back by the pipeline."""

import hashlib
import json
import os
import re

import tensorflow as tf

from pipeline import cifar10
from pipeline import fileio

FILENAME = "manifest.json"
MIN_CLASSES = 2  # a classifier of one class has nothing to tell apart: its loss is 0 from the first step
_SHARD = re.compile(r"^(train|validation|test)-(\d{5})-of-(\d{5})\.tfrecord$")


class ManifestError(ValueError):
  """The data directory disagrees with its manifest, or has none; the message names the culprit."""


def shard_name(split: str, index: int, count: int) -> str:
  return f"{split}-{index:05d}-of-{count:05d}.tfrecord"


def list_shards(data_dir: str, split: str | None = None) -> list[str]:
  """Shard file names (not paths) in `data_dir`, optionally of one split, sorted."""
  if not tf.io.gfile.isdir(data_dir):
    return []
  names = [n for n in tf.io.gfile.listdir(data_dir) if _SHARD.match(n)]
  return sorted(n for n in names if split is None or n.startswith(split + "-"))


def load(data_dir: str) -> dict:
  """Reads `data_dir/manifest.json` and checks that the shard files on disk are exactly those it lists and
  that it names at least MIN_CLASSES classes (shards written by other tools are refused here, at start)."""
  path = os.path.join(data_dir, FILENAME)
  if not data_dir:
    raise ManifestError("data_dir is empty: set --config.data_dir to a directory written by "
                        "python -m tools.make_tfrecords")
  try:
    fileio.check_bucket(data_dir)
  except fileio.StorageError as e:
    raise ManifestError(str(e)) from None
  if not tf.io.gfile.exists(path):
    raise ManifestError(f"{path}: not found (is data_dir a directory written by python -m tools.make_tfrecords, "
                        "and did it finish?)")
  try:
    manifest = fileio.read_json(path)
    listed = sorted(s["file"] for s in manifest["shards"])
  except (ValueError, KeyError, TypeError) as e:
    raise ManifestError(f"{path}: not a valid manifest ({e!r})") from e
  on_disk = list_shards(data_dir)
  missing = sorted(set(listed) - set(on_disk))
  extra = sorted(set(on_disk) - set(listed))
  if missing:
    raise ManifestError(f"{os.path.join(data_dir, missing[0])}: listed in {FILENAME} but missing")
  if extra:
    raise ManifestError(f"{os.path.join(data_dir, extra[0])}: shard not listed in {FILENAME}")
  if num_classes(manifest) < MIN_CLASSES:
    raise ManifestError(f"{path}: {describe_classes(class_names(manifest))}; a classifier needs at least "
                        f"{MIN_CLASSES}")
  return manifest


def split_files(data_dir: str, manifest: dict, split: str) -> list[str]:
  """Full paths of a split's shards, in order."""
  files = sorted(s["file"] for s in manifest["shards"] if s["split"] == split)
  if not files:
    raise ManifestError(f"{os.path.join(data_dir, FILENAME)}: no {split} split "
                        f"(has: {', '.join(manifest['splits'])})")
  return [os.path.join(data_dir, f) for f in files]


def split_counts(manifest: dict, split: str) -> list[int]:
  """Records per shard of a split, in the order of `split_files`."""
  return [int(s["num_records"]) for s in sorted(manifest["shards"], key=lambda s: s["file"])
          if s["split"] == split]


def num_examples(manifest: dict, split: str) -> int:
  return int(manifest["splits"][split]["num_examples"])


def normalization(manifest: dict) -> tuple[tuple[float, ...], tuple[float, ...]]:
  """Per-channel (mean, std) of the training split in [0, 1] units; CIFAR-10's own if not recorded."""
  train = manifest.get("splits", {}).get("train", {})
  return tuple(train.get("mean", cifar10.MEAN)), tuple(train.get("std", cifar10.STD))


def class_names(manifest: dict) -> tuple[str, ...]:
  return tuple(manifest.get("class_names", cifar10.CLASS_NAMES))


def num_classes(manifest: dict) -> int:
  return len(class_names(manifest))


def describe_classes(names) -> str:
  """`1 class (cat)`, `0 classes ()`: the few class names of a dataset refused for having too few."""
  return f"{len(names)} class{'' if len(names) == 1 else 'es'} ({', '.join(names)})"


def image_shape(manifest: dict) -> tuple[int, int, int]:
  """(height, width, channels) of every image of the dataset."""
  return tuple(int(d) for d in manifest.get("image_shape", cifar10.IMAGE_SHAPE))


def verify_checksums(data_dir: str, manifest: dict, splits) -> None:
  """Re-hashes the shards of `splits` and names the first that differs from the manifest (changed,
  truncated or corrupted since make_tfrecords wrote it). Costs one read of the data (~0.5 s for CIFAR-10)."""
  for entry in manifest["shards"]:
    if entry["split"] in splits:
      path = os.path.join(data_dir, entry["file"])
      if fileio.sha256_file(path) != entry["sha256"]:
        raise ManifestError(f"{path}: contents differ from {FILENAME} (changed, truncated or corrupted since "
                            "make_tfrecords wrote it); re-run make_tfrecords, or "
                            "--config.input.verify_checksums=False to train on it anyway")


def identity(manifest: dict) -> dict:
  """What makes two data directories the same dataset, wherever they live: a digest of every shard's
  name, record count and sha256, with the class names and the image shape; and the images per split, to
  name what differs. run.json keeps it; a resume and every worker of a run compare it."""
  try:
    shards = sorted((s["file"], int(s["num_records"]), s["sha256"]) for s in manifest["shards"])
  except (KeyError, TypeError, ValueError) as e:
    raise ManifestError(f"{FILENAME}: a shard entry lacks its file, num_records or sha256 ({e!r}); re-run "
                        "make_tfrecords") from None
  text = json.dumps([shards, list(class_names(manifest)), list(image_shape(manifest))])
  return {"digest": hashlib.sha256(text.encode()).hexdigest()[:16],
          "images": {split: num_examples(manifest, split) for split in sorted(manifest["splits"])}}


def describe_difference(before: dict, now: dict) -> str:
  """How dataset identity `now` differs from `before`, in a few words."""
  if before["images"] != now["images"]:
    return f"images per split {before['images']} vs {now['images']}"
  return f"shard digest {before['digest']} vs {now['digest']}"
