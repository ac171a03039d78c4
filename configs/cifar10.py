"""HourNAS on CIFAR-10 (Table 1): the FBNet space at 32x32, 10 classes.

The paper's CIFAR-10 models have ~2.8M params; the search has no FLOPs target here
(--config.targets.flops=... adds one). At 32x32 the FBNet space spans 0.80M-3.79M params.
Search: the paper's settings (1 epoch per stage, m = 8, ...) at batch 64.
Retraining: the DARTS-style CIFAR recipe the paper's "+ cutout" rows point to: SGD momentum 0.9,
learning rate 0.025 at batch 96 (not scaled), cosine over 600 epochs, weight decay 3e-4 on the
kernels, no label smoothing. Cutout, drop-path and the auxiliary head are not implemented.
"""

from configs import default as default_lib


def get_config():
  config = default_lib.get_config()
  config.space = 'fbnet'
  config.dataset = 'cifar10'
  config.image_size = 32
  config.targets.params = 2.8e6
  config.targets.flops = 0.0
  config.search.batch_size = 64

  t = config.train
  t.epochs = 600.0
  t.batch_size = 96
  t.eval_batch_size = 500
  t.optimizer = 'sgd'
  t.learning_rate = 0.025
  t.lr_scaling = 'none'
  t.schedule = 'cosine'
  t.momentum = 0.9
  t.weight_decay = 3e-4
  t.label_smoothing = 0.0
  config.log_every_steps = 100
  return config
