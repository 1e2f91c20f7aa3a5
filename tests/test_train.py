"""End-to-end runs of `python -m jaxdistill.train` on tiny models: logs, metrics, kill and resume, export."""

import os
import signal
import subprocess
import time

import numpy as np
import pytest

from conftest import DISTILL_ONLY, SMOKE, read_records
from conftest import run_train as _run
from conftest import train_command as _command
from jaxdistill.objective import COMPONENTS

# A longer smoke run for interruption tests: 40 optimizer steps, checkpoints every 5; half the micro-batches are
# sampled from the student (on-policy), so a resume must also restore the sampler's key.
LONG = [*DISTILL_ONLY, "--config.on_policy.fraction=0.5", "--config.on_policy.prompt_length=8",
        "--config.on_policy.completion_length=8", "--config.train.max_steps=40", "--config.log.tensorboard=False",
        "--config.checkpoint.every_steps=5", "--config.train.eval_every_steps=20", "--config.log.debug_every_steps=20",
        "--config.log.curriculum_every_steps=20", "--config.log.every_steps=5"]


def _start(env, workdir, *args):
  return subprocess.Popen(_command(workdir, *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=env)


def _wait_for_checkpoint(workdir, step, process, timeout=240):
  target = os.path.join(workdir, "checkpoints", str(step))
  deadline = time.time() + timeout
  while not os.path.isdir(target):
    assert process.poll() is None, f"run ended before checkpoint {step}: {process.stderr.read()[-2000:]}"
    assert time.time() < deadline, "no checkpoint in time"
    time.sleep(0.02)


def _weights(workdir) -> bytes:
  with open(os.path.join(workdir, "student_hf", "model.safetensors"), "rb") as f:
    return f.read()


@pytest.fixture(scope="module")
def smoke_run(env, tmp_path_factory):
  workdir = tmp_path_factory.mktemp("smoke_run")
  result = _run(env, workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


def _stages(stdout: str) -> tuple[str, str, str]:
  """The demo's output split into its teacher, distillation and scratch-baseline runs."""
  teacher, rest = stdout.split("\n[RUN]", 1)[1].split("\n[RUN]", 1)
  distill, scratch = rest.split("[BASELINE]", 1)
  return teacher, distill, scratch


def test_run_prints_the_blocks_users_read(smoke_run):
  _, result = smoke_run
  assert result.stdout.startswith("[TEACHER] training the teacher by plain LM for 8 steps in ")
  teacher, out, scratch = _stages(result.stdout)
  assert "8 optimizer steps" in teacher and "objective: plain LM cross-entropy (mode 'lm': no teacher)" in teacher
  assert "  model   : random llama " in teacher and "  teacher : " not in teacher
  assert "[CURRICULUM]" not in teacher and "[CURRICULUM]" not in scratch  # plain LM has no curriculum
  assert "12 optimizer steps x 2 micro-batches of 4 = 256 tokens per step" in out
  # The distillation loads the trained teacher from the user cache, as a Hugging Face checkpoint.
  teacher_line = next(l for l in out.splitlines() if l.startswith("  teacher : "))
  assert "/jaxdistill/teachers/llama-64x2-" in teacher_line and teacher_line.split()[2].endswith("/student_hf")
  assert "phase 2 from  30%: kd=0.7  lm=0.3  attention=0.1  layerwise=0  contrastive=0  feature=0.1  T=1" in out
  for block in ("[TRAIN DEBUG] step 5", "[CURRICULUM] train step 5/12", "[EVAL] step 5:",
                "[CURRICULUM] eval step 5/12", "[TRAIN DEBUG] step 10", "[EVAL] step 12:", "[MONITOR] no warnings",
                "[DONE] student exported to"):
    assert block in out, block
  assert out.count("(match)") == 2 and "MISMATCH" not in result.stdout
  assert "\n  student samples: teacher NLL=" in out  # evaluation samples from the student (on_policy.eval_samples)
  assert "  model   : random llama " in scratch and "12 optimizer steps" in scratch
  assert "[COMPARISON] held-out perplexity" in scratch and "| distilled student |" in scratch
  assert result.stdout.rstrip().splitlines()[-1].startswith("[PLOT] ")
  assert "Traceback" not in result.stderr and "TF_CPP" not in result.stderr


def test_a_run_into_a_pipe_logs_short_plain_lines(smoke_run):
  workdir, result = smoke_run
  for stream in (result.stdout, result.stderr):  # pipes, as under nohup or Slurm: no bar, no redraws
    assert "\r" not in stream and max((len(l) for l in stream.splitlines()), default=0) <= 200
  teacher, out, scratch = _stages(result.stdout)
  # 12 steps < log.print_every_steps=50: a [TRAIN] line at the first step, the second (the first rate), the last.
  lines = [l for l in out.splitlines() if l.startswith("[TRAIN] ")]
  assert [l.split("  ")[0] for l in lines] == ["[TRAIN] step 1/12 (8.3%)", "[TRAIN] step 2/12 (16.7%)",
                                               "[TRAIN] step 12/12 (100.0%)"]
  assert " elapsed " in lines[0] and "  ETA " not in lines[0]
  assert lines[0].endswith(" s with compilation (not in the ETA)")
  assert " tok/s  elapsed " in lines[1] and "  ETA " in lines[1]
  last = [r for r in read_records(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "train"][-1]
  assert f"  loss={last['loss']:.4f}  lr={last['lr']:.2e}  " in lines[2] and lines[2].endswith("  ETA 0:00")
  assert sum(l.startswith("[TRAIN] step ") for l in teacher.splitlines()) == 3
  # Plain LM weighs only lm: the debug block hides the other components; the distillation only total_variation.
  hidden = "  (8 components with weight 0 hidden: kd, attention, layerwise, contrastive, routing_feature, "
  assert teacher.count(hidden) == 1 and scratch.count(hidden) == 2 and hidden not in out
  assert out.count("  (1 component with weight 0 hidden: total_variation)") == 2


def test_the_demo_compares_teacher_scratch_and_distilled_on_the_same_held_out_tokens(smoke_run):
  import json

  workdir, _ = smoke_run
  with open(os.path.join(workdir, "comparison.json")) as f:
    comparison = json.load(f)
  distilled = [r for r in read_records(os.path.join(workdir, "metrics.jsonl"))]
  scratch = [r for r in read_records(os.path.join(workdir, "scratch", "metrics.jsonl"))]
  last_eval = [r for r in distilled if r["split"] == "eval"][-1]
  scratch_eval = [r for r in scratch if r["split"] == "eval"][-1]
  assert comparison["distilled_ppl"] == pytest.approx(last_eval["student_ppl"])
  assert comparison["teacher_ppl"] == pytest.approx(last_eval["teacher_ppl"])
  assert comparison["scratch_ppl"] == pytest.approx(scratch_eval["student_ppl"])
  assert comparison["eval_tokens"] == last_eval["count/tokens"] == scratch_eval["count/tokens"] == 256
  assert comparison["steps"] == 12 and comparison["train_tokens"] == 12 * 256
  gap = (comparison["scratch_ppl"] - comparison["distilled_ppl"]) / (comparison["scratch_ppl"] -
                                                                     comparison["teacher_ppl"])
  assert comparison["gap_closed"] == pytest.approx(gap)
  # Same initial weights and first batch: the first step's lm term is the same in both runs.
  first_distilled = next(r for r in distilled if r["split"] == "train" and r["step"] == 1)
  first_scratch = next(r for r in scratch if r["split"] == "train" and r["step"] == 1)
  assert first_scratch["raw/lm"] == pytest.approx(first_distilled["raw/lm"], rel=1e-6)
  assert first_scratch["weight/kd"] == 0.0 and first_scratch["weight/lm"] == 1.0
  with open(os.path.join(workdir, "comparison.md")) as f:
    assert f.read().startswith("| model | held-out perplexity |")
  with open(os.path.join(workdir, "curves.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_metrics_jsonl_records_weights_components_and_their_sum(smoke_run):
  workdir, _ = smoke_run
  records = list(read_records(os.path.join(workdir, "metrics.jsonl")))
  train = [r for r in records if r["split"] == "train"]
  evals = [r for r in records if r["split"] == "eval"]
  assert [r["step"] for r in train] == list(range(1, 13))
  assert [r["step"] for r in evals] == [5, 10, 12]
  for r in records:
    for c in COMPONENTS:
      assert {f"raw/{c}", f"weight/{c}", f"loss/{c}"} <= set(r), (r["step"], c)
    parts = sum(r[f"loss/{c}"] for c in COMPONENTS)
    assert abs(parts - r["loss"]) <= 1e-5 * max(1.0, abs(r["loss"])), r
  for r in train:
    assert r["lr"] >= 0 and r["tokens_per_s"] > 0 and r["count/nonfinite/kd"] == 0 and r["count/nonfinite/grads"] == 0
  # Curriculum over 12 steps: phase 2 from optimizer step ceil(3.6) = 4, phase 3 from ceil(7.2) = 8. The train
  # record of step n was computed at optimizer step n - 1; an eval at step n at optimizer step n.
  by_step = {r["step"]: r for r in train}
  assert by_step[4]["weight/attention"] == 0.0 and by_step[5]["weight/attention"] == pytest.approx(0.1)
  assert by_step[8]["weight/layerwise"] == 0.0 and by_step[9]["weight/layerwise"] == pytest.approx(0.05)
  assert evals[0]["weight/attention"] == pytest.approx(0.1) and evals[0]["weight/layerwise"] == 0.0
  assert evals[1]["weight/layerwise"] == pytest.approx(0.05)
  assert evals[-1]["student_ppl"] == pytest.approx(np.exp(evals[-1]["student_lm_loss"]), rel=1e-6)
  assert evals[-1]["student_lm_loss"] < evals[0]["student_lm_loss"]  # it learns


def test_export_loads_in_transformers_and_matches_the_trained_params(smoke_run):
  import jax
  import orbax.checkpoint as ocp
  import torch
  from transformers import AutoModelForCausalLM, AutoTokenizer

  from jaxdistill import models

  workdir, _ = smoke_run
  export = os.path.join(workdir, "student_hf")
  state = ocp.StandardCheckpointer().restore(os.path.join(workdir, "checkpoints", "12", "state"))
  exported = models.load_pretrained(export)
  jax.tree.map(np.testing.assert_array_equal, exported.params, jax.device_get(state["params"]["student"]))
  tokenizer = AutoTokenizer.from_pretrained(export)
  ids = np.asarray([tokenizer("def distill(teacher, student):")["input_ids"]], np.int32)
  ours = np.asarray(models.forward(exported.params, exported.config, ids).logits_BxLxV)
  model = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
  with torch.no_grad():
    theirs = model(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
  assert np.abs(ours - theirs).max() < 1e-4


def test_starting_a_finished_run_again_only_evaluates_and_exports(env, smoke_run, tmp_path):
  import shutil

  workdir = shutil.copytree(smoke_run[0], tmp_path / "again")
  result = _run(env, workdir)
  assert result.returncode == 0, result.stderr[-3000:]
  assert result.stdout.startswith("[TEACHER] reusing the teacher trained for 8 steps in ")  # from the cache
  assert result.stdout.count("resuming at step 12") == 2 and "[TRAIN DEBUG]" not in result.stdout
  assert result.stdout.count("[EVAL] step 12:") == 2 and "[COMPARISON]" in result.stdout


def test_sigkill_then_resume_matches_an_uninterrupted_run_bit_for_bit(env, tmp_path):
  reference = _run(env, tmp_path / "reference", *LONG)
  assert reference.returncode == 0, reference.stderr[-3000:]
  workdir = tmp_path / "killed"
  process = _start(env, workdir, *LONG)
  _wait_for_checkpoint(workdir, 10, process)
  process.kill()
  process.wait()
  assert not os.path.exists(workdir / "student_hf"), "the run finished before it was killed"
  resumed = _run(env, workdir, *LONG)  # a workdir with checkpoints resumes by default
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resuming at step" in resumed.stdout
  assert "  sampled : 50% of micro-batches: 8 tokens of a row + 8 sampled from the student" in resumed.stdout
  sampled = [r["sampled"] for r in read_records(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "train"]
  assert max(sampled) > 0 and len(set(sampled)) > 1, sampled  # sampled and data micro-batches both ran
  assert _weights(workdir) == _weights(tmp_path / "reference")


def test_sigterm_writes_an_emergency_checkpoint_and_resume_continues_there(env, tmp_path):
  workdir = tmp_path / "terminated"
  process = _start(env, workdir, *LONG)
  _wait_for_checkpoint(workdir, 5, process)
  process.send_signal(signal.SIGTERM)
  stdout, _ = process.communicate(timeout=120)
  assert process.returncode == 128 + signal.SIGTERM
  line = next(l for l in stdout.splitlines() if l.startswith("[EMERGENCY] checkpoint"))
  step = int(line.split("at step ")[1].split()[0])
  assert 5 <= step < 40 and os.path.isdir(workdir / "checkpoints" / str(step))
  before = sum(1 for _ in read_records(os.path.join(workdir, "metrics.jsonl")))
  resumed = _run(env, workdir, "--resume", *LONG)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"resuming at step {step}" in resumed.stdout
  after = list(read_records(os.path.join(workdir, "metrics.jsonl")))[before:]
  assert after[0]["split"] == "train" and after[0]["step"] == (step // 5 + 1) * 5  # logs every 5 steps
  assert after[-1]["step"] == 40


def test_injected_nonfinite_batches_are_counted_and_the_monitor_warns(env, tmp_path):
  result = _run(env, tmp_path, *DISTILL_ONLY, "--config.debug.inject_nonfinite=contrastive",
                "--config.debug.inject_every=6")
  assert result.returncode == 0, result.stderr[-3000:]
  # Micro-batches 5, 11, 17, 23 of 24 are poisoned (1 in 6 of any prefix): first seen at step 3, 1 / 6 > 1%.
  assert "[MONITOR] contrastive was non-finite in 1 of 6 batches (16.7% > 1%)" in result.stdout
  assert "[MONITOR] warnings this run: nonfinite/contrastive x1" in result.stdout
  records = [r for r in read_records(os.path.join(tmp_path, "metrics.jsonl")) if r["split"] == "train"]
  assert records[-1]["count/nonfinite/contrastive"] == 4 and records[-1]["count/nonfinite/grads"] == 0
  assert all(np.isfinite(r["loss"]) for r in records)
  assert "[DONE]" in result.stdout


@pytest.mark.parametrize("config", ["configs/p100.py:smoke"])  # p100_same_tokenizer: tests/test_readme.py
def test_p100_smoke_forms_train_and_export(env, tmp_path, config):
  result = _run(env, tmp_path, config=config)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "6 optimizer steps x 4 micro-batches of 2" in result.stdout
  assert os.path.isfile(tmp_path / "student_hf" / "model.safetensors")
  if config.startswith("configs/p100.py"):  # the seed pairing: a MoE teacher with a tokenizer of its own
    assert "random qwen3_moe" in result.stdout and "teacher tokenizer: 40 tokens per sequence" in result.stdout
    final = [r for r in read_records(os.path.join(tmp_path, "metrics.jsonl")) if r["split"] == "eval"][-1]
    assert final["count/pairs"] > 0 and np.isfinite(final["teacher_ppl_per_student_token"])
    assert final["raw/routing_feature"] > 0 or final["weight/routing_feature"] == 0


@pytest.mark.parametrize("args, config, message", [
    (["--config.optim.accumulation_steps=0"], SMOKE,
     "error: config field 'optim.accumulation_steps' = 0 is not allowed: an integer >= 1"),
    (["--config.data.source=/no/such/corpus.txt"], SMOKE, "/no/such/corpus.txt"),
    (["--resume"], SMOKE, "error: config field '--resume' = 'latest' is not allowed: a run with checkpoints"),
    (["--config.student.dtype=float64"], SMOKE,
     "error: config field 'student.dtype' = 'float64' is not allowed: one of float32, bfloat16, float16"),
    (["--config.student.dtyp=float32"], SMOKE, "error: no such config field 'dtyp'. Did you mean \"dtype\" instead"),
    ([], "configs/cpu_demo.py:huge", "error: flag --config=configs/cpu_demo.py:huge: Error whilst parsing config "
                                     "file: ValueError: unknown config argument 'huge'; allowed: smoke"),
    ([], "configs/nope.py", "error: --config: no config file 'configs/nope.py'"),
    # Stop before anything is compiled: the mesh against the devices, a missing model directory (several
    # missing inputs are one error of several lines: tests/test_inputs.py runs configs/p100.py offline).
    (["--config.mesh.tensor=3"], SMOKE, "error: config field 'mesh.tensor' = 3 is not allowed: mesh.fsdp x "
                                        "mesh.tensor = 1 x 3 = 3 must divide the 1 device(s) of this run"),
    ([*DISTILL_ONLY, "--config.teacher.name_or_path=runs/a/student_hf"], SMOKE,
     "error: teacher.name_or_path: directory 'runs/a/student_hf' does not exist (a local path: hub ids are 'name' or "
     "'owner/name')"),
])
def test_bad_runs_end_with_one_line(env, tmp_path, args, config, message):
  result = _run(env, tmp_path / "w", *args, config=config, timeout=120)
  assert result.returncode == 2, result.stderr[-2000:]
  lines = [l for l in result.stderr.strip().splitlines() if l.strip()]
  assert len(lines) == 1 and message in lines[0], result.stderr[-2000:]


def test_unwritable_workdir(env):
  result = _run(env, "/proc/forbidden", timeout=120)
  assert result.returncode == 2
  assert "error: config field '--workdir' = '/proc/forbidden' is not allowed: a writable directory" in result.stderr


def test_every_config_is_run_in_its_smoke_form():
  import glob

  # cpu_demo: the smoke_run fixture; p100: test_p100_smoke_forms_train_and_export; p100_same_tokenizer: the README's
  # guide (tests/test_readme.py); bench_smollm (a benchmark config): tests/test_bench.py times its smoke form through
  # bench.step. Add new configs there.
  assert set(glob.glob("configs/*.py")) == {"configs/cpu_demo.py", "configs/p100.py", "configs/p100_same_tokenizer.py",
                                            "configs/bench_smollm.py"}


def test_run_block_describes_the_data(smoke_run):
  _, result = smoke_run
  line = next(l for l in result.stdout.splitlines() if l.startswith("  data    : "))
  assert line.startswith("  data    : builtin:stdlib_docs: 300 documents; train ")
  assert "x 32 tokens" in line and "batches of 4 per epoch" in line and "eval " in line


def test_the_drill_poisons_one_in_n_micro_batches_of_any_prefix():
  from jaxdistill.config.schema import DebugSpec
  from jaxdistill.training.trainer import _drill

  debug = DebugSpec(inject_nonfinite="kd", inject_every=200)  # a 0.5% rate
  poisoned = [m for m in range(1000) if np.isnan(_drill({}, m, debug)["inject_nonfinite"]).any()]
  assert poisoned == [199, 399, 599, 799, 999]  # 0 of the first 199, so never more than 0.5% of those seen
  assert COMPONENTS[int(np.flatnonzero(np.isnan(_drill({}, 199, debug)["inject_nonfinite"]))[0])] == "kd"


def test_a_long_run_block_line_wraps_at_a_space_under_the_labels():
  from jaxdistill.training.trainer import _wrapped

  clause = "x" * 60
  line = f"  data    : {clause}; {clause}; {clause}; {clause}"  # 258 characters
  assert _wrapped(line).splitlines() == [f"  data    : {clause}; {clause};", f"{'':12s}{clause}; {clause}"]
  assert _wrapped("  model   : random llama  90,496 params") == "  model   : random llama  90,496 params"
