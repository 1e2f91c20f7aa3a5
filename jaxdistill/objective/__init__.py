"""The distillation objective: a registry of loss components, and the step's loss over the enabled ones.

  component.py   `Component`: one loss declared once (name, curriculum entry and defaults, scale, what it
                 reads, which modes can serve it, its term function), and the `TermContext` terms read
  components/    one module per component (the router's three share one)
  registry.py    `REGISTRY`: the components in order, one line each; `COMPONENTS`: their names
  spec.py        `DistillSpec` (the `distill` config group) and `ResolvedObjective` (what a step computes)
  core.py        `run_models` and `objective`: the models' forward passes, then every enabled term, guarded
  heads.py       `DistillHeads`: layer and contrastive projections, the router
  guard.py       the non-finite guard
"""

from jaxdistill.objective.component import Component, Entry, Needs, RecordPart, Term, TermContext
from jaxdistill.objective.core import objective, run_models
from jaxdistill.objective.guard import guard
from jaxdistill.objective.heads import DistillHeads, init_heads
from jaxdistill.objective.registry import COMPONENTS, ENTRIES, REGISTRY
from jaxdistill.objective.spec import (TEACHER_MODES, DistillSpec, ResolvedObjective, component_weights,
                                       curriculum_config)

__all__ = ["COMPONENTS", "ENTRIES", "REGISTRY", "TEACHER_MODES", "Component", "DistillHeads", "DistillSpec", "Entry",
           "Needs", "RecordPart", "ResolvedObjective", "Term", "TermContext", "component_weights", "curriculum_config",
           "guard", "init_heads", "objective", "run_models"]
