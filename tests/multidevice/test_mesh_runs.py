"""Training runs on 8 simulated CPU devices: data-parallel, FSDP and tensor-parallel runs against one device.

This directory is collected only in a process started with JAXDISTILL_TEST_CPU_DEVICES=8
(`tests/test_parallel.py` starts it); conftest.py then gives jax 8 CPU devices before any is used.
Every run is the same training program (`train_and_evaluate`) on the demo's tiny models: 4 optimizer
steps of 2 micro-batches of 8 sequences, the full curriculum, an evaluation and a checkpoint every 2 steps.
"""

import os
import shutil
import socket
import subprocess
import sys

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
from safetensors.numpy import load_file

from conftest import read_records
from jaxdistill import config as config_lib
from jaxdistill import models, parallel
from jaxdistill.config import arch_group
from jaxdistill.errors import ConfigError
from jaxdistill.training.optim import OptimConfig, make_optimizer
from jaxdistill.training.state import create_placed_train_state
from jaxdistill.training.trainer import train_and_evaluate

MESHES = {
    "data": dict(data=8),
    "fsdp": dict(data=1, fsdp=8),
    "hybrid": dict(data=2, fsdp=2, tensor=2, teacher_sharding="all"),
}
RUN = {
    "stages.teacher_steps": 0,            # a random teacher: nothing to train first
    "stages.scratch_baseline": False,
    "data.batch_size": 8,
    "data.max_eval_batches": 1,
    "train.max_steps": 4,
    "optim.warmup_steps": 2,              # within the 4 steps
    "train.eval_every_steps": 2,
    "checkpoint.every_steps": 2,
    "checkpoint.keep": 3,
    "log.tensorboard": False,
    "log.progress_bar": False,
}


def _config(mesh: dict, batch_size: int = 8):
  overrides = {**RUN, "data.batch_size": batch_size, **{f"mesh.{k}": v for k, v in mesh.items()}}
  return config_lib.parse(config_lib.load("configs/cpu_demo.py:smoke", overrides))


def _train_losses(workdir) -> list[float]:
  return [r["loss"] for r in read_records(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "train"]


def _eval_losses(workdir) -> list[float]:
  return [r["loss"] for r in read_records(os.path.join(workdir, "metrics.jsonl")) if r["split"] == "eval"]


def _student(workdir) -> dict:
  return load_file(os.path.join(workdir, "student_hf", "model.safetensors"))


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """mesh name -> workdir of a finished run; 'single' ran on one of the 8 devices."""
  assert jax.device_count() == 8, "conftest did not give jax 8 CPU devices"
  root = tmp_path_factory.mktemp("mesh_runs")
  cache = str(root / "data_cache")
  out = {"single": str(root / "single")}
  train_and_evaluate(_config({"data": 1}), out["single"], data_cache=cache, devices=jax.devices()[:1])
  for name, mesh in MESHES.items():
    out[name] = str(root / name)
    train_and_evaluate(_config(mesh), out[name], data_cache=cache)
  return out


@pytest.mark.parametrize("mesh", sorted(MESHES))
def test_a_sharded_run_matches_the_single_device_run(runs, mesh):
  single, sharded = _train_losses(runs["single"]), _train_losses(runs[mesh])
  assert len(single) == len(sharded) == 4
  np.testing.assert_allclose(sharded, single, rtol=2e-5)
  np.testing.assert_allclose(_eval_losses(runs[mesh]), _eval_losses(runs["single"]), rtol=2e-5)
  reference, params = _student(runs["single"]), _student(runs[mesh])
  assert params.keys() == reference.keys()
  for name in reference:
    np.testing.assert_allclose(params[name], reference[name], atol=2e-5, err_msg=name)


def test_a_checkpoint_written_on_one_mesh_resumes_on_another(runs, tmp_path):
  """The FSDP run's step-2 checkpoint, resumed data-parallel, finishes exactly as the single-device run."""
  workdir = str(tmp_path / "resumed")
  shutil.copytree(runs["fsdp"], workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "4"))
  shutil.rmtree(os.path.join(workdir, "student_hf"))
  os.remove(os.path.join(workdir, "metrics.jsonl"))
  train_and_evaluate(_config(MESHES["data"]), workdir, data_cache=str(tmp_path / "cache"))
  np.testing.assert_allclose(_train_losses(workdir), _train_losses(runs["single"])[2:], rtol=2e-5)
  reference, params = _student(runs["single"]), _student(workdir)
  for name in reference:
    np.testing.assert_allclose(params[name], reference[name], atol=2e-5, err_msg=name)


