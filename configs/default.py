"""Shared defaults of every HourNAS config; the other files in configs/ start from these.

Run:  python main.py --config=configs/fbnet.py --workdir=/tmp/run [--config.FIELD=VALUE ...]
The config is locked: overriding a field that does not exist is an error.

Schema (every field, with its meaning):
  mode                  'search' (search, write arch.json/summary.txt/plots, then retrain if
                        retrain_after_search), 'train' (train train.arch from scratch),
                        'eval' (evaluate the trained model saved in the workdir), or one of
                        the block-importance analyses 'masking', 'sensitivity', 'saturation'
                        (analysis.*; configs/analysis_*.py), or 'export' (export.*).
  seed                  seeds initialisation, sampling and the data order.
  space, width          search space (fbnet, fbnet_enlarged, mnasnet, efficientnet,
                        fbnet_shallow) and its channel multiplier.
  stem_stride           2 (the papers') or 1 (as CIFAR versions of these networks, for
                        inputs of 32 px or less, where stride 2 leaves most layers at 2x2).
  ops                   a subset of the space's candidate ops, comma-separated ('' = all).
  decoys                real ops to give a decoy twin, comma-separated ('' = none): same
                        params and FLOPs, kernels frozen at their random initial values
                        (hournas_jax/decoys.py; benchmarks/decoys.py tests that a search learns).
  decoy_kind            frozen (the twin keeps the real op's shortcut, so where a layer keeps
                        its shape it can act as a skip) | frozen_no_shortcut (it cannot).
  dataset, data_dir     imagenet2012 | cifar10 | digits | cluttered_digits | the name of any
                        TFDS image classification dataset (mnist, tf_flowers, ...), with its
                        TFDS data_dir ('' = TFDS default) | folder, with data_dir = a directory
                        of class folders of JPEG/PNG images (DIR/<class>/*.jpg, or
                        DIR/train/<class>/ and DIR/test/<class>/).
  data.*                how TFDS datasets by name and folders are split and augmented.
  image_size, channels  input resolution and channels (0 = the dataset's default).
  targets.params/flops  resource targets T_i (0.0 = no target on that resource).
  targets.latency_ms, targets.latency_table   a latency target (ms) and the lookup table
                        measured for the device (python -m hournas_jax.tools.latency; README).
  search.*              the search (see below); passed to hournas_jax.search.Searcher.
  retrain_after_search  search mode: retrain the found architecture right after the search.
  random_baseline       also train random architectures of the same budget and the searched
                        one with several seeds (baseline.*: how many, seeds, processes,
                        epochs) and report where the searched one falls among them, against
                        the noise.
  train.*               the retraining recipe (see below).
  analysis.*            the block-importance analyses (see below).
  checkpoint_every_steps, keep_checkpoints, log_every_steps, tensorboard, proposal_samples,
  xla_fast_compile, compilation_cache_dir   see the comments below.
  distributed.*         a run over several processes (hosts); see below and the README.
  export.*              mode 'export': formats, TFLite precision, latency threads (see below).
"""

import ml_collections


