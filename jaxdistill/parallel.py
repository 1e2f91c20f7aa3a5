"""Devices: the mesh, where every array lives on it, and the processes of a multi-host run.

One code path for one device, 8 GPUs and several hosts: the compiled steps always run on a mesh with
axes ("data", "fsdp", "tensor"), and XLA's SPMD partitioner inserts the collectives the shardings imply.

- data:   the batch is split over it; params are replicated (gradients are all-reduced).
- fsdp:   the batch is split over it too, and so are the student's params, its gradients and every
          optimizer-state tree (ZeRO-3): each matrix on its largest dimension that divides evenly,
          gathered layer by layer where it is used.
- tensor: each attention and MLP block is split Megatron-style (q, k, v, gate, up, fc by output column,
          o, down, proj by input row; the experts of MoE layers by their hidden width) and so is the
          vocabulary of the embedding and LM head; the batch is replicated over it.

The teacher's params follow `mesh.teacher_sharding`: like the student's (`fsdp`), over every device
(`all`: the fsdp split taken over data x fsdp, for a teacher larger than one device's memory while the
student stays data-parallel), or `replicated`. Vectors (norm scales, biases) and scalars stay replicated.
Stacked blocks (`models.config.is_stacked`) are split per block: their leading layer axis stays whole.

Across hosts each process loads only its own rows of every global batch (`host_rows`) and assembles the
global array from them (`global_batch`); jitted metrics are global reductions already, so every process
holds the same values and process 0 writes them.
"""

import dataclasses
import functools
import math
import os
from typing import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from jaxdistill.errors import ConfigError

AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")       # the axes the batch dimension is split over
TEACHER_SHARDINGS = ("fsdp", "all", "replicated")
DISTRIBUTED = ("auto", "on", "off")
REPLICATED_BATCH_KEYS = ("inject_nonfinite",)   # batch entries without a batch dimension

# Megatron pairs, by module name inside an `attn` or `mlp` block: split the output, or the input.
_COLUMN_PARALLEL = ("q", "k", "v", "gate", "up", "fc")
_ROW_PARALLEL = ("o", "down", "proj")


@dataclasses.dataclass(frozen=True)
class MeshSpec:
  """The `mesh` group: how the run's devices are arranged (their product is every device of the run)."""
  data: int = -1                  # data-parallel ways; -1: all devices not taken by fsdp and tensor
  fsdp: int = 1                   # ways the batch AND the student's params, grads, optimizer state are split
  tensor: int = 1                 # ways each attention/MLP block and the vocabulary are split (within a host)
  teacher_sharding: str = "fsdp"  # fsdp: like the student's | all: over data x fsdp | replicated (over data
                                  # and fsdp; with tensor > 1 its blocks are still split over tensor)
  distributed: str = "auto"       # jax.distributed.initialize: auto (when the environment names a cluster) | on | off


def check_spec(spec: MeshSpec) -> MeshSpec:
  """Field checks that need no devices (`schema.parse`)."""
  if spec.data != -1 and spec.data < 1:
    raise ConfigError("mesh.data", spec.data, "an integer >= 1, or -1 for every device not in fsdp x tensor")
  for field in ("fsdp", "tensor"):
    value = getattr(spec, field)
    if value < 1:
      raise ConfigError(f"mesh.{field}", value, "an integer >= 1")
  if spec.teacher_sharding not in TEACHER_SHARDINGS:
    raise ConfigError("mesh.teacher_sharding", spec.teacher_sharding, f"one of {', '.join(TEACHER_SHARDINGS)}")
  if spec.distributed not in DISTRIBUTED:
    raise ConfigError("mesh.distributed", spec.distributed, f"one of {', '.join(DISTRIBUTED)}")
  return spec


def check_batch_size(batch_size: int, data: int, fsdp: int) -> None:
  """One clear error when a batch cannot be split evenly over the devices of the batch axes."""
  if batch_size % (data * fsdp):
    raise ConfigError("data.batch_size", batch_size,
                      f"a multiple of {data * fsdp}, the devices the batch is split over (mesh.data x mesh.fsdp = "
                      f"{data} x {fsdp}); or change the mesh")


def cluster_in_environment() -> bool:
  """Whether the environment describes a multi-process job (explicitly, or as Slurm / Open MPI run it)."""
  env = os.environ
  if env.get("JAX_COORDINATOR_ADDRESS"):
    return True
  if "SLURM_JOB_ID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
    return True
  return int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1


