"""Decoy twins: a direct test of whether a search learns.

A decoy twin of a real op (`k3e3` -> `k3e3_decoy`) has exactly its shapes, parameters and
FLOPs (op kind 'ir_decoy' in `op_kinds.py` takes the cost of 'ir'), but its conv kernels stay
at their random initial values (`blocks.InvertedResidual.frozen_kernels`): only its BatchNorms
train. Every cost the search sees is the same for both twins, so the space proposals and the
resource term cannot prefer one; a search that picks the real op more often than half the time
learnt it from the data (benchmarks/decoys.py measures how often it takes the decoy).

`config.decoys` names the real ops to twin; `with_decoys` adds them to a built space, each twin
beside its real op in every layer that holds the real op. `config.decoy_kind` picks the
flavour of twin (`FLAVOURS`); a space holds twins of one flavour.
"""

from __future__ import annotations

import dataclasses

from hournas_jax import spaces


@dataclasses.dataclass(frozen=True)
class Flavour:
  """One flavour of twin: the suffix of its name, and its op kind by the kind of its real op
  (kinds with trainable kernels have one)."""
  suffix: str
  kinds: dict[str, str]


# frozen: conv kernels frozen, the real op's shortcut kept. In a layer that keeps its shape it
#   can switch its branch off (projection BatchNorm scale to 0) and act as a skip at the real
#   op's cost, so there it costs the network only what a skip would.
# frozen_no_shortcut: the same without the shortcut, so it cannot fall back to the identity:
#   every layer that takes it, vital or not, passes its input only through random features.
#   The shortcut's addition is not counted in the cost model, so the costs stay equal.
FLAVOURS = {
    'frozen': Flavour('_decoy', {'ir': 'ir_decoy'}),
    'frozen_no_shortcut': Flavour('_decoy_noshortcut', {'ir': 'ir_decoy_noshortcut'}),
}
DEFAULT_FLAVOUR = 'frozen'
# Longest first, so a suffix that ends another is not taken for it.
_SUFFIXES = sorted(((f.suffix, name) for name, f in FLAVOURS.items()),
                   key=lambda item: -len(item[0]))


def check_flavour(flavour: str) -> None:
  if flavour not in FLAVOURS:
    raise spaces.SpaceError(f'decoy_kind must be one of {", ".join(FLAVOURS)}; got {flavour!r}')


def twin_name(op: str, flavour: str = DEFAULT_FLAVOUR) -> str:
  return op + FLAVOURS[flavour].suffix


def is_decoy(space: spaces.SearchSpace, op: str) -> bool:
  return any(space.ops[op].kind in f.kinds.values() for f in FLAVOURS.values())


def flavour_of_name(op: str) -> str | None:
  """The flavour of a twin's name; None for a real op."""
  return next((name for suffix, name in _SUFFIXES if op.endswith(suffix)), None)


def real_of(op: str) -> str:
  """The real op of a twin's name (the name itself for a real op)."""
  flavour = flavour_of_name(op)
  return op[:-len(FLAVOURS[flavour].suffix)] if flavour else op


def flavour_of(op_names) -> str:
  """The flavour of the twins among `op_names` (a space's op names); the default when there
  are none."""
  found = {flavour_of_name(o) for o in op_names} - {None}
  if len(found) > 1:
    raise spaces.SpaceError(f'a space holds twins of one flavour; got {", ".join(sorted(found))}')
  return found.pop() if found else DEFAULT_FLAVOUR


def parse(text: str) -> tuple[str, ...]:
  """config.decoys ('k3e3,k5e3'; '' = none) as op names."""
  return tuple(o.strip() for o in text.split(',') if o.strip())


def twinnable(space: spaces.SearchSpace) -> tuple[str, ...]:
  """The candidate ops of `space` that can have a decoy twin."""
  kinds = FLAVOURS[DEFAULT_FLAVOUR].kinds
  return tuple(o for o in space.op_names if space.ops[o].kind in kinds)


def with_decoys(space: spaces.SearchSpace, real_ops,
                flavour: str = DEFAULT_FLAVOUR) -> spaces.SearchSpace:
  """`space` with a decoy twin (of `flavour`) of each op of `real_ops` placed right after it
  (in op_names and in every layer that holds it); `space` itself when `real_ops` is empty."""
  check_flavour(flavour)
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
    ops[twin_name(o, flavour)] = dataclasses.replace(
        space.ops[o], name=twin_name(o, flavour),
        kind=FLAVOURS[flavour].kinds[space.ops[o].kind])
  with_twins = lambda names: tuple(
      n for o in names for n in ((o, twin_name(o, flavour)) if o in real_ops else (o,)))
  layers = tuple(dataclasses.replace(l, ops=with_twins(l.ops)) if l.searchable else l
                 for l in space.layers)
  return dataclasses.replace(space, ops=ops, op_names=with_twins(space.op_names), layers=layers)


def split(op_names) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(real ops, the real ops that have a twin) of a decoy space's op_names: what rebuilds it
  with `spaces.get_space(..., ops=real)` and `with_decoys(..., twinned, flavour_of(op_names))`."""
  real = tuple(o for o in op_names if flavour_of_name(o) is None)
  twinned = tuple(real_of(o) for o in op_names if flavour_of_name(o) is not None)
  return real, twinned
