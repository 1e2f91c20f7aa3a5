"""A run and its optional stages: train the teacher first, train a scratch baseline after, compare.

`run(cfg, workdir, resume)` is what `python -m jaxdistill.train` calls. Without stages it is one
`train_and_evaluate`. With `stages.teacher_steps > 0` the teacher's random architecture is first
trained by plain LM on the run's own data (train split only: the eval split stays held out for
all three models) and kept in a cache directory named by a hash of everything its weights depend
on, so a second run reuses it. With `stages.scratch_baseline` the same student (same initial
weights, data order, steps and tokens) is then trained alone in `WORKDIR/scratch`, and the
held-out perplexities of teacher, scratch student and distilled student go into a table.
Every stage is the same training program (`trainer.train_and_evaluate`), resumable on its own.
"""

import dataclasses
import hashlib
import json
import os

from jaxdistill import plot, workdir_lock
from jaxdistill.config import Config, DebugSpec, StagesSpec
from jaxdistill.config.schema import LM_EVAL_METRICS
from jaxdistill.data.corpus import source_fingerprint
from jaxdistill.errors import JaxDistillError
from jaxdistill.inputs import check_inputs
from jaxdistill.objective.offline_teacher import OfflineTeacherSpec
from jaxdistill.parallel import is_main_process
from jaxdistill.training.build import has_tokenizer
from jaxdistill.training.metrics import log
from jaxdistill.training.trainer import train_and_evaluate

_TEACHER_CACHE_FORMAT = 1     # bump when what a cached teacher holds changes
TEACHER_DONE = "teacher.json"  # written into a cached teacher's directory once its training finished
SCRATCH_DIR = "scratch"
COMPARISON_JSON = "comparison.json"
COMPARISON_MD = "comparison.md"



def plain_lm(cfg: Config, student=None) -> Config:
  """`cfg` as plain LM training of `student` (default: cfg's student): no teacher, no stages, no drills."""
  objective = cfg.objective.plain_lm()
  best_metric = cfg.train.best_metric if cfg.train.best_metric in LM_EVAL_METRICS else "student_lm_loss"
  return dataclasses.replace(cfg, mode="lm", student=student or cfg.student, objective=objective, teacher_tokenizer="",
                             train=dataclasses.replace(cfg.train, best_metric=best_metric),
                             debug=DebugSpec(), stages=StagesSpec(), offline_teacher=OfflineTeacherSpec())


def scratch_config(cfg: Config) -> Config:
  """The scratch baseline of `cfg`: its student by plain LM on exactly the distillation run's rows.

  With a teacher tokenizer of its own, rows end where both tokenizations share a boundary; the scratch
  run names that tokenizer too (a plain LM run uses it for nothing else), so both students see the
  same tokens in the same rows and are evaluated on the same held-out rows.
  """
  teacher_tokenizer = cfg.teacher_tokenizer or (cfg.teacher.name_or_path if has_tokenizer(cfg.teacher) else "")
  return dataclasses.replace(plain_lm(cfg), teacher_tokenizer=teacher_tokenizer)


def teacher_config(cfg: Config) -> Config:
  """The plain-LM run that trains the teacher's architecture for `stages.teacher_steps` steps."""
  lm = plain_lm(cfg, student=cfg.teacher)
  learning_rate = cfg.stages.teacher_learning_rate or cfg.optim.learning_rate
  # The teacher learns in its own tokens: its tokenizer where it has one, else the run's.
  tokenizer = cfg.teacher_tokenizer or cfg.tokenizer or cfg.student.name_or_path
  data = dataclasses.replace(cfg.data, seq_len=cfg.data.teacher_len, teacher_seq_len=0)  # rows of its tokens
  return dataclasses.replace(lm, tokenizer=tokenizer, data=data,
                             optim=dataclasses.replace(cfg.optim, learning_rate=learning_rate),
                             train=dataclasses.replace(lm.train, max_steps=cfg.stages.teacher_steps,
                                                       early_stopping_patience=0))


def teacher_key(cfg: Config) -> dict:
  """Everything the trained teacher's weights depend on (the cache key, before hashing)."""
  t = teacher_config(cfg)
  runtime = t.student.runtime()   # how the model runs, not its weights
  model = {k: v for k, v in dataclasses.asdict(t.student).items() if k not in runtime}
  return {"format": _TEACHER_CACHE_FORMAT, "model": model, "tokenizer": t.tokenizer,
          "data": dataclasses.asdict(t.data), "content": source_fingerprint(t.data.source), "seed": t.seed,
          "optim": dataclasses.asdict(t.optim), "steps": t.train.max_steps}


def teacher_dir(cfg: Config) -> str:
  """The cache directory of `cfg`'s trained teacher: `<cache>/<family>-<width>x<layers>-<hash>`."""
  root = cfg.stages.teacher_cache or os.path.join(
      os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "jaxdistill", "teachers")
  digest = hashlib.sha256(json.dumps(teacher_key(cfg), sort_keys=True).encode()).hexdigest()[:16]
  arch = cfg.teacher.arch
  return os.path.join(os.path.expanduser(root), f"{arch['family']}-{arch['hidden_size']}x{arch['num_layers']}-{digest}")


