"""SuperNet engines by name: what config search.engine chooses.

The interface, `Choice` and the shared scaffolding are in `engines/base.py`; each engine is the
module named after its config value. 'single_path' chains one program per sampled block from
Python (fast on XLA:CPU); 'switch' is one device-resident program per step with a lax.switch per
layer (for accelerators; the searcher fuses it with the sampling and the architecture step
into one program per iteration); 'all_candidates' runs every candidate, weighted by the relaxed
sample. 'auto' picks by the platform the search runs on (`auto_engine`).
"""

from __future__ import annotations

import jax

from hournas_jax.engines import all_candidates, base, single_path, switch

Choice = base.Choice
Engine = base.Engine
EngineFactory = base.EngineFactory
EngineState = base.EngineState
columns = base.columns

# name -> engine class.
ENGINES: dict[str, type[base.SuperNetEngine]] = {
    'single_path': single_path.SinglePathEngine,
    'switch': switch.SwitchEngine,
    'all_candidates': all_candidates.AllCandidatesEngine,
}
# The engine each sampler gets when config search.engine is '' (the sampler decides what runs).
DEFAULT_ENGINE = {'gumbel_max': 'single_path', 'gumbel_softmax': 'all_candidates'}
# What each sampler's samples need an engine to run.
SAMPLER_RUNS = {'gumbel_max': 'path', 'gumbel_softmax': 'all'}


AUTO = 'auto'


def auto_engine(sampler: str, platform: str | None = None) -> str:
  """The engine 'auto' stands for: for a sampled path, 'single_path' on a CPU and the fused
  'switch' on an accelerator; the sampler's default otherwise (the relaxed sample has one).

  On a CPU the chained engine is the faster (benchmarks/supernet_step.py; XLA:CPU's slow path
  for the gradient of a conv inside a conditional, docs/cpu-performance.md). On GPUs and TPUs
  the choice of 'switch' rests on the one comparison so far, accelerator.sh --tiny, where the
  step-by-step switch engine ran 1.3x the chained one; the fused iteration has not been timed
  on an accelerator: benchmarks/accelerator.py measures both and should confirm it.

  Args:
    sampler: config search.sampler.
    platform: 'cpu', 'gpu', 'tpu', ... (None: the default backend's).

  Returns:
    An engine name of `ENGINES`.
  """
  if SAMPLER_RUNS[sampler] != 'path':
    return DEFAULT_ENGINE[sampler]
  platform = jax.default_backend() if platform is None else platform
  return 'single_path' if platform == 'cpu' else 'switch'


def engine_class(name: str, sampler: str) -> type[base.SuperNetEngine]:
  """The engine class called `name` ('' = the sampler's default, 'auto' = `auto_engine`);
  raises ValueError with the allowed names when there is none or it cannot train the sampler's
  samples."""
  name = auto_engine(sampler) if name == AUTO else (name or DEFAULT_ENGINE[sampler])
  if name not in ENGINES:
    raise ValueError(f'search.engine must be one of {", ".join(ENGINES)}, {AUTO!r} (by '
                     f'platform) or \'\' (the sampler\'s default), got {name!r}')
  cls = ENGINES[name]
  if cls.runs != SAMPLER_RUNS[sampler]:
    fitting = [n for n, c in ENGINES.items() if c.runs == SAMPLER_RUNS[sampler]]
    raise ValueError(f'search.engine {name!r} runs {cls.runs} candidates, but sampler '
                     f'{sampler!r} needs an engine that runs {SAMPLER_RUNS[sampler]}: use one '
                     f'of {", ".join(fitting)}')
  return cls
