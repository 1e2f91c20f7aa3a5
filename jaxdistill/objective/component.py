"""The declaration of one loss component, and what its term function reads.

A `Component` says once everything the rest of the program needs to know about a loss: its name
(`raw/<name>`, `loss/<name>`, `count/nonfinite/<name>`), the curriculum entry that weighs it and that
entry's defaults (`curriculum.<entry>` in the config), a config field that scales it, what it reads
of the models (so `run_models` asks for no more), whether an offline teacher's records or a
teacher with another tokenizer can serve it, and its term function. The registry
(`registry.py`) lists them; the objective, the curriculum defaults, the config schema, the metrics,
the offline records and the PyTorch reference all derive from it.
"""

import dataclasses
from typing import Any, Callable, NamedTuple

import jax

from jaxdistill.models import ModelConfig
from jaxdistill.objective import cross_vocab

# A term: (a function of arrays alone, its arrays). The function may close over static values only:
# the non-finite guard is a custom_vjp, and traced values must enter it as arguments.
Term = tuple[Callable[..., jax.Array], tuple]


@dataclasses.dataclass(frozen=True)
class Entry:
  """A curriculum entry: the config key `curriculum.<name>`, one weight per phase."""
  name: str
  defaults: tuple[float, ...]   # per phase of the default curriculum (three phases)
  plain_lm: float = 0.0         # its weight in every phase of plain LM training (mode 'lm', the teacher and
                                # scratch stages), where no teacher exists


@dataclasses.dataclass(frozen=True)
class Needs:
  """What a component reads; the models are asked for the union over the enabled components."""
  teacher: bool = True          # the teacher's outputs (live, or its records where the component allows)
  heads: bool = False           # the DistillHeads' outputs (and so the student's hidden states)
  teacher_states: bool = False  # the teacher's hidden states
  # (objective, student config) -> (student blocks, teacher blocks) whose queries and keys it reads.
  attention: Callable[[Any, ModelConfig], tuple[tuple[int, ...], tuple[int, ...]]] | None = None
  # objective -> teacher blocks whose routed experts' outputs it reads (a mixture-of-experts teacher).
  experts: Callable[[Any], tuple[int, ...]] | None = None


class RecordPart(NamedTuple):
  """The arrays an offline-teacher record keeps for one component, besides the top-k logits of every record."""
  # (teacher output, teacher mask [B, Lt], objective) -> {name: [B, ...]}
  arrays: Callable[[Any, jax.Array, Any], dict[str, jax.Array]]
  # (objective, teacher config, seq_len) -> {name: (storage dtype, shape of one row)}
  layout: Callable[[Any, ModelConfig, int], dict[str, tuple[str, tuple[int, ...]]]]


@dataclasses.dataclass(frozen=True)
class Component:
  """One loss component, declared once (see the module docstring).

  Its weight at step s is the curriculum's `entry` weight at s times the config field `scale` (if
  any); it is computed only when that can be non-zero. `records` / `two_tokenizers`: whether the
  objective can compute it from an offline teacher's records (`offline_teacher.top_k > 0`) / across
  two tokenizers; where it cannot, a non-zero weight is a ConfigError naming `curriculum.<entry>`.
  """
  name: str
  entry: Entry
  term: Callable[["TermContext"], Term]   # builds the term from the step's context
  needs: Needs = Needs()
  scale: str = ""                # a config field multiplying the entry's weight, e.g. 'router.load_balance_coef'
  records: bool = False
  two_tokenizers: bool = True
  record: RecordPart | None = None        # what records keep for it (with records=True and needs.teacher)
  check: Callable[[Any], None] | None = None  # raises ConfigError for settings it cannot run with in the
                                              # objective's mode (called when it is enabled)


@dataclasses.dataclass(frozen=True)
class TermContext:
  """What a term function reads at one step: the static setup, the models' outputs and the batch's views.

  With two tokenizers (`obj.aligned`) every teacher-student comparison is on the aligned pairs:
  `at_student` / `at_teacher` gather a model's [B, L, ...] values at its aligned positions ([B, A, ...]),
  `student_view` / `teacher_view` turn a block's queries and keys into the attention rows compared
  (`attention_maps.MapView`), and `pairs_BxA` masks the real pairs. With one tokenizer the positions
  are identities, the views whole maps and `pairs_BxA` the student's attention mask.
  """
  obj: Any                       # the ResolvedObjective (static)
  student: ModelConfig
  teacher: ModelConfig | None    # None in plain LM training
  batch: dict
  student_out: Any               # models.LMOutput
  student_qk: dict               # block -> its QueriesKeys
  teacher_out: Any               # models.LMOutput; None with records or no teacher
  teacher_qk: dict
  record: dict | None            # the teacher's records (obj.teacher == 'records')
  heads_out: dict | None         # DistillHeads outputs when an enabled component reads them
  mask_BxL: jax.Array            # the tokens token means average over (a sampled batch: its completions)
  pairs_BxA: jax.Array
  at_student: Callable
  at_teacher: Callable
  student_view: Callable
  teacher_view: Callable
  opt_step: jax.Array            # int32 optimizer step
  kd_temperature: jax.Array      # the curriculum's temperature at opt_step
  router_top_k: jax.Array        # the router's schedules at opt_step
  gate_temperature: jax.Array
  vocab_map: cross_vocab.VocabMap | None   # two tokenizers: how their ids correspond

  @property
  def shared_vocab(self) -> int:
    """The ids both models' logits cover (kd compares the first `min(Vs, Vt)`)."""
    return min(self.student.vocab_size, self.teacher.vocab_size)
