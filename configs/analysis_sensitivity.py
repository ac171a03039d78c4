"""Block sensitivity (Appendix A, Figure 4, Table 6) on the offline digits: a slice of the grid.

    python main.py --config=configs/analysis_sensitivity.py --workdir=/tmp/hournas_sensitivity

The paper's grid is the shallow FBNet of Table 6 (fbnet_shallow: 12 searchable blocks, 7 of
FBNet's ops, 6 backbones k{3,5}e{1,3,6}: 504 ImageNet models). This slice keeps its 12 blocks on
the quickstart's 16x16 digits at width 0.25, with 2 backbones (k3e3, k5e6) and 4 candidate ops
per block (skip only where the shape allows it), each network trained with the quickstart's
recipe (40 epochs): 84 networks of about 45-60 s each, two at a time on 2 CPU cores (one
process per core), so 35-40 minutes. An interrupted grid continues
where it stopped (<workdir>/sensitivity/population.jsonl); sensitivity.png is redrawn as models
finish. The full grid of the paper:

    python main.py --config=configs/analysis_sensitivity.py --workdir=/tmp/sens_full \\
        --config.dataset=imagenet2012 --config.image_size=224 --config.channels=3 \\
        --config.width=1.0 --config.ops='' \\
        --config.analysis.backbones=k3e1,k3e3,k3e6,k5e1,k5e3,k5e6 \\
        --config.analysis.candidate_ops=k3e1,k3e3,k3e6,k5e1,k5e3,k5e6,skip --config.train.epochs=...
"""

from configs import quickstart


def get_config():
  config = quickstart.get_config()
  config.mode = 'sensitivity'
  config.retrain_after_search = False
  config.random_baseline = False
  config.ops = 'k3e1,k3e3,k3e6,k5e1,k5e3,k5e6,skip'
  a = config.analysis
  a.blocks = ''
  a.backbones = 'k3e3,k5e6'
  a.candidate_ops = 'k3e1,k3e6,k5e3,skip'
  a.seeds = 1
  a.workers = 0
  return config
