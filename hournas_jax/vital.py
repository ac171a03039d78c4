"""Vital blocks: the blocks every path from input to output crosses (Section 3.1).

The network is read as a graph whose nodes are the feature maps between layers. Every layer is
an edge from its input to its output node; a layer that keeps its input's shape also gets an
identity edge around it (the residual shortcut of its inverted-residual ops, and the `skip` op).
A block is vital exactly when removing its edge disconnects the input from the output, i.e. it
lies on the intersection of all paths P_1 ∩ ... ∩ P_n.
"""

from __future__ import annotations

from hournas_jax import spaces


def graph_edges(space: spaces.SearchSpace) -> list[tuple[int, int, str]]:
  """(source node, target node, what) for every layer and every identity shortcut."""
  edges = []
  for i, layer in enumerate(space.layers):
    edges.append((i, i + 1, layer.name))
    if layer.keeps_shape and layer.searchable:
      edges.append((i, i + 1, 'identity'))
  return edges


def _connected(num_nodes: int, edges, source: int, target: int) -> bool:
  reach, frontier = {source}, [source]
  while frontier:
    node = frontier.pop()
    for a, b, _ in edges:
      if a == node and b not in reach:
        reach.add(b)
        frontier.append(b)
  return target in reach


def vital_layers(space: spaces.SearchSpace, searchable_only: bool = True) -> tuple[str, ...]:
  """Names of the layers on every input-to-output path, in network order."""
  edges = graph_edges(space)
  output = len(space.layers)
  vital = []
  for layer in space.layers:
    if searchable_only and not layer.searchable:
      continue
    without = [e for e in edges if e[2] != layer.name]
    if not _connected(output + 1, without, 0, output):
      vital.append(layer.name)
  return tuple(vital)
