"""Command-line tools: make_tfrecords, evaluate, predict, benchmarks."""

import os

# TensorFlow's C++ INFO/WARNING lines (CUDA probing on CPU hosts, oneDNN notices) drown the tools' own
# output; errors still show. Set TF_CPP_MIN_LOG_LEVEL yourself to see everything.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

__version__ = "0.1.0"
