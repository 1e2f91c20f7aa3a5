"""Run fingerprints: what a resume may change, what it may change when asked, and what it never may."""

import jax
import jax.numpy as jnp
import pytest

from jaxdistill import config as config_lib
from jaxdistill.config import fingerprint

DATA = {"content": "files", "tokenizer": "sha-a", "teacher_tokenizer": ""}
STATE = {"w": jax.ShapeDtypeStruct((2, 3), jnp.float32)}


def _fingerprint(overrides=None, data=DATA, state=STATE) -> dict:
  cfg = config_lib.parse(config_lib.load("configs/cpu_demo.py:smoke", overrides))
  return fingerprint.of_run(cfg, data, state)


def test_fields_carry_the_names_of_the_config_file():
  fp = _fingerprint()
  assert fp["student.arch.hidden_size"] == 32 and fp["data.batch_size"] == 4
  assert fp["optim.accumulation_steps"] == 2 and fp["distill.kd_mode"] == "forward_kl"
  assert fp["curriculum.temperature"] == [1.0, 1.0, 1.0] and fp["router.num_experts"] == 4
  assert fp["offline_teacher.top_k"] == 0 and fp["data.tokenizer"] == "sha-a"
  assert "objective.kd_mode" not in fp and "optim.total_steps" not in fp and "distill.total_steps" not in fp


def test_how_long_how_often_and_learning_rates_may_change():
  saved = _fingerprint()
  now = _fingerprint({"train.max_steps": 40, "train.eval_every_steps": 7, "optim.learning_rate": 1e-3,
                      "log.every_steps": 3, "student.remat": "full", "checkpoint.keep": 5})
  changes = fingerprint.check(saved, now, (), "ckpt/12")
  assert [str(c) for c in changes] == ["student.remat \"none\" -> \"full\"", "optim.learning_rate 0.003 -> 0.001",
                                       "checkpoint.keep 3 -> 5", "log.every_steps 1 -> 3",
                                       "train.eval_every_steps 5 -> 7", "train.max_steps 12 -> 40"]


def test_batch_geometry_data_and_objective_changes_are_refused_unless_allowed():
  saved = _fingerprint()
  now = _fingerprint({"data.batch_size": 2, "optim.accumulation_steps": 4, "distill.kd_mode": "jsd"},
                     data={**DATA, "content": "other files"})
  with pytest.raises(fingerprint.ResumeRefused) as refused:
    fingerprint.check(saved, now, (), "ckpt/12")
  assert str(refused.value) == (
      'ckpt/12 was saved by a run with other settings: data.batch_size 4 -> 2; data.content "files" -> '
      '"other files"; optim.accumulation_steps 2 -> 4; distill.kd_mode "forward_kl" -> "jsd"; nothing was deleted. '
      "Start this run in another --workdir, or continue the saved run with these changes: "
      "--config.train.allow_config_change=data.batch_size,data.content,optim.accumulation_steps,distill.kd_mode")
  with pytest.raises(fingerprint.ResumeRefused, match="other settings: distill.kd_mode"):
    fingerprint.check(saved, now, fingerprint.allowed_changes("data, optim.accumulation_steps"), "ckpt/12")
  allowed = fingerprint.check(saved, now, fingerprint.allowed_changes("data,optim.accumulation_steps,distill"), "c")
  assert [c.field for c in allowed] == ["data.batch_size", "data.content", "optim.accumulation_steps",
                                        "distill.kd_mode"]
  assert len(fingerprint.check(saved, now, ("*",), "c")) == 4


def test_other_state_shapes_are_refused_whatever_is_allowed():
  saved = _fingerprint()
  now = _fingerprint({"student.arch.hidden_size": 48}, state={"w": jax.ShapeDtypeStruct((2, 4), jnp.float32)})
  with pytest.raises(fingerprint.ResumeRefused) as refused:
    fingerprint.check(saved, now, ("*",), "ckpt/12")
  assert str(refused.value) == ("ckpt/12 holds a train state of other shapes (student.arch.hidden_size 32 -> 48): it "
                                "cannot continue this run, whatever is allowed; nothing was deleted. Start this run "
                                "in another --workdir")


def test_a_checkpoint_without_fingerprint_needs_the_wildcard():
  with pytest.raises(fingerprint.ResumeRefused, match="ckpt/3 has no run fingerprint .* "
                                                      "--config.train.allow_config_change='\\*'"):
    fingerprint.check(None, _fingerprint(), ("data",), "ckpt/3")
  assert fingerprint.check(None, _fingerprint(), ("*",), "ckpt/3") == []


def test_a_long_list_of_changes_is_cut_after_six():
  saved = _fingerprint()
  now = _fingerprint({f"curriculum.{c}": (0.5, 0.5, 0.5) for c in ("kd", "lm", "attention", "layerwise",
                                                                   "contrastive", "feature", "temperature")})
  with pytest.raises(fingerprint.ResumeRefused, match=r"curriculum.lm \[0.3, 0.3, 0.3\] -> \[0.5, 0.5, 0.5\]; "
                                                      r"and 1 more; nothing was deleted"):
    fingerprint.check(saved, now, (), "c")
