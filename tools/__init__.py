"""Command-line tools: make_tfrecords, evaluate, predict, benchmarks."""

__version__ = "0.1.0"
