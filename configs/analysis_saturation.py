"""Weight saturation per layer (Appendix B, Eqn 7) on the offline digits.

    python main.py --config=configs/analysis_saturation.py --workdir=/tmp/hournas_saturation

Trains the quickstart space's network with k3e6 at every searchable layer with the quickstart's
recipe, keeping the weights after every epoch (<workdir>/train/snapshots), then plots
C_t = 1 - D(w_t, w_T) / D(w_0, w_T) per layer over the epochs with the vital layers marked:
saturation.json, saturation.png. A few minutes on 2 CPU cores.
"""

from configs import quickstart


def get_config():
  config = quickstart.get_config()
  config.mode = 'saturation'
  config.retrain_after_search = False
  config.random_baseline = False
  config.train.arch = 'k3e6'
  config.train.snapshot_every_epochs = 1.0
  return config
