"""CIFAR-10 facts, kept in one place for the whole project."""

IMAGE_SIZE = 32
CHANNELS = 3
IMAGE_SHAPE = (IMAGE_SIZE, IMAGE_SIZE, CHANNELS)
RAW_BYTES = IMAGE_SIZE * IMAGE_SIZE * CHANNELS  # one raw HWC uint8 image
NUM_CLASSES = 10
CLASS_NAMES = ("airplane", "automobile", "bird", "cat", "deer",
               "dog", "frog", "horse", "ship", "truck")

# Per-channel statistics of the official CIFAR-10 training set, in [0, 1] units. Used only when a
# manifest carries none (make_tfrecords computes the training split's own into the manifest).
MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.2470, 0.2435, 0.2616)

SPLITS = ("train", "validation", "test")