def test_a_batch_that_does_not_split_over_the_batch_axes_is_one_clear_error(tmp_path):
  with pytest.raises(ConfigError) as error:
    train_and_evaluate(_config({"data": -1}, batch_size=6), str(tmp_path / "run"))
  assert error.value.field == "data.batch_size"
  assert "a multiple of 8, the devices the batch is split over (mesh.data x mesh.fsdp = 8 x 1)" in str(error.value)
  assert not os.path.exists(tmp_path / "run")   # refused before anything was built or written


def test_fsdp_splits_the_params_and_every_optimizer_copy_of_them_alike():
  plan = parallel.MeshPlan(parallel.MeshSpec(data=1, fsdp=8))
  student = models.families.from_arch(arch_group("llama", 64, 32, 2, 4, 2, 64, 64, True))
  tx, _ = make_optimizer(OptimConfig(accumulation_steps=2))
  state = create_placed_train_state(plan, models.init_params(student, jax.random.key(0)), {}, tx)
  blocks = state.params["student"]["blocks"]   # 2 blocks stacked: the layer axis is never split
  q_kernel = blocks["attn"]["q"]["kernel"]   # [2, 32, 32]: per block, the first largest dim
  assert q_kernel.sharding.spec == P(None, "fsdp", None)
  assert {shard.data.shape for shard in q_kernel.addressable_shards} == {(2, 4, 32)}
  up_kernel = blocks["mlp"]["up"]["kernel"]  # [2, 32, 64]: the 64
  assert up_kernel.sharding.spec == P(None, None, "fsdp")
  assert blocks["attn_norm"]["scale"].sharding.is_fully_replicated   # [2, 32]: a vector per block
  copies = [leaf for path, leaf in jax.tree_util.tree_flatten_with_path(state.opt_state)[0]
            if parallel.path_names(path)[-4:] == ("blocks", "attn", "q", "kernel")]
  assert len(copies) == 3   # the accumulated gradient, Adam's mu and nu
  assert all(copy.sharding == q_kernel.sharding for copy in copies)


def _free_port() -> int:
  with socket.socket() as probe:
    probe.bind(("localhost", 0))
    return probe.getsockname()[1]


def test_two_processes_of_4_devices_train_as_one_device_does(runs, tmp_path):
  """Two hosts simulated by two processes (gloo collectives over localhost): one mesh of data 4 x fsdp 2.

  Each process loads only its rows; process 0 alone logs, writes metrics and exports.
  """
  workdir = str(tmp_path / "two_hosts")
  command = [sys.executable, "-m", "jaxdistill.train", "--config=configs/cpu_demo.py:smoke", f"--workdir={workdir}",
             "--config.mesh.fsdp=2", *(f"--config.{k}={v}" for k, v in RUN.items())]
  env = {k: v for k, v in os.environ.items() if k != "JAXDISTILL_TEST_CPU_DEVICES"}
  env.update(JAX_PLATFORMS="cpu", JAX_NUM_CPU_DEVICES="4", JAX_COORDINATOR_ADDRESS=f"localhost:{_free_port()}",
             JAX_NUM_PROCESSES="2")
  processes = [subprocess.Popen(command, env={**env, "JAX_PROCESS_ID": str(i)}, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for i in range(2)]
  try:
    outputs = [p.communicate(timeout=300) for p in processes]
  except subprocess.TimeoutExpired:
    for p in processes:
      p.kill()
    outputs = [p.communicate() for p in processes]
    pytest.fail("the two processes did not finish: " + " | ".join(err[-2000:] for _, err in outputs))
  for p, (out, err) in zip(processes, outputs):
    assert p.returncode == 0, out[-3000:] + err[-3000:]
  assert "mesh data 4 x fsdp 2 x tensor 1 on 2 processes" in outputs[0][0]
  assert "[EVAL]" in outputs[0][0] and "[EVAL]" not in outputs[1][0]   # process 0 logs, process 1 computes
  np.testing.assert_allclose(_train_losses(workdir), _train_losses(runs["single"]), rtol=2e-5)
  np.testing.assert_allclose(_eval_losses(workdir), _eval_losses(runs["single"]), rtol=2e-5)
  reference, params = _student(runs["single"]), _student(workdir)
  for name in reference:
    np.testing.assert_allclose(params[name], reference[name], atol=2e-5, err_msg=name)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2", "4"]