def get_search_config() -> ml_collections.ConfigDict:
  """The paper's search settings (Section 4.1)."""
  s = ml_collections.ConfigDict()
  s.vital_epochs = 1.0       # E_vital: epochs over D_tr (80% of the train split) in stage 1
  s.nonvital_epochs = 1.0    # E_n-vital: epochs in stage 2
  s.vital_steps = 0          # > 0 overrides vital_epochs with a number of weight steps
  s.nonvital_steps = 0       # > 0 overrides nonvital_epochs
  s.batch_size = 256         # global batch of D_tr and D_val
  s.num_proposals = 8        # m
  s.proposal_iterations = 300  # I_sp: Adam steps that fit the space proposals to the targets
  s.proposal_entropy = 0.0   # weight of the proposals' mean normalized entropy in their fit
                             # (Eqn 5 minus it): Eqn 5 alone ends in near one-hot rows that
                             # leave the search nothing to learn; 0 = Eqn 5 alone
  s.tau0 = 5.0               # Gumbel temperature, from 5.0 ...
  s.tau_decay = 0.9999       # ... times 0.9999 every iteration (FBNet's schedule)
  s.weight_lr = 0.1          # SuperNet weights: momentum SGD
  s.momentum = 0.9
  s.weight_decay = 4e-5
  s.arch_lr = 0.01           # theta, Theta, pi: Adam
  s.alpha = 1.0              # slope of the resource term (Eqn 6)
  s.vital_priority = True    # search the vital blocks first and fix their most probable ops
                             # (the joint choice that keeps the targets reachable)
  s.sampler = 'gumbel_max'   # 'gumbel_max' (single path) | 'gumbel_softmax' (FBNet ablation)
  s.engine = ''              # what trains the SuperNet (hournas_jax/engines/): '' = the
                             # sampler's own ('single_path' | 'all_candidates'); 'switch';
                             # 'auto' = single_path on a CPU, switch on an accelerator
  s.schedule = 'interleaved'  # when architecture steps come (Algorithm 1): 'interleaved' = one
                             # D_val step after every val_every D_tr weight steps; 'epoch' =
                             # as the paper writes it: each epoch a full pass of weight steps
                             # over D_tr, then a full pass of architecture steps over D_val
  s.val_every = 0            # interleaved: weight steps per architecture step; 0 = from the
                             # 80/20 split (4)
  s.temperature = 'logits'   # where tau acts: 'logits' = samples from softmax(theta / tau);
                             # 'relaxed' = FBNet's literal reading: samples argmax(theta + g)
                             # at any tau, tau only in the straight-through softmax((theta+g)/tau)
  s.weight_sharing = 'none'  # 'none': each candidate owns its weights (the paper) | 'nested':
                             # a layer's candidates share kernels (centre / first channels of
                             # the largest), as superkernel and once-for-all SuperNets
  s.vital_init = 'uniform'   # theta_vital at the start of stage 1: 'uniform' (zeros) |
                             # 'targets' = the vital rows of a space proposal fitted to the
                             # targets over all layers (S_vital first samples vital ops of
                             # architectures that meet them)
  s.arch_warmup = 0.0        # share of each stage's weight steps before theta / Theta / pi
                             # start moving (D_val batches in that share are skipped): the
                             # SuperNet's weights learn under the initial sampling first, as
                             # FBNet, ProxylessNAS and SPOS warm up the weights
  s.arch_gradient = 'straight_through'  # how theta / Theta / pi learn from the D_val loss:
                             # 'straight_through' = the paper's differentiable estimator (the
                             # gates' d loss / d A through the ST sample; forward + backward);
                             # 'reinforce' = score function (L - b) * grad log p(A), b a moving
                             # average of the loss: unbiased, forward-only (gumbel_max only)
  s.precision = 'float32'    # 'float32' | 'bfloat16': convolutions and matmuls in bfloat16,
                             # parameters, BatchNorm statistics and optimizer states in float32
  s.weight_sampling = 'distribution'  # the SuperNet training recipe: which paths a weight step
                             # trains (hournas_jax/weight_sampling.py; architecture steps always
                             # sample from theta): 'distribution' = one path from theta / Theta /
                             # pi (the paper) | 'uniform' = each layer's op uniform over its
                             # candidates (SPOS) | 'strict_fair' = n paths that take every
                             # candidate of every layer once, gradients summed into one update
                             # (FairNAS) | 'sandwich' = the largest, the smallest and 2 uniform
                             # paths, the others distilled from the largest's predictions
                             # (BigNAS); all but 'distribution' need engine 'single_path'
  s.final_selection = 'mode'  # how the result is read from the final distribution
                             # (hournas_jax/final_selection.py): 'mode' = each layer's most
                             # probable op (the paper) | 'inherited' = the best of
                             # final_candidates architectures within the targets by top-1 on
                             # D_val with the SuperNet's weights (SPOS, OFA; engine
                             # 'single_path')
  s.final_candidates = 16    # 'inherited': the distribution's most probable architectures scored
  return s


def get_train_config() -> ml_collections.ConfigDict:
  """Retraining recipe; defaults are FBNet's (the space configs set their baseline's)."""
  t = ml_collections.ConfigDict()
  t.arch = ''                # '' = the workdir's searched arch.json; a preset name
                             # (hournas_a, ...); a JSON path; or comma-separated ops
  t.epochs = 360.0
  t.steps = 0                # > 0 overrides epochs with a number of steps
  t.batch_size = 1024
  t.eval_batch_size = 1000
  t.eval_every_steps = 0     # 0 = evaluate at the end only
  t.optimizer = 'sgd'        # 'sgd' | 'rmsprop' | 'adamw' (weight_decay decoupled)
  t.learning_rate = 0.1      # per 256 images when lr_scaling == 'linear'
  t.lr_scaling = 'linear'    # 'linear' (x batch_size / 256) | 'none'
  t.schedule = 'cosine'      # 'cosine' | 'exponential' | 'constant'
  t.warmup_epochs = 0.0
  t.decay_rate = 0.97        # exponential: x decay_rate every decay_epochs (staircase)
  t.decay_epochs = 2.4
  t.momentum = 0.9
  t.nesterov = False
  t.rmsprop_decay = 0.9
  t.rmsprop_epsilon = 1e-3
  t.weight_decay = 4e-5      # L2 on conv/dense kernels
  t.label_smoothing = 0.1
  t.ema_decay = 0.0          # > 0: evaluate an exponential moving average of the weights
  t.dropout_rate = 0.0       # before the classifier
  t.precision = 'float32'    # 'float32' | 'bfloat16' (mixed precision, as search.precision)
  t.snapshot_every_epochs = 0.0  # > 0: keep the weights every this many epochs (and at steps
                             # 0 and the last) in <run>/snapshots, for the saturation analysis
  return t


