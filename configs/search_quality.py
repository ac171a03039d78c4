"""The search-quality task: does the search beat random architectures of the same budget?

    python benchmarks/search_quality.py                       # the benchmark (uses this config)
    python main.py --config=configs/search_quality.py --workdir=/tmp/sq   # one search + retraining

Offline and CPU-sized: cluttered digits (hournas_jax/data/cluttered.py: scikit-learn's digits
at a random position of a 24x24 canvas among fragments of other digits; a fixed 10,000-image
test set), the shallow FBNet space of Table 6 (12 SuperBlocks, its 7 ops without the grouped
ones) at width 0.25 with a stride-1 stem, so the 12 SuperBlocks see 24x24 down to 2x2 and
kernel size and where capacity sits change the accuracy. The budget sits in the middle of the
space (python -m hournas_jax.tools.profile --space fbnet_shallow --resolution 24 ...).

Retraining recipe (every architecture, searched or random, trained alike): SGD with momentum at
0.2 x batch/256 (0.025 at batch 32; 0.1 and above diverges or stalls this narrow network),
cosine, 20 epochs of the 1437 source digits, each epoch rendered afresh.
"""

from configs import default as default_lib


def get_config(variant: str = 'learned'):
  """variant: 'learned' (the recipe that learns in the decoy test, configs/default.py's
  use_learning_recipe) or 'paper' (the paper's search recipe, which the README's runs used
  unless they say otherwise): `--config=configs/search_quality.py:paper`."""
  config = default_lib.get_config()
  config.space = 'fbnet_shallow'
  config.width = 0.25
  config.ops = 'k3e1,k3e3,k3e6,k5e1,k5e3,k5e6,skip'
  config.stem_stride = 1
  config.dataset = 'cluttered_digits'
  config.image_size = 24
  config.channels = 1
  config.targets.params = 120e3
  config.targets.flops = 1.45e6

  s = config.search
  s.batch_size = 32
  # Stage 1 twice as long as stage 2: S_vital has no shortcut around any layer and trains
  # slowly, and its ops are decided once for every path. At 10 epochs the learning recipe took
  # an equal-cost decoy in 12 of 90 vital layers (each one costing the network 4-49 points),
  # at 20 in 0 of 36 (benchmarks/decoys.py; README, Search quality).
  s.vital_epochs = 20.0
  s.nonvital_epochs = 10.0
  s.tau_decay = 0.998         # 5.0 -> ~0.6 over the 1,050 steps of the two stages
  s.weight_lr = 0.025
  s.arch_lr = 0.1
  s.weight_sharing = 'nested'
  s.vital_init = 'targets'    # benchmarks/search_quality.py: uniform theta_vital picks the vital
                              # ops from noise here (README, Search quality)
  # The recipe that learns in the decoy test, where the paper's does not (README, Search
  # quality).
  default_lib.use_search_recipe(s, variant, 'search_quality')

  config.retrain_after_search = True
  config.random_baseline = False
  t = config.train            # otherwise the default's: SGD, momentum 0.9, cosine, LS 0.1
  t.epochs = 20.0
  t.batch_size = 32
  t.learning_rate = 0.2       # per 256 images: 0.025 at batch 32

  config.checkpoint_every_steps = 200
  config.log_every_steps = 100
  config.proposal_samples = 2000
  return config
