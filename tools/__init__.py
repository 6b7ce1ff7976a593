"""Command-line tools: make_tfrecords, evaluate, predict, benchmarks."""

import os

# TensorFlow's C++ INFO/WARNING lines (CUDA probing on CPU hosts, oneDNN notices) drown the tools' own
# output; errors still show. Set TF_CPP_MIN_LOG_LEVEL yourself to see everything.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# Before any tool imports TensorFlow: `trainer` sets TensorFlow's oneDNN and host-allocator choices, which
# TensorFlow reads at its import, so that a tool runs the kernels the trainer runs (trainer/__init__.py).
import trainer  # pylint: disable=unused-import,wrong-import-position

__version__ = "0.1.0"