def get_baseline_config() -> ml_collections.ConfigDict:
  """The comparison with random architectures of the same budget (config.random_baseline)."""
  b = ml_collections.ConfigDict()
  b.architectures = 6        # random architectures within 5% of the targets
  b.seeds = 2                # training seeds of each (and of the searched one): the noise
  b.workers = 0              # processes training at once; 0 = one per core on a CPU, 1 else
  # > 0: every member (the searched architecture too) trains this many epochs instead of
  # config.train.epochs, the rest of the recipe unchanged: a cheaper comparison where full
  # trainings cost too much. Short trainings rank less reliably (the README's "Compile time"
  # note has the quickstart at 10 epochs), so the default is the full recipe.
  b.epochs = 0.0
  return b


def get_analysis_config() -> ml_collections.ConfigDict:
  """The block-importance analyses (modes 'masking', 'sensitivity', 'saturation')."""
  a = ml_collections.ConfigDict()
  a.blocks = ''              # comma-separated blocks to mask ('' = the stem and every
                             # searchable layer) or to enumerate ('' = every searchable layer)
  a.mask_probabilities = '0.3,0.6,1.0'  # p of M(y, p): each output channel zeroed with p
  a.mask_draws = 5           # masks drawn per (block, p); accuracies averaged over them
  a.backbones = 'k3e1,k3e3,k3e6,k5e1,k5e3,k5e6'  # sensitivity: the op every other block has
  a.candidate_ops = 'k3e1,k3e3,k3e6,k5e1,k5e3,k5e6,skip'  # sensitivity: ops a block is
                             # enumerated over (those it does not allow are left out)
  a.seeds = 1                # sensitivity: training seeds per model
  a.workers = 0              # sensitivity: processes training at once; 0 = one per core on a
                             # CPU, 1 else
  return a


def get_export_config() -> ml_collections.ConfigDict:
  """Mode 'export': the workdir's trained model (or train.arch with fresh weights when there is
  none) to <workdir>/export, each file checked against the JAX model (hournas_jax/export/)."""
  e = ml_collections.ConfigDict()
  e.formats = 'jax,tflite'   # comma-separated: 'jax' (jax.export StableHLO, symbolic batch),
                             # 'tflite' (builtin ops, batch 1), 'onnx' (from the float32 TFLite
                             # model; needs pip install -r requirements-export.txt)
  e.tflite_precision = 'float32'  # comma-separated: 'float32' | 'float16' (float16 weights) |
                             # 'int8' (full-integer post-training quantization, calibrated on
                             # calibration_examples training images)
  e.examples = 32            # inputs compared with the JAX model (the eval split's first ones;
                             # random normal inputs for fresh weights)
  e.calibration_examples = 100  # int8: training images for the representative dataset
  e.threads = '1'            # comma-separated thread counts the latency is measured with
  e.warmup = 10              # latency at batch 1: runs before timing ...
  e.repeats = 50             # ... and timed runs (the median is reported)
  return e


