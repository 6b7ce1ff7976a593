"""File helpers over tf.io.gfile, so every path may be local or `gs://`."""

import hashlib
import json
import os
import uuid

import tensorflow as tf

_CHUNK = 1 << 22


def sha256_file(path: str) -> str:
  digest = hashlib.sha256()
  with tf.io.gfile.GFile(path, "rb") as f:
    while chunk := f.read(_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def temp_name(path: str) -> str:
  """A sibling of `path` that no reader globbing for final names will match."""
  head, tail = os.path.split(path)
  return os.path.join(head, f".tmp-{uuid.uuid4().hex[:8]}-{tail}")


def atomic_write(path: str, data: str | bytes) -> None:
  """Writes `data` to a temporary sibling, then renames it over `path`: readers never see a partial file."""
  tmp = temp_name(path)
  with tf.io.gfile.GFile(tmp, "wb" if isinstance(data, bytes) else "w") as f:
    f.write(data)
  tf.io.gfile.rename(tmp, path, overwrite=True)


def write_json(path: str, obj) -> None:
  atomic_write(path, json.dumps(obj, indent=2, sort_keys=True) + "\n")


def read_json(path: str):
  with tf.io.gfile.GFile(path, "r") as f:
    return json.load(f)
