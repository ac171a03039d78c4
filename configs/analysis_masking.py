"""Block importance by channel masking (Section 3.1, Figure 2) on the offline digits.

    python main.py --config=configs/analysis_masking.py --workdir=/tmp/hournas_masking

Trains the quickstart space's network with k3e6 at every searchable layer (so every non-vital
block has a residual branch to mask) with the quickstart's retraining recipe, then evaluates it
on the test digits with one block's output channels zeroed with probability p at a time
(p in 0.3, 0.6, 1.0; 5 masks each): masking.json, masking.png. A few minutes on 2 CPU cores.

Any trained model works: point --workdir at a workdir that holds one (a quickstart run, a
--config.mode=train run) and leave config.train.arch empty (--config.train.arch=''), or set
--config.train.arch to a preset, a JSON file or comma-separated ops to train that here first.
"""

from configs import quickstart


def get_config():
  config = quickstart.get_config()
  config.mode = 'masking'
  config.retrain_after_search = False
  config.random_baseline = False
  config.train.arch = 'k3e6'
  a = config.analysis
  a.blocks = ''
  a.mask_probabilities = '0.3,0.6,1.0'
  a.mask_draws = 5
  return config