def initialize(spec: MeshSpec) -> None:
  """`jax.distributed.initialize()` when `mesh.distributed` asks for it; before any other JAX call.

  Explicit clusters name `JAX_COORDINATOR_ADDRESS` (host:port of process 0), `JAX_NUM_PROCESSES` and
  `JAX_PROCESS_ID`; under Slurm and Open MPI jax reads its own variables.
  """
  if spec.distributed == "off" or jax.distributed.is_initialized():
    return
  if spec.distributed == "auto" and not cluster_in_environment():
    return
  env = os.environ
  kwargs = {}
  if env.get("JAX_NUM_PROCESSES"):
    kwargs = {"num_processes": int(env["JAX_NUM_PROCESSES"]), "process_id": int(env.get("JAX_PROCESS_ID", "0"))}
  try:
    jax.distributed.initialize(**kwargs)
  except (RuntimeError, ValueError) as e:
    raise ConfigError("mesh.distributed", spec.distributed,
                      f"'off', or a cluster jax can join: initialize failed ({str(e).splitlines()[0]})") from None


def _resolve(spec: MeshSpec, num_devices: int) -> tuple[int, int, int]:
  """(data, fsdp, tensor) ways on `num_devices`; ConfigError naming the mesh field that cannot fit."""
  model_ways = spec.fsdp * spec.tensor
  if num_devices % model_ways:
    # Blame the size that does not divide the devices on its own; fsdp when only their product does not.
    field = "tensor" if spec.tensor > 1 and (spec.fsdp == 1 or num_devices % spec.tensor) else "fsdp"
    raise ConfigError(f"mesh.{field}", getattr(spec, field),
                      f"mesh.fsdp x mesh.tensor = {spec.fsdp} x {spec.tensor} = {model_ways} must divide the "
                      f"{num_devices} device(s) of this run")
  data = spec.data if spec.data != -1 else num_devices // model_ways
  if data * model_ways != num_devices:
    raise ConfigError("mesh.data", spec.data,
                      f"{num_devices // model_ways} or -1: mesh.data x mesh.fsdp x mesh.tensor = {spec.data} x "
                      f"{spec.fsdp} x {spec.tensor} must be the {num_devices} device(s) of this run (-1 takes every "
                      f"device not in mesh.fsdp x mesh.tensor)")
  return data, spec.fsdp, spec.tensor


def path_names(path) -> tuple[str, ...]:
  """The dict keys, attribute names and indices of a pytree key path, as strings."""
  out = []
  for key in path:
    for attr in ("key", "name", "idx"):
      if hasattr(key, attr):
        out.append(str(getattr(key, attr)))
        break
  return tuple(out)


def tensor_dim(names: tuple[str, ...], ndim: int) -> int | None:
  """The dimension the tensor axis splits for a param (or optimizer-state copy of one) at `names`."""
  if len(names) >= 2 and names[-2] == "embed" and names[-1] == "embedding":
    return 0                                   # [V, D]: the vocabulary
  if len(names) >= 2 and names[-2] == "lm_head" and names[-1] == "kernel":
    return 1                                   # [D, V]
  if len(names) >= 3 and names[-3] in ("attn", "mlp") and names[-1] in ("kernel", "bias"):
    module = names[-2]
    if module in _COLUMN_PARALLEL:
      return ndim - 1                          # kernel [D, F] and bias [F]: the output features
    if module in _ROW_PARALLEL and names[-1] == "kernel":
      return 0                                 # kernel [F, D]: the input features
    return None
  if ndim == 3 and len(names) >= 2 and names[-2] == "mlp" and names[-1] in ("gate", "up", "down"):
    return 2 if names[-1] in ("gate", "up") else 1   # experts [E, D, I] / [E, I, D]: the hidden width
  return None


def param_spec(names: tuple[str, ...], shape: tuple[int, ...], sizes: dict[str, int],
               fsdp_axes: tuple[str, ...]) -> P:
  """The PartitionSpec of one param-shaped array: tensor split by name, fsdp split on its largest free dim."""
  dims: list = [None] * len(shape)
  tensor = tensor_dim(names, len(shape))
  if tensor is not None and sizes["tensor"] > 1 and shape[tensor] % sizes["tensor"] == 0:
    dims[tensor] = "tensor"
  ways = math.prod(sizes[a] for a in fsdp_axes)
  if ways > 1 and len(shape) >= 2:
    free = [d for d in range(len(shape)) if dims[d] is None and shape[d] % ways == 0]
    if free:
      dims[max(free, key=lambda d: shape[d])] = fsdp_axes if len(fsdp_axes) > 1 else fsdp_axes[0]
  return P(*dims)


