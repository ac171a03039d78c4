"""The offline quickstart: a scaled-down HourNAS run on scikit-learn's 8x8 digits.

    python main.py --config=configs/quickstart.py --workdir=/tmp/hournas_quickstart

No download, no accelerator: in about 3 minutes on 2 CPU cores it searches a small FBNet space
(fbnet_shallow: 12 SuperBlocks at width 0.25 with 4 of FBNet's candidate ops, 16x16 inputs,
10 classes), retrains the found architecture from scratch, trains it and 6 random architectures
of the same budget with 2 seeds each (config.baseline), and prints where it falls among them.

What is scaled down from the paper, and why:
- 4 candidate ops (k3e1, k3e6, k5e3, skip) instead of 9: on a CPU the search's cost is XLA
  compiling one program per (layer, op) it samples (~1 s each), not the steps;
- each stage runs 6 epochs of D_tr (210 steps) instead of 1 epoch of ImageNet's 1M images, and
  the architecture parameters, which get one D_val step per 4 weight steps (the 80/20 split),
  move with Adam at 0.1 instead of 0.01 and tau x0.995 a step instead of x0.9999, so that they
  leave their initial values within those few steps;
- retraining: 40 epochs of the 1437 training digits with FBNet's recipe (SGD momentum 0.9,
  cosine, label smoothing 0.1, weight decay 4e-5) at 0.2 x batch/256 after a 2-epoch linear
  warm-up: at FBNet's rate without warm-up, 2 of 30 trainings of these narrow networks stalled
  (57.5% and 89.4% where their siblings reached 97-99%; benchmarks/seed_noise.py, README).

The search uses the paper's recipe; `--config=configs/quickstart.py:learned` uses the one that
learns in the decoy test (configs/default.py, use_learning_recipe; the default of
configs/search_quality.py), at 1.5x the search time here (README, Search quality).
"""

from configs import default as default_lib


def get_config(variant: str = 'paper'):
  """variant: 'paper', the paper's search recipe, or 'learned', the one that learns in the
  decoy test (configs/default.py, use_learning_recipe; 1.5x the search time here):
  `--config=configs/quickstart.py:learned`."""
  config = default_lib.get_config()
  config.space = 'fbnet_shallow'
  config.width = 0.25
  config.ops = 'k3e1,k3e6,k5e3,skip'
  config.dataset = 'digits'
  config.image_size = 16
  config.channels = 1
  # This space spans 62k-176k params and 81k-326k FLOPs (python -m hournas_jax.tools.profile).
  config.targets.params = 120e3
  config.targets.flops = 220e3

  s = config.search
  s.batch_size = 32
  s.vital_epochs = 6.0
  s.nonvital_epochs = 6.0
  s.tau_decay = 0.995
  s.weight_lr = 0.1
  s.arch_lr = 0.1
  s.weight_sharing = 'nested'  # as configs/search_quality.py, where the benchmark chose them
  s.vital_init = 'targets'
  default_lib.use_search_recipe(s, variant, 'quickstart')

  config.retrain_after_search = True
  config.random_baseline = True
  t = config.train
  t.epochs = 40.0
  t.batch_size = 64
  t.eval_batch_size = 360
  t.optimizer = 'sgd'
  # Half FBNet's rate after a warm-up: over 10 architectures x 3 seeds the seed std went from
  # 3.38 points to 0.72 (warm-up alone), 0.78 (half rate alone) and 0.59 (both; no run 3
  # points below its siblings). benchmarks/seed_noise.py; README, Seed noise.
  t.learning_rate = 0.2       # per 256 images: 0.05 at batch 64
  t.lr_scaling = 'linear'
  t.schedule = 'cosine'
  t.warmup_epochs = 2.0
  t.momentum = 0.9
  t.weight_decay = 4e-5
  t.label_smoothing = 0.1

  config.checkpoint_every_steps = 100
  config.log_every_steps = 50
  config.proposal_samples = 2000
  # XLA's optimisations pay for themselves even here: with them, retraining (880 steps) ran
  # 3.7x faster a step (6,100 against 1,660 images/s, 36 s against 54 s in all, cold cache)
  # and the search no slower (57 s against 60 s, the same architecture found).
  config.xla_fast_compile = False
  return config