def get_distributed_config() -> ml_collections.ConfigDict:
  """A run over several processes (hosts): JAX's distributed runtime, one process per host."""
  d = ml_collections.ConfigDict()
  d.coordinator_address = ''   # HOST:PORT of process 0 ('' = $JAX_COORDINATOR_ADDRESS)
  d.num_processes = 0          # 0 = $JAX_NUM_PROCESSES
  d.process_id = -1            # this process, in [0, num_processes) (-1 = $JAX_PROCESS_ID)
  d.auto_detect = False        # with none of the three set: let JAX detect the cluster
                               # (SLURM, Cloud TPU, MPI, Kubernetes)
  d.initialization_timeout_s = 120  # give up when the coordinator or a peer does not answer
  d.heartbeat_timeout_s = 60   # stop when a peer has not been heard from for this long
  return d


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.mode = 'search'
  config.seed = 0

  config.space = 'fbnet'
  config.width = 1.0
  config.ops = ''              # comma-separated subset of the space's candidate ops ('' = all)
  config.decoys = ''           # real ops that get an equal-cost twin that cannot learn ('' = none)
  config.decoy_kind = 'frozen'  # or 'frozen_no_shortcut' (hournas_jax/decoys.py, FLAVOURS)
  config.stem_stride = 2       # 1 keeps small inputs at full resolution through the first stage

  config.dataset = 'imagenet2012'
  config.data_dir = ''
  config.image_size = 0
  config.channels = 0
  # How TFDS datasets and folders of images are split and augmented (the offline datasets
  # have fixed splits; imagenet2012 and cifar10 keep their own augmentation).
  config.data = ml_collections.ConfigDict()
  config.data.train_split = 'train'   # TFDS: the split (or slice, 'train[:80%]') to train on;
                                      # D_tr / D_val are its first 80% / the rest
  config.data.eval_split = ''         # TFDS: the test split ('' = 'test', else 'validation');
                                      # a slice ('train[80%:]') for datasets with only 'train'
  config.data.holdout_fraction = 0.2  # folder without a test/ folder: share of each class's
                                      # images held out as the test set
  config.data.split_seed = 0          # folder: which images are held out and the order D_tr /
                                      # D_val are cut from; apart from config.seed, so that
                                      # every training seed is tested on the same images
  config.data.random_flip = True      # TFDS by name and folder: mirror training images
                                      # left-right (False for digits, text, ...)

  config.targets = ml_collections.ConfigDict()
  config.targets.params = 4.8e6
  config.targets.flops = 300e6
  config.targets.latency_ms = 0.0     # predicted latency target (ms); 0.0 = none
  config.targets.latency_table = ''   # the table to predict it from (JSON, hournas_jax/latency/)

  config.search = get_search_config()
  config.retrain_after_search = True
  config.random_baseline = False
  config.baseline = get_baseline_config()
  config.train = get_train_config()
  config.analysis = get_analysis_config()

  config.checkpoint_every_steps = 1000  # and at every stage boundary / the end of a phase
  config.keep_checkpoints = 2           # complete checkpoints kept per phase
  config.log_every_steps = 100          # progress line + TensorBoard scalars
  config.tensorboard = True             # event files under <workdir>/tensorboard/<phase>
  config.proposal_samples = 2000        # architectures drawn for the Figure-3 scatter
  config.xla_fast_compile = False      # jax_disable_most_optimizations: compiles several
                                        # times faster; for tiny CPU runs (quickstart, tests)
  config.compilation_cache_dir = '~/.cache/hournas_jax/xla'  # persistent XLA compilation
                                        # cache: reruns and resumes skip compiles ('' = off)
  config.distributed = get_distributed_config()
  config.export = get_export_config()
  return config


# The fields in which the recipe that learns in the decoy test differs from the paper's
# (README, "What the decoys cost, and a recipe that learns"), and its values of them.
LEARNING_RECIPE = {'weight_sampling': 'sandwich', 'arch_gradient': 'reinforce', 'val_every': 1,
                   'proposal_entropy': 0.01, 'final_selection': 'inherited'}


def use_learning_recipe(s: ml_collections.ConfigDict) -> None:
  """Sets the search config `s` (config.search) to the recipe that learns in the decoy test.

  A SuperNet trained by the sandwich rule, so that paths through good ops train well enough to
  differ from the others; the score-function gradient, which reads that difference from the
  sampled path's D_val loss where the straight-through slope does not, with an architecture
  step after every weight step, since it needs many samples; proposals kept from collapsing to
  one architecture, so that theta has rows left to move; the final architecture chosen by
  inherited accuracy among the distribution's most probable ones. A weight step trains 4 paths,
  so the search takes 1.5-2.5x the paper recipe's time (README, Search quality).
  """
  s.update(LEARNING_RECIPE)


def use_paper_recipe(s: ml_collections.ConfigDict) -> None:
  """Sets the fields of `LEARNING_RECIPE` in the search config `s` back to the paper's
  (`get_search_config`'s): the path sampled from the distribution trains, straight-through
  architecture gradients at the D_tr/D_val split's cadence, proposals fitted to the targets
  alone, the result read off the mode."""
  paper = get_search_config()
  s.update({k: paper[k] for k in LEARNING_RECIPE})


SEARCH_RECIPES = {'paper': use_paper_recipe, 'learned': use_learning_recipe}


def use_search_recipe(s: ml_collections.ConfigDict, recipe: str, config_name: str) -> None:
  """Sets the search config `s` to the recipe a config file's variant names (`SEARCH_RECIPES`);
  config_name: that file's, for the message when the name is unknown."""
  if recipe not in SEARCH_RECIPES:
    raise ValueError(f'unknown {config_name} variant {recipe!r}; choose one of '
                     f'{", ".join(SEARCH_RECIPES)}')
  SEARCH_RECIPES[recipe](s)
