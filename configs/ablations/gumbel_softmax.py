"""HourNAS-I (Table 5): the search with FBNet's Gumbel softmax instead of Gumbel-Max sampling.

"In the search phase, we use the Gumbel softmax rather than the Gumbel-Max sampling to optimize
architecture parameters and network parameters. The search space and target resource
constraints are the same as HourNAS-A": the FBNet space, 4.8M params / 300M FLOPs, the two
stages and 8 proposals as configs/fbnet.py. Every candidate of every searched layer runs each
step, weighted by softmax((theta + g) / tau) (in stage 2, of the proposal that pi samples), so
a step costs about as many times a single path's as there are candidates ("around 1 GPU day"
against HourNAS-A's 0.1), and memory grows alike: lower --config.search.batch_size if it does
not fit.

    python main.py --config=configs/ablations/gumbel_softmax.py --workdir=/tmp/hournas_i
"""

from configs import fbnet as fbnet_lib


def get_config():
  config = fbnet_lib.get_config('a')
  ablate(config.search)
  return config


def ablate(s):
  """Turns the search config `s` (config.search) into its Gumbel-softmax ablation."""
  s.sampler = 'gumbel_softmax'
  # Every candidate runs in every step, weighted by the relaxed sample: there is no sampled path
  # for a score-function gradient, another recipe's paths or a choice by one path's inherited
  # accuracy to work on, so a base config that uses them (configs/search_quality.py) gets the
  # relaxation's own.
  s.arch_gradient = 'straight_through'
  s.weight_sampling = 'distribution'
  s.final_selection = 'mode'
