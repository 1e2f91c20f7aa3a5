"""What a run is, saved with each of its checkpoints, so that a resume can tell its own run from another.

A fingerprint is a flat dict of the config, named as the user writes it (`student.arch.hidden_size`,
`data.batch_size`, `optim.accumulation_steps`, `distill.kd_mode`, `curriculum.kd`, ...), plus what the
config does not show: the data behind `data.source` (file sizes and times), the tokenizers' definitions
and a digest of the train state's shapes.

`check` compares a checkpoint's fingerprint with the run's. How long, how often, how loud and how the
models run may change on a resume (`CHANGEABLE`); any other change refuses it with one line that lists
the fields, unless `train.allow_config_change` names them. A change of the state's shapes (another
model, other heads) is refused always: such a checkpoint cannot continue this run.
"""

import dataclasses
import hashlib
import json

import jax

from jaxdistill.config.schema import Config
from jaxdistill.errors import JaxDistillError
from jaxdistill.models.config import RUNTIME_FIELDS

STATE = "state_shapes"
# Field groups and fields a resume may change without being asked to.
CHANGEABLE = ("train", "log", "checkpoint", "monitor", "debug", "mesh", "stages", "offline_teacher.dir",
              "on_policy.eval_samples",
              "optim.learning_rate", "optim.heads_learning_rate", "optim.warmup_steps", "optim.min_lr_ratio",
              "optim.clip_norm", "optim.weight_decay",
              *(f"{model}.{field}" for model in ("student", "teacher") for field in RUNTIME_FIELDS))
ALL = "*"
# Changes are listed in this order of their groups (what a user recognises first), then by name.
_ORDER = ("mode", "seed", "student", "teacher", "tokenizer", "teacher_tokenizer", "data", "optim", "distill",
          "curriculum", "router", "on_policy", "offline_teacher")


class ResumeRefused(JaxDistillError):
  """The checkpoint belongs to a run with other settings."""


@dataclasses.dataclass(frozen=True)
class Change:
  field: str
  saved: object
  now: object

  def __str__(self) -> str:
    return f"{self.field} {_short(self.saved)} -> {_short(self.now)}"


def _short(value) -> str:
  text = json.dumps(value)
  return text if len(text) <= 60 else text[:57] + "..."


def _listed(changes: list[Change], limit: int = 6) -> str:
  """The first `limit` changes, then how many more."""
  more = f"; and {len(changes) - limit} more" if len(changes) > limit else ""
  return "; ".join(map(str, changes[:limit])) + more


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_flatten(value, f"{name}."))
    else:
      out[name] = value
  return out


def _user_groups(cfg: Config) -> dict:
  """`cfg` as JSON-able groups under the names of the config file (`distill`, `curriculum`, `router`)."""
  objective = cfg.objective
  tree = dataclasses.asdict(dataclasses.replace(cfg, objective=None))
  tree.update(distill=dataclasses.asdict(objective.distill), curriculum=objective.curriculum.as_group(),
              router=dataclasses.asdict(objective.router), on_policy=dataclasses.asdict(objective.on_policy))
  tree["offline_teacher"]["top_k"] = objective.offline_top_k
  # The rest of the objective derives from the groups above, the mode, the tokenizers and the data.
  del tree["objective"], tree["optim"]["total_steps"]
  return json.loads(json.dumps(tree))  # tuples become lists, as they are saved


def state_digest(abstract_state) -> str:
  """A digest of the state's tree structure, shapes and dtypes."""
  leaves = jax.tree_util.tree_leaves_with_path(abstract_state)
  described = [(jax.tree_util.keystr(path), list(leaf.shape), str(leaf.dtype)) for path, leaf in leaves]
  return hashlib.sha256(json.dumps(described).encode()).hexdigest()[:16]


def of_run(cfg: Config, data: dict, abstract_state) -> dict:
  """The run's fingerprint; `data`: what identifies the data beyond its config (`DataPipeline.identity`)."""
  flat = _flatten(_user_groups(cfg))
  flat.update({f"data.{key}": value for key, value in data.items()})
  flat[STATE] = state_digest(abstract_state)
  return flat


def _rank(field: str) -> tuple[int, str]:
  group = field.split(".")[0]
  return (_ORDER.index(group) if group in _ORDER else len(_ORDER), field)


def _covered(field: str, patterns) -> bool:
  return any(p == ALL or field == p or field.startswith(p + ".") for p in patterns)


def allowed_changes(spec: str) -> tuple[str, ...]:
  """`train.allow_config_change`, a comma-separated list of fields or groups ('*': any), as a tuple."""
  return tuple(p.strip() for p in spec.split(",") if p.strip())


def check(saved: dict | None, now: dict, allow: tuple[str, ...], name: str) -> list[Change]:
  """The changes from `saved` to `now` a resume from checkpoint `name` makes; raises ResumeRefused.

  `allow`: fields or groups the user allows to change (`allowed_changes`).
  """
  if saved is None:
    if ALL in allow:
      return []
    raise ResumeRefused(f"{name} has no run fingerprint (an older jaxdistill wrote it), so this run cannot tell "
                        f"whether it is its own; nothing was deleted. Resume it anyway with "
                        f"--config.train.allow_config_change='{ALL}', or start afresh in another --workdir")
  fields = sorted(set(saved) | set(now), key=_rank)
  changed = [Change(f, saved.get(f), now.get(f)) for f in fields if saved.get(f) != now.get(f)]
  config_changes = [c for c in changed if c.field != STATE]
  if any(c.field == STATE for c in changed):
    what = _listed(config_changes) or "the code that builds the state"
    raise ResumeRefused(f"{name} holds a train state of other shapes ({what}): it cannot continue this run, "
                        f"whatever is allowed; nothing was deleted. Start this run in another --workdir")
  refused = [c for c in config_changes if not _covered(c.field, CHANGEABLE + allow)]
  if refused:
    allow_them = ",".join(c.field for c in refused)
    raise ResumeRefused(f"{name} was saved by a run with other settings: {_listed(refused)}; nothing "
                        f"was deleted. Start this run in another --workdir, or continue the saved run with these "
                        f"changes: --config.train.allow_config_change={allow_them}")
  return config_changes
