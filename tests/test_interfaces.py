"""docs/interfaces.md against the code: every command and flag it names exists, the record schema, the
workdir's names, the config keys and the SavedModel's signatures are what the code has."""

import glob
import importlib
import os
import re

import keras
import pytest
import tensorflow as tf

from pipeline import records
from trainer import export as export_lib
from trainer import workdir as workdir_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOC = open(os.path.join(ROOT, "docs", "interfaces.md"), encoding="utf-8").read()


def _section(title: str) -> str:
  return DOC.split(f"## {title}\n", 1)[1].split("\n## ", 1)[0]


def _table(title: str) -> list[list[str]]:
  """The rows of the first table under `title`, cells stripped, the header and rule left out."""
  rows = [line for line in _section(title).splitlines() if line.startswith("|")]
  return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def _flags_of(module: str) -> set[str]:
  """The flags a tool defines, read from its source (importing every tool's flags into one process would
  define some twice)."""
  source = open(os.path.join(ROOT, *module.split(".")) + ".py", encoding="utf-8").read()
  return set(re.findall(r'DEFINE_\w+\(\s*"(\w+)"', source))


def test_every_command_and_flag_exists():
  commands = re.findall(r"^python -m ([\w.]+)(.*)$", _section("Commands"), re.M)
  assert len(commands) >= 5
  for module, args in commands:
    assert hasattr(importlib.import_module(module), "main"), module
    named = set(re.findall(r"--(\w+)(?==|\b)", args)) - {"config"}  # --config.KEY: any config key
    assert named <= _flags_of(module), (module, named - _flags_of(module))


def test_the_record_schema_is_the_parsers():
  kinds = {"bytes": tf.string, "int64": tf.int64}
  documented = {row[0].strip("`"): kinds[row[1]] for row in _table("The data directory")}
  assert documented == {name: feature.dtype for name, feature in records.FEATURES.items()}


def test_the_workdir_names_are_the_trainers():
  documented = {row[0].strip("`").rstrip("/") for row in _table("The workdir")}
  assert documented == set(workdir_lib.FILES)


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(ROOT, "configs", "*.py"))))
def test_every_config_has_the_documented_keys(path):
  name = os.path.basename(path)[:-3]
  if name in ("__init__", "default"):
    return
  keys = [row[0].strip("`") for row in _table("Config keys every training config has")]
  module = importlib.import_module(f"configs.{name}")
  for arg in ("", "smoke"):
    config = module.get_config(arg) if arg else module.get_config()
    assert all(key in config for key in keys), (name, arg, [k for k in keys if k not in config])


def test_the_signatures_are_the_exports():
  """A Serving module around a two-layer model: the names, dtypes and shapes its signatures trace to."""
  model = keras.Sequential([keras.Input((32, 32, 3)), keras.layers.Flatten(), keras.layers.Dense(10)])
  module = export_lib.Serving(model, [0.5] * 3, [0.25] * 3, [f"c{i}" for i in range(10)])
  dtypes = {"uint8": tf.uint8, "string": tf.string, "float32": tf.float32, "int64": tf.int64}
  signatures = module.signatures()
  rows = _table("The SavedModel")
  assert [row[0].strip("`") for row in rows] == list(signatures)
  for name, given, returned in rows:
    function = signatures[name.strip("`")].get_concrete_function()
    key, dtype = re.match(r"`(\w+)` (\w+)", given).groups()
    (spec,) = function.structured_input_signature[0]
    assert (spec.name, spec.dtype) == (key, dtypes[dtype])
    outputs = function.structured_outputs
    if returned != "the same":
      documented = dict(re.findall(r"`(\w+)` (\w+)", returned))
      assert {k: dtypes[v] for k, v in documented.items()} == {k: v.dtype for k, v in outputs.items()}
    assert outputs["probabilities"].shape.as_list() == [None, 10] and outputs["classes"].shape.as_list() == [None]
