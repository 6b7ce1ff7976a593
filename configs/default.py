"""Every config field, with its unit. Other configs import this and override only what differs.

  python -m trainer.main --config=configs/default.py --workdir=/tmp/run --config.data_dir=/tmp/c10
  python -m trainer.main --config=configs/default.py:smoke ...   # seconds on a CPU
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.data_dir = ""  # directory written by python -m tools.make_tfrecords (local or gs://)
  config.num_epochs = 10  # passes over the train split
  config.steps_per_epoch = 0  # steps per epoch; 0 = train images // global_batch_size (>0 caps it: smoke runs)
  config.global_batch_size = 512  # images per step over all replicas; must divide by the replica count
  config.eval_batch_size = 1000  # images per evaluation step over all replicas (rounded up to a multiple of them)
  config.eval_steps = 0  # evaluation batches per split; 0 = the whole split (>0 caps it: smoke runs)
  config.seed = 0  # seeds initialisation, data order and augmentation
  config.deterministic = False  # True: TensorFlow's ops deterministic too, so the same seed gives bit-identical
                                # weights (slower on GPUs); the batches are the same in both modes
  config.mixed_precision = "float32"  # float32 | mixed_float16 (GPU) | mixed_bfloat16 (A100+, AVX512-BF16, AMX) |
                                      # auto: what pays on this hardware (trainer/precision.py); a resume keeps it
  config.logical_cpus = 0  # split the CPU into N logical devices so MirroredStrategy has N replicas; 0 = off
  config.strategy = "mirrored"  # mirrored | multi_worker | one_device; on a cluster of several tasks: multi_worker
  config.cluster = "auto"  # where the workers come from: auto (TF_CONFIG when set, else the SLURM step this runs
                           # in, else this node alone) | tf_config | slurm | local (trainer/cluster.py)
  config.cluster_port = 8888  # SLURM steps without reserved ports: the first of the 4072 ports their tasks' ports
                             # derive from, by job and step id (trainer/cluster.py, BUILD.md's SLURM section)
  config.cluster_wait_secs = 600  # seconds a task of a cluster waits for all the others before it stops, naming
                                  # those that never came (pods and nodes may start minutes apart)
  config.lease_secs = 120  # seconds without renewal after which a run's lease on its workdir (trainer/lease.py) may
                          # be taken over by another start (a holder killed on another node); renewed every 1/4
  config.allow_cpu = False  # train although the GPUs the environment gave (CUDA_VISIBLE_DEVICES, SLURM) are
                            # not seen by TensorFlow (trainer/gpus.py); False: refuse, naming the variable
  config.steps_per_loop = 10  # train steps inside one tf.function call; Python runs between calls
  config.jit_compile = False  # XLA-compile each replica's forward+backward pass (not with sync_bn; off: NOTES.md)
  config.log_every_steps = 50  # steps between progress lines and train summaries
  config.eval_every_epochs = 1  # epochs between validation passes while training; 0 = only the final one
  config.checkpoint_every_steps = 0  # steps between checkpoints; 0 = at the end of every epoch only
  config.summary_flush_secs = 60.0  # seconds: longest a TensorBoard event waits in memory (always flushed on exit)
  config.summary_worst_images = 16  # per evaluation, TensorBoard gets a confusion matrix and this many of the
                                    # worst misclassified validation images; 0 = neither
  config.profile_steps = ()  # (first, end): a profiler trace of train steps first..end-1 in workdir/summaries
  config.progress_bar = True  # a progress bar on stdout when it is a terminal (log lines are written anyway)
  config.keep_checkpoints = 3  # checkpoints kept in workdir/checkpoints
  config.stop_exit_code = 0  # exit code after a stop request (SIGTERM) checkpointed the run before its end;
                             # Kubernetes Jobs: 75, so the pod is replaced rather than counted done (BUILD.md)
  config.export = True  # write the SavedModel to workdir/export at the end
  config.export_precision = "float32"  # what the export (and the final evaluation) computes in: float32 |
                                       # bfloat16 | float16; whatever the training's mixed_precision was
  config.export_versions = 3  # numbered exports kept in workdir/serving (TF Serving's model base path); 0 = none
  config.tta = "none"  # test-time views in the final evaluation and the export: none | flip | flip_translate |
                     # flip_translate4 (trainer/views.py)
  config.label_smoothing = 0.0  # probability mass spread evenly over all classes
  config.bn_statistics_images = 0  # after training, BatchNorm statistics re-estimated over this many unaugmented
                                  # train images with the final weights ("precise BN"); 0 = keep the running ones

  config.model = ml_collections.ConfigDict()
  config.model.name = "resnet"  # a key of trainer.models.BUILDERS
  config.model.stem_width = 32  # channels of the first conv
  config.model.widths = (64, 128, 256)  # channels per stage; each stage halves the resolution
  config.model.blocks_per_stage = 1  # residual blocks (two convs each) per stage
  config.model.activation = "relu"  # any Keras activation name
  config.model.bn_momentum = 0.9  # moving-average decay of BatchNorm statistics, per step
  config.model.sync_bn = False  # BatchNorm statistics over the global batch (costs an all-reduce per layer)
  config.model.fast_kernels = True  # BatchNorm by TF's fused kernel, GELU XLA-compiled while training, and on a
                                     # CPU the convs' slow backward kernels replaced (same results; docs/results.md);
                                     # False: Keras's own layers
  config.model.logit_scale = 1.0  # multiplies the logits
  config.model.whiten_size = 2  # airbench: patch side of the frozen whitening conv initialised from the data
  config.model.whiten_epsilon = 5e-4  # airbench: added to the patch covariance's eigenvalues before 1/sqrt
  config.model.head_init_std = 0.0  # airbench: std of the head's initial kernel; 0 = PyTorch's default
  config.model.whiten_bias_epochs = 3  # airbench: epochs the whitening conv's bias trains before it freezes
  config.model.group_convs = 2  # airbench: convs per group: 2 (airbench94) | 3 (airbench96: the last two residual)
  config.model.last_group_convs = 0  # airbench: convs in the last group (2 | 3); 0 = group_convs
  # plain_cnn and mlp (the tutorial models; see trainer/models.py):
  config.model.convs_per_block = 2  # plain_cnn: convs before each pool
  config.model.padding = "same"  # plain_cnn: same | valid
  config.model.norm = "none"  # plain_cnn: none | post (BatchNorm after each conv's activation)
  config.model.block_dropout = (0.0,)  # plain_cnn: dropout rate after each block (one value for all, or one each)
  config.model.pool_after_last = True  # plain_cnn: max-pool after the last block too
  config.model.dense = ()  # plain_cnn, mlp: widths of the hidden dense layers
  config.model.dense_dropout = 0.0  # plain_cnn: dropout rate after each hidden dense layer
  config.model.l2 = 0.0  # plain_cnn: L2 penalty on the kernels, added to the loss
  config.model.initializer = "glorot_uniform"  # plain_cnn: kernel initializer

  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "sgd"  # sgd | muon (Muon for conv kernels, SGD for the rest) | adam | rmsprop
  config.optimizer.learning_rate = 0.2  # peak learning rate, for the global batch as configured
  config.optimizer.momentum = 0.9  # SGD momentum
  config.optimizer.nesterov = True  # Nesterov momentum
  config.optimizer.weight_decay = 5e-4  # decoupled decay per step, multiplied by the learning rate
  config.optimizer.schedule = "cosine"  # cosine | constant | triangular | piecewise (trainer/optim.py)
  config.optimizer.warmup_epochs = 1.0  # epochs: linear warmup from 0 (cosine, constant); the peak (triangular)
  config.optimizer.triangular_start = 0.2  # triangular: learning rate at step 0, as a fraction of the peak
  config.optimizer.triangular_end = 0.0  # triangular: learning rate at the last step, as a fraction of the peak
  config.optimizer.piecewise_epochs = (5.0, 8.0)  # piecewise: epochs where the learning rate changes
  config.optimizer.piecewise_multipliers = (1.0, 0.1, 0.01)  # piecewise: fractions of learning_rate, one more
  config.optimizer.muon_learning_rate = 0.24  # muon: peak step size of the conv kernels (same schedule)
  config.optimizer.muon_momentum = 0.6  # muon: Nesterov momentum of the conv kernels
  config.optimizer.bn_bias_lr_scale = 1.0  # learning-rate multiplier of BatchNorm biases (airbench: 64)
  config.optimizer.whiten_bias_lr_scale = 1.0  # learning-rate multiplier of the patch-whitening bias (airbench: 64)
  config.optimizer.head_lr_scale = 1.0  # learning-rate multiplier of the logits layer's kernel
  config.optimizer.lookahead_every = 0  # steps between lookahead averaging (airbench: 5); 0 = off
  config.optimizer.lookahead_decay = 0.95 ** 5  # lookahead: the average's weight at the last step (ramps as step^3)
  config.optimizer.clip_norm = 0.0  # clip the global gradient norm to this; 0 = off
  config.optimizer.ema_decay = 0.0  # per step: EMA of the weights used for evaluation and export; 0 = off

  config.augment = ml_collections.ConfigDict()  # see pipeline/augment.py; all off at 0
  config.augment.crop_padding = 4  # pixels: random translate with reflected borders (= reflect-pad + crop)
  config.augment.flip = "random"  # none | random (p=1/2) | alternating (each image flips every other epoch)
  config.augment.rotation_degrees = 0.0  # degrees: random rotation in +-this
  config.augment.shift_fraction = 0.0  # fraction of the side: random shift in +-this on each axis
  config.augment.zoom_fraction = 0.0  # random zoom by a factor in [1 - this, 1 + this]
  config.augment.cutout_size = 0  # pixels: side of the square blanked at a random place
  config.augment.cutout_probability = 1.0  # probability an image gets the cutout square
  config.augment.cutout_inside = False  # the square wholly inside the image (airbench96), not centred anywhere
  config.augment.cutout_fill = "black"  # black | mean (the normalisation's mean: 0 once normalised, airbench96)
  config.augment.contrast = 0.0  # colour jitter: each normalised image scaled by a factor in [1 - this, 1 + this]
  config.augment.brightness = 0.0  # ... then shifted by a uniform draw in +-this (in std units, every channel)
  config.augment.mixup_alpha = 0.0  # Beta(alpha, alpha) mixing weight of mixup; 0 = off
  config.augment.cutmix_alpha = 0.0  # Beta(alpha, alpha) box area of cutmix; 0 = off
  config.augment.mix_probability = 1.0  # probability a batch is mixed (when mixup or cutmix is on)

  config.input = ml_collections.ConfigDict()
  config.input.cache_in_memory = True  # decode the split once into RAM; False streams from the shards
  config.input.shuffle_buffer = 10000  # records per shuffled window when streaming
  config.input.interleave_cycle = 4  # shards read at once when streaming
  config.input.normalization = "dataset"  # dataset: z-score by the train split's mean/std; centered; unit
  config.input.verify_checksums = True  # re-hash every shard against manifest.json before training
  config.input.augment_on = "host"  # host: tf.data augments and normalises; device: inside the train step
  config.input.probe_batches = 0  # batches of the train pipeline timed alone at start (TensorBoard
                                  # input/images_per_sec, what the host can feed; 20 costs ~2 s); 0 = off
  config.input.data_service = ""  # grpc://host:port of a tf.data service dispatcher whose DispatcherConfig lists
                                  # its workers (each makes every n-th batch); "" = in-process tf.data

  return variant(config, arg)


def variant(config: ml_collections.ConfigDict, arg: str | None, others: tuple[str, ...] = ()
            ) -> ml_collections.ConfigDict:
  """Applies the `:ARG` of `--config=FILE:ARG`: none, or `smoke`; `others` names the calling config's own
  variants (already applied) for the error message."""
  if arg == "smoke":
    return smoke(config)
  if arg:
    raise ValueError(f"unknown config variant {arg!r}; known: {', '.join(others + ('smoke',))}")
  return config


def tutorial(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """What the seed tutorials share: a constant learning rate with no warmup and no weight decay, pixels
  / 255, no augmentation, no label smoothing. Their configs start here and set what differs."""
  config.optimizer.schedule = "constant"
  config.optimizer.warmup_epochs = 0.0
  config.optimizer.weight_decay = 0.0
  config.input.normalization = "unit"
  config.augment.crop_padding = 0
  config.augment.flip = "none"
  config.label_smoothing = 0.0
  return config


def smoke(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Shrinks a config to a run of seconds on a CPU, for tests and demos."""
  config.num_epochs = 2
  config.steps_per_epoch = 4
  config.global_batch_size = 32
  config.eval_batch_size = 250
  config.eval_steps = 2  # 500 images per split: the start-up and end of a real run, not its evaluation
  config.steps_per_loop = 2
  config.log_every_steps = 2
  config.model.stem_width = 8
  config.model.widths = (8, 16)
  return config
