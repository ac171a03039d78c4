"""configs/ablations/: the paper's ablations (HourNAS-G/H, HourNAS-I) and the sweep over m load,
as main.py loads them (file:variant), and validate."""

import os
import pathlib
import subprocess
import sys

import pytest
from ml_collections.config_flags import config_flags

from hournas_jax import train

REPO_ROOT = pathlib.Path(__file__).parent.parent


def load(spec):
  """A config file with an optional :variant, parsed the way --config parses it."""
  cwd = os.getcwd()
  os.chdir(REPO_ROOT)
  try:
    return config_flags.ConfigFileFlagParser('config').parse(spec)
  finally:
    os.chdir(cwd)


@pytest.mark.parametrize('spec,space', [('configs/ablations/no_vital_priority.py', 'fbnet'),
                                        ('configs/ablations/no_vital_priority.py:h',
                                         'fbnet_enlarged')])
def test_no_vital_priority_searches_one_stage_for_twice_the_steps(spec, space):
  config = load(spec)
  reference = load('configs/fbnet.py')
  s, r = config.search, reference.search
  assert config.space == space and not s.vital_priority and s.num_proposals == 8
  assert s.nonvital_epochs == 2 * (r.vital_epochs + r.nonvital_epochs) == 4.0
  assert (config.targets.params, config.targets.flops) == (4.8e6, 300e6)
  train.validate_config(config)


def test_gumbel_softmax_is_hournas_a_with_the_relaxed_sampler():
  config, reference = load('configs/ablations/gumbel_softmax.py'), load('configs/fbnet.py')
  assert config.search.sampler == 'gumbel_softmax'
  config.search.sampler = reference.search.sampler
  assert config.to_dict() == reference.to_dict()  # nothing else differs
  train.validate_config(config)


def test_num_proposals_variants():
  for m in (1, 2, 4, 8, 16):
    config = load(f'configs/ablations/num_proposals.py:{m}')
    assert config.search.num_proposals == m and config.space == 'fbnet'
    assert not config.retrain_after_search  # the paper evaluates the m sweep on CIFAR-10
    train.validate_config(config)
  assert load('configs/ablations/num_proposals.py').search.num_proposals == 8
  with pytest.raises(ValueError, match="unknown num_proposals variant '3'"):
    load('configs/ablations/num_proposals.py:3')
  with pytest.raises(ValueError, match="unknown no_vital_priority variant 'a'"):
    load('configs/ablations/no_vital_priority.py:a')


def test_main_parses_an_ablation_config_with_a_variant_and_overrides(tmp_path):
  # A bad mode stops the run right after the config is parsed and checked: one error line.
  result = subprocess.run(
      [sys.executable, 'main.py', '--config=configs/ablations/num_proposals.py:4',
       f'--workdir={tmp_path}', '--config.search.schedule=epoch',
       '--config.search.temperature=relaxed', '--config.mode=serch'],
      cwd=REPO_ROOT, env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True,
      timeout=300)
  lines = result.stderr.strip().splitlines()
  assert result.returncode != 0 and len(lines) == 1, result.stderr
  assert lines[0].startswith('error: config.mode must be one of'), lines


@pytest.mark.parametrize('name,default', [('quickstart', 'paper'),
                                          ('search_quality', 'learned')])
def test_the_learned_and_paper_variants_differ_only_in_the_learning_recipe(name, default):
  learned, paper = load(f'configs/{name}.py:learned'), load(f'configs/{name}.py:paper')
  assert load(f'configs/{name}.py').to_dict() == load(f'configs/{name}.py:{default}').to_dict()
  recipe = ('weight_sampling', 'arch_gradient', 'val_every', 'proposal_entropy',
            'final_selection')
  assert [learned.search[k] for k in recipe] == ['sandwich', 'reinforce', 1, 0.01, 'inherited']
  assert [paper.search[k] for k in recipe] == ['distribution', 'straight_through', 0, 0.0, 'mode']
  for config in (learned, paper):
    train.validate_config(config)
  for k in recipe:
    learned.search[k] = paper.search[k]
  assert learned.to_dict() == paper.to_dict()
  with pytest.raises(ValueError, match=f"unknown {name} variant 'fast'; choose one of paper, "
                     'learned'):
    load(f'configs/{name}.py:fast')
