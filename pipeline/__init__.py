"""Input pipeline: the record schema, image ops and tf.data assembly (no Keras, no strategy)."""

import importlib.metadata


def project_version() -> str:
  """The installed project's version (pyproject.toml's, from tools/__init__.py), as manifests and run
  records carry it; "unknown" in a checkout run without installing. Read from the installed metadata, not
  `tools.__version__`: `tools` may be another distribution's namespace package (tools/__init__.py)."""
  try:
    return importlib.metadata.version("cifar10-tf-pipeline")
  except importlib.metadata.PackageNotFoundError:
    return "unknown"