def trained_teacher(cfg: Config, data_cache: str | None = None) -> str:
  """Trains (or resumes, or reuses) the teacher; returns its Hugging Face export directory."""
  directory = teacher_dir(cfg)
  done = os.path.join(directory, TEACHER_DONE)
  export = os.path.join(directory, "student_hf")
  if os.path.isfile(done) and os.path.isfile(os.path.join(export, "config.json")):
    with open(done) as f:
      record = json.load(f)
    log(f"[TEACHER] reusing the teacher trained for {record['steps']:,} steps in {directory} "
         f"(held-out perplexity {record['eval']['student_ppl']:.2f})")
    return export
  log(f"[TEACHER] training the teacher by plain LM for {cfg.stages.teacher_steps:,} steps in {directory}")
  result = train_and_evaluate(teacher_config(cfg), directory, data_cache=data_cache)
  if is_main_process():
    with open(done, "w") as f:
      json.dump({"steps": cfg.stages.teacher_steps, "key": teacher_key(cfg), "eval": result}, f, indent=1,
                sort_keys=True)
  return export


def with_teacher(cfg: Config, path: str) -> Config:
  """`cfg` distilling from the checkpoint at `path` instead of a random architecture."""
  return dataclasses.replace(cfg, teacher=dataclasses.replace(cfg.teacher, name_or_path=path, arch=None))


def comparison(distilled: dict, scratch: dict, tokens_per_step: int) -> dict:
  """Held-out perplexities and the fraction of the scratch-to-teacher gap that distillation closed."""
  # A teacher with its own tokenizer is measured per student token over the same text, like the students.
  own_tokens = "teacher_ppl_per_student_token" in distilled
  suffix = "_per_student_token" if own_tokens else ""
  teacher_ppl, scratch_ppl, distilled_ppl = (distilled[f"teacher_ppl{suffix}"], scratch["student_ppl"],
                                             distilled["student_ppl"])
  gap = scratch_ppl - teacher_ppl
  return {
      "eval_tokens": int(distilled["count/tokens"]), "teacher_tokenizer": own_tokens,
      "steps": int(distilled["opt_step"]), "train_tokens": int(distilled["opt_step"]) * tokens_per_step,
      "teacher_ppl": teacher_ppl, "scratch_ppl": scratch_ppl, "distilled_ppl": distilled_ppl,
      "teacher_lm_loss": distilled[f"teacher_lm_loss{suffix}"], "scratch_lm_loss": scratch["student_lm_loss"],
      "distilled_lm_loss": distilled["student_lm_loss"],
      # Undefined when the scratch student is already as good as the teacher.
      "gap_closed": (scratch_ppl - distilled_ppl) / gap if gap > 0 else None,
  }


def comparison_table(c: dict) -> str:
  """The comparison as a Markdown table plus one line on the gap."""
  gap = "n/a (the scratch student is not worse than the teacher)" if c["gap_closed"] is None else \
      f"{c['gap_closed']:.1%}"
  teacher = "teacher (own tokenizer; its loss per student token)" if c.get("teacher_tokenizer") else "teacher"
  return "\n".join([
      "| model | held-out perplexity | held-out LM loss (nats/token) |",
      "| --- | ---: | ---: |",
      f"| {teacher} | {c['teacher_ppl']:.2f} | {c['teacher_lm_loss']:.4f} |",
      f"| scratch student | {c['scratch_ppl']:.2f} | {c['scratch_lm_loss']:.4f} |",
      f"| distilled student | {c['distilled_ppl']:.2f} | {c['distilled_lm_loss']:.4f} |",
      "",
      f"Gap closed by distillation (perplexity, scratch to teacher): {gap}. Both students: "
      f"{c['steps']:,} optimizer steps, {c['train_tokens']:,} training tokens; eval over {c['eval_tokens']:,} "
      f"held-out tokens.",
  ])


def run(cfg: Config, workdir: str, resume: str | None = None) -> dict:
  """The whole job, holding the workdir's lock: [teacher training], the run, [scratch baseline], the plot.

  Every input the config names is checked first, all at once (`inputs.check_inputs`): a missing model,
  tokenizer or data source stops the run before any of them loads.
  """
  check_inputs(cfg)
  with workdir_lock.hold(workdir, enabled=is_main_process()):
    return _run(cfg, workdir, resume)


def _run(cfg: Config, workdir: str, resume: str | None) -> dict:
  data_cache = os.path.join(workdir, "data_cache")  # one packed copy of the data for every stage
  if cfg.stages.teacher_steps:
    cfg = with_teacher(cfg, trained_teacher(cfg, data_cache))
  result = train_and_evaluate(cfg, workdir, resume, data_cache=data_cache)
  if cfg.stages.scratch_baseline:
    log("[BASELINE] training the same student alone (plain LM, same initial weights, data and steps) in "
         f"{os.path.join(workdir, SCRATCH_DIR)}")
    scratch = train_and_evaluate(scratch_config(cfg), os.path.join(workdir, SCRATCH_DIR), data_cache=data_cache)
    tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.optim.accumulation_steps
    summary = comparison(result, scratch, tokens_per_step)
    table = comparison_table(summary)
    if is_main_process():
      with open(os.path.join(workdir, COMPARISON_JSON), "w") as f:
        json.dump(summary, f, indent=1, sort_keys=True)
      with open(os.path.join(workdir, COMPARISON_MD), "w") as f:
        f.write(table + "\n")
    log(f"[COMPARISON] held-out perplexity (also in {os.path.join(workdir, COMPARISON_MD)})\n{table}")
  if not is_main_process():  # process 0 alone writes files (every process holds the same results)
    return result
  try:
    png, _ = plot.write_plot(workdir)
    log(f"[PLOT] {png}")
  except JaxDistillError as e:  # the run itself succeeded: a missing picture is not a failed run
    log(f"[PLOT] not written: {e}")
  return result
