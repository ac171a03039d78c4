"""Decoy twins: a direct test of whether a search learns.

A decoy twin of a real op (`k3e3` -> `k3e3_decoy`) has exactly its shapes, parameters and
FLOPs (op kind 'ir_decoy' in `op_kinds.py` takes the cost of 'ir'), but its conv kernels stay
at their random initial values (`blocks.InvertedResidual.frozen_kernels`): only its BatchNorms
train. Every cost the search sees is the same for both twins, so the space proposals and the
resource term cannot prefer one; a search that picks the real op more often than half the time
learnt it from the data (benchmarks/decoys.py measures how often it takes the decoy).

`config.decoys` names the real ops to twin; `with_decoys` adds them to a built space, each twin
beside its real op in every layer that holds the real op.
"""

from __future__ import annotations

import dataclasses

from hournas_jax import spaces

SUFFIX = '_decoy'
# The kind of a twin, by the kind of its real op: kinds with trainable kernels have one.
TWIN_KINDS = {'ir': 'ir_decoy'}


def twin_name(op: str) -> str:
  return op + SUFFIX


def is_decoy(space: spaces.SearchSpace, op: str) -> bool:
  return space.ops[op].kind in TWIN_KINDS.values()


def real_of(op: str) -> str:
  """The real op of a twin's name (the name itself for a real op)."""
  return op[:-len(SUFFIX)] if op.endswith(SUFFIX) else op


def parse(text: str) -> tuple[str, ...]:
  """config.decoys ('k3e3,k5e3'; '' = none) as op names."""
  return tuple(o.strip() for o in text.split(',') if o.strip())


def twinnable(space: spaces.SearchSpace) -> tuple[str, ...]:
  """The candidate ops of `space` that can have a decoy twin."""
  return tuple(o for o in space.op_names if space.ops[o].kind in TWIN_KINDS)


def with_decoys(space: spaces.SearchSpace, real_ops) -> spaces.SearchSpace:
  """`space` with a decoy twin of each op of `real_ops` placed right after it (in op_names and
  in every layer that holds it); `space` itself when `real_ops` is empty."""
  real_ops = tuple(real_ops)
  allowed = twinnable(space)
  bad = [o for o in real_ops if o not in allowed]
  if bad or len(set(real_ops)) != len(real_ops):
    raise spaces.SpaceError(
        f'decoys must name distinct candidate ops of the {space.name} space that can have a '
        f'twin ({", ".join(allowed)}); got {", ".join(real_ops)}')
  if not real_ops:
    return space
  ops = dict(space.ops)
  for o in real_ops:
    ops[twin_name(o)] = dataclasses.replace(space.ops[o], name=twin_name(o),
                                            kind=TWIN_KINDS[space.ops[o].kind])
  with_twins = lambda names: tuple(n for o in names
                                   for n in ((o, twin_name(o)) if o in real_ops else (o,)))
  layers = tuple(dataclasses.replace(l, ops=with_twins(l.ops)) if l.searchable else l
                 for l in space.layers)
  return dataclasses.replace(space, ops=ops, op_names=with_twins(space.op_names), layers=layers)


def split(op_names) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(real ops, the real ops that have a twin) of a decoy space's op_names: what rebuilds it
  with `spaces.get_space(..., ops=real)` and `with_decoys(..., twinned)`."""
  real = tuple(o for o in op_names if not o.endswith(SUFFIX))
  twinned = tuple(real_of(o) for o in op_names if o.endswith(SUFFIX))
  return real, twinned
