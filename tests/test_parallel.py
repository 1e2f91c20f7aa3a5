"""The mesh: config checks, sharding rules, batch assembly; and the 8-device runs (in their own process)."""

import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from jaxdistill import config as config_lib
from jaxdistill import parallel
from jaxdistill.errors import ConfigError

SIZES = {"data": 1, "fsdp": 4, "tensor": 2}


@pytest.mark.parametrize("names, shape, fsdp_axes, expected", [
    # Column-parallel kernels [D, F] split F on tensor; row-parallel [F, D] split F too (their dim 0).
    (("layers_0", "attn", "q", "kernel"), (32, 64), ("fsdp",), P("fsdp", "tensor")),
    (("layers_0", "attn", "o", "kernel"), (64, 32), ("fsdp",), P("tensor", "fsdp")),
    (("layers_1", "mlp", "up", "kernel"), (32, 96), ("fsdp",), P("fsdp", "tensor")),
    (("layers_1", "mlp", "down", "kernel"), (96, 32), ("fsdp",), P("tensor", "fsdp")),
    # The vocabulary of the embedding [V, D] and of the LM head [D, V].
    (("embed", "embedding"), (64, 32), ("fsdp",), P("tensor", "fsdp")),
    (("lm_head", "kernel"), (32, 64), ("fsdp",), P("fsdp", "tensor")),
    # Experts [E, D, I] and [E, I, D]: the hidden width I on tensor, fsdp on the largest other dim.
    (("layers_0", "mlp", "gate"), (8, 32, 16), ("fsdp",), P(None, "fsdp", "tensor")),
    (("layers_0", "mlp", "down"), (8, 16, 32), ("fsdp",), P(None, "tensor", "fsdp")),
    # An optimizer-state copy ends in the same names; a distillation head has no tensor rule.
    (("opt_state", "mu", "student", "layers_0", "attn", "k", "kernel"), (32, 16), ("fsdp",), P("fsdp", "tensor")),
    (("heads", "router", "gate", "kernel"), (32, 8), ("fsdp",), P("fsdp", None)),
    # fsdp takes the largest dimension that divides evenly, or none; "all" splits over data x fsdp.
    (("layers_0", "attn", "q", "kernel"), (30, 64), ("fsdp",), P(None, "tensor")),
    (("heads", "proj", "kernel"), (12, 40), ("fsdp",), P(None, "fsdp")),
    (("layers_0", "attn", "v", "kernel"), (32, 16), ("data", "fsdp"), P(("data", "fsdp"), "tensor")),
])
def test_param_specs(names, shape, fsdp_axes, expected):
  assert parallel.param_spec(names, shape, SIZES, fsdp_axes) == expected


def test_tensor_rules_skip_a_dimension_that_does_not_divide():
  assert parallel.param_spec(("layers_0", "attn", "k", "kernel"), (32, 6), {"data": 1, "fsdp": 1, "tensor": 4},
                             ("fsdp",)) == P(None, None)


@pytest.mark.parametrize("field, value, message", [
    ("mesh.data", 0, r"'mesh.data' = 0 .* an integer >= 1, or -1 for every device not in fsdp x tensor"),
    ("mesh.fsdp", 0, r"'mesh.fsdp' = 0 .* an integer >= 1"),
    ("mesh.teacher_sharding", "zero3", r"'mesh.teacher_sharding' = 'zero3' .* one of fsdp, all, replicated"),
    ("mesh.distributed", "yes", r"'mesh.distributed' = 'yes' .* one of auto, on, off"),
])
def test_bad_mesh_values_name_field_value_and_allowed(field, value, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.parse(config_lib.load("configs/cpu_demo.py:smoke", {field: value}))


def test_the_mesh_must_use_exactly_the_runs_devices():
  with pytest.raises(ConfigError, match=r"'mesh.data' = 2 .* 1 or -1: mesh.data x mesh.fsdp x mesh.tensor = 2 x 1 x 1 "
                                        r"must be the 1 device\(s\) of this run"):
    parallel.MeshPlan(parallel.MeshSpec(data=2), jax.devices()[:1])
  # The batch is checked against the mesh once the mesh fits the devices (an 8-way mesh on 1 device is the
  # mesh's fault, not the batch of 4's): parsing leaves both to MeshPlan.
  spec = config_lib.parse(config_lib.load("configs/cpu_demo.py:smoke", {"mesh.data": 8})).mesh
  with pytest.raises(ConfigError, match=r"'mesh.data' = 8 .* 1 or -1"):
    parallel.MeshPlan(spec, jax.devices()[:1])
  plan = parallel.MeshPlan(parallel.MeshSpec(), jax.devices()[:1])  # data=-1 takes what is left
  assert plan.shape == {"data": 1, "fsdp": 1, "tensor": 1}


def test_one_device_batches_are_the_host_batch():
  plan = parallel.MeshPlan(parallel.MeshSpec(), jax.devices()[:1])
  ids_BxL = np.arange(12, dtype=np.int32).reshape(4, 3)
  assert plan.host_rows(4) == slice(0, 4)
  batch = plan.global_batch({"student_input_ids": ids_BxL, "inject_nonfinite": np.zeros(6, np.float32),
                             "teacher_record": {"topk_ids": ids_BxL[..., None]}}, 4)
  np.testing.assert_array_equal(batch["student_input_ids"], ids_BxL)
  np.testing.assert_array_equal(batch["teacher_record"]["topk_ids"], ids_BxL[..., None])
  assert batch["inject_nonfinite"].sharding.is_fully_replicated


@pytest.mark.parametrize("env, expected", [
    ({}, False),
    ({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"}, True),
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "1"}, False),   # one Slurm task is a single-process run
    ({"SLURM_JOB_ID": "7", "SLURM_NTASKS": "16"}, True),
    ({"OMPI_COMM_WORLD_SIZE": "4"}, True),
])
def test_a_cluster_is_recognised_from_the_environment(monkeypatch, env, expected):
  for name in ("JAX_COORDINATOR_ADDRESS", "SLURM_JOB_ID", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
    monkeypatch.delenv(name, raising=False)
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  assert parallel.cluster_in_environment() is expected
  parallel.initialize(parallel.MeshSpec(distributed="off"))  # 'off' never joins, whatever the environment
  assert not jax.distributed.is_initialized()


def test_the_multidevice_tests_pass_on_8_simulated_cpu_devices():
  """tests/multidevice in a process of its own, where jax has 8 CPU devices (the count is fixed at start)."""
  tests = os.path.dirname(os.path.abspath(__file__))
  env = {**os.environ, "JAXDISTILL_TEST_CPU_DEVICES": "8", "TF_CPP_MIN_LOG_LEVEL": "2"}
  result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--durations=0",
                           os.path.join(tests, "multidevice")], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(tests), timeout=600)
  assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
  assert " passed" in result.stdout and " failed" not in result.stdout
