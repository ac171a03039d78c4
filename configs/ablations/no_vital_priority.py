"""HourNAS-G / HourNAS-H (Table 4): the search without the vital-block priority.

"All the blocks in the SuperNet S are treated equally, rather than the two-stage scheme": one
stage searches every SuperBlock with Gumbel-Max sampling and 8 space proposals, under the same
targets as HourNAS-A / HourNAS-C (4.8M params / 300M FLOPs), and "the SuperNet [trains] for 6
hours, which is twice of the counterparts". Twice the counterparts' search steps: their 1 vital
+ 1 non-vital epochs of weight steps become 4 epochs of the single stage. (Read as time instead,
6 hours of the whole SuperNet at the non-vital stage's 2 hours an epoch would be 3 epochs:
--config.search.nonvital_epochs=3.)

Variants:
    --config=configs/ablations/no_vital_priority.py     HourNAS-G, the FBNet space (default)
    --config=configs/ablations/no_vital_priority.py:h   HourNAS-H, the enlarged FBNet space
Retraining as the counterparts (configs/fbnet.py: FBNet's recipe).
"""

from configs import fbnet as fbnet_lib
from configs import fbnet_enlarged as fbnet_enlarged_lib

VARIANTS = {'g': 'fbnet', 'h': 'fbnet_enlarged'}


def get_config(variant: str = 'g'):
  if variant not in VARIANTS:
    raise ValueError(f'unknown no_vital_priority variant {variant!r}; choose one of '
                     f'{", ".join(VARIANTS)}')
  config = fbnet_lib.get_config('a') if variant == 'g' else fbnet_enlarged_lib.get_config('c')
  ablate(config.search)
  return config


def ablate(s):
  """Turns the search config `s` (config.search) into its no-vital-priority ablation."""
  s.vital_priority = False
  s.nonvital_epochs = 2 * (s.vital_epochs + s.nonvital_epochs)
  s.vital_epochs = 0.0  # no vital stage