class MeshPlan:
  """The run's mesh and the shardings of its state, teacher and batches."""

  def __init__(self, spec: MeshSpec, devices=None):
    devices = list(devices if devices is not None else jax.devices())
    self.spec = spec
    self.shape = dict(zip(AXES, _resolve(spec, len(devices))))
    self.mesh = jax.make_mesh(tuple(self.shape.values()), AXES, (jax.sharding.AxisType.Auto,) * len(AXES),
                              devices=devices)
    self.replicated = NamedSharding(self.mesh, P())

  @property
  def batch_ways(self) -> int:
    return self.shape["data"] * self.shape["fsdp"]

  def describe(self) -> str:
    ways = " x ".join(f"{axis} {self.shape[axis]}" for axis in AXES)
    hosts = f" on {jax.process_count()} processes" if jax.process_count() > 1 else ""
    batch = f"the batch over {self.batch_ways} device{'s' if self.batch_ways > 1 else ''}"
    return f"{ways}{hosts}; {batch}; teacher params: {self.spec.teacher_sharding}"

  def check_batch_size(self, batch_size: int) -> None:
    check_batch_size(batch_size, self.shape["data"], self.shape["fsdp"])

  # ---- params and state

  def _tree_shardings(self, tree, fsdp_axes: tuple[str, ...]):
    from jaxdistill.models.config import is_stacked  # here: the models package imports this module

    def sharding(path, leaf):
      names = path_names(path)
      layer_axis = is_stacked(names)  # stacked blocks: the leading layer axis is never split
      shape = tuple(leaf.shape)[layer_axis:]
      if len(shape) < 2:
        return self.replicated
      spec = param_spec(names, shape, self.shape, fsdp_axes)
      return NamedSharding(self.mesh, P(None, *spec) if layer_axis else spec)
    return jax.tree_util.tree_map_with_path(sharding, tree)

  def state_shardings(self, state):
    """Shardings of a TrainState (arrays or ShapeDtypeStructs): params and optimizer-state copies split alike."""
    return self._tree_shardings(state, ("fsdp",))

  def teacher_shardings(self, params):
    axes = {"fsdp": ("fsdp",), "all": BATCH_AXES, "replicated": ()}[self.spec.teacher_sharding]
    return self._tree_shardings(params, axes)

  def put(self, tree, shardings):
    """Host (numpy) or device arrays onto the mesh; each device receives only its own shard."""
    return jax.device_put(tree, shardings)

  def replicate(self, tree):
    return jax.device_put(tree, self.replicated)

  # ---- batches

  def batch_sharding(self, ndim: int) -> NamedSharding:
    return NamedSharding(self.mesh, P(BATCH_AXES, *([None] * (ndim - 1))))

  @functools.cache
  def host_rows(self, batch_size: int) -> slice:
    """The rows of each global batch this process loads: those its devices hold (computed once per size)."""
    indices = self.batch_sharding(1).addressable_devices_indices_map((batch_size,)).values()
    starts = [index[0].start or 0 for index in indices]
    stops = [batch_size if index[0].stop is None else index[0].stop for index in indices]
    return slice(min(starts), max(stops))

  def global_batch(self, host_batch: dict, batch_size: int) -> dict:
    """A batch of global arrays from this process's rows (`host_rows`) of every batch entry (or all rows)."""
    rows = self.host_rows(batch_size)

    def assemble(path, local):
      local = np.asarray(local)
      if path_names(path)[0] in REPLICATED_BATCH_KEYS:
        return jax.device_put(local, self.replicated)
      shape = (batch_size,) + local.shape[1:]
      offset = 0 if len(local) == batch_size else rows.start   # the whole batch, or this process's rows

      def shard(index):
        first = index[0]
        start = (first.start or 0) - offset
        stop = (batch_size if first.stop is None else first.stop) - offset
        return local[(slice(start, stop),) + tuple(index[1:])]
      return jax.make_array_from_callback(shape, self.batch_sharding(len(shape)), shard)

    return jax.tree_util.tree_map_with_path(assemble, host_batch)

  def bind(self, jitted) -> "OnMesh":
    """`jitted` traced and run with this mesh as the context mesh (`constrain_batch` reads it)."""
    return OnMesh(jitted, self.mesh)

  # ---- leaving the mesh

  def to_host(self, tree):
    """Full numpy values of (possibly cross-host) arrays, on every process."""
    if jax.process_count() == 1:
      return jax.device_get(tree)
    return multihost_utils.process_allgather(tree, tiled=True)


@dataclasses.dataclass(frozen=True)
class OnMesh:
  """A jitted function called and lowered under `jax.set_mesh(mesh)`."""
  jitted: Callable
  mesh: jax.sharding.Mesh

  def __call__(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.jitted.lower(*args, **kwargs)


def constrain_batch(x_BxN):
  """Pins an activation's batch dimension to the batch axes of the context mesh (no mesh: unchanged).

  The residual stream is pinned so the partitioner gathers FSDP weights to the activations rather than
  moving the activations to the weights' layout.
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not set(BATCH_AXES) <= set(mesh.axis_names):
    return x_BxN
  if x_BxN.shape[0] % math.prod(mesh.shape[a] for a in BATCH_AXES):
    return x_BxN
  return jax.lax.with_sharding_constraint(x_BxN, P(BATCH_AXES, *([None] * (x_BxN.ndim - 1))))


def is_main_process() -> bool:
  """Process 0 writes logs, metrics and exports; the others compute alongside it.

  Asks no device before the cluster is joined (a single-process run is process 0).
  """
  return not jax.distributed.is_initialized() or jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process arrives (a no-op in a single-process run)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)
