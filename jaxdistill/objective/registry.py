"""The loss components, in order: one line each.

The order is the order of the metrics, the non-finite counters and the `inject_nonfinite` vector.
Adding a component: its module in `components/` (its `Component` declaration and term function), its
test, and its line here.
"""

from jaxdistill.objective.component import Component, Entry
from jaxdistill.objective.components import attention, contrastive, kd, layerwise, lm, routing, total_variation

REGISTRY: tuple[Component, ...] = (
    kd.COMPONENT,
    lm.COMPONENT,
    attention.COMPONENT,
    layerwise.COMPONENT,
    contrastive.COMPONENT,
    routing.ROUTING_FEATURE,
    routing.ROUTING_LOAD_BALANCE,
    routing.ROUTING_ATTENTION_ALIGNMENT,
    total_variation.COMPONENT,
)

COMPONENTS: tuple[str, ...] = tuple(c.name for c in REGISTRY)


def _entries(components: tuple[Component, ...]) -> tuple[Entry, ...]:
  """The curriculum entries, in order of first use; components that share an entry must declare it alike."""
  entries: dict[str, Entry] = {}
  for c in components:
    if entries.setdefault(c.entry.name, c.entry) != c.entry:
      raise ValueError(f"{c.name} declares curriculum entry {c.entry} unlike another component: "
                       f"{entries[c.entry.name]}")
    if c.entry.plain_lm and (c.needs.teacher or c.needs.heads):
      raise ValueError(f"{c.name} reads the teacher, so plain LM training cannot weigh it")
  names = [c.name for c in components]
  if len(set(names)) != len(names):
    raise ValueError(f"component names repeat: {names}")
  return tuple(entries.values())


ENTRIES: tuple[Entry, ...] = _entries(REGISTRY)
