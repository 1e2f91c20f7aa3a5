"""Times the compiled distillation step of a config: tokens/s, ms per optimizer step, compile time, memory, MFU.

    python -m bench.step --config configs/NAME.py[:arg] [--config.FIELD=VALUE ...]
        [--seq_lens 512,2048] [--batch_sizes 1,4,8] [--repeats 5] [--nodonate] [--compile_only]
        [--reference] [--offline]

One optimizer step is `optim.accumulation_steps` calls of the jitted `train_step` on random token
batches of `batch_size x seq_len` (the config's unless swept), timed after one warm-up step with
`block_until_ready`, the median of `--repeats`. Reported per sweep point:
  compile   seconds to lower and compile the step (ahead of time, so no timing includes it);
  memory    XLA's compiled estimate of the step's peak: arguments + outputs - donated + temporaries
            (what the program needs, on any backend); on a GPU also the device's measured peak;
  MFU       model FLOPs per second over the device's peak for the student's compute dtype (GPU only).
            Model FLOPs per student token (the PaLM convention, no causal halving, recomputation not
            counted): teacher forward 2 N_t + 4 L n_t d_t, student forward and backward 6 N_s +
            12 L n_s d_s; N counts the matmul parameters (the input embedding table out, the LM head in,
            MoE experts at k of E), L the sequence, n the layers, d the query width (heads x head_dim).
`--reference` runs the same step through `bench/torch_reference.py` (transformers in eager mode, the
way a PyTorch eager trainer does) on the same models, heads and batches, and prints both and the ratio.
`--offline` times the offline teacher (`offline_teacher.py`): a step that records the teacher (epoch 1)
and one that reads the records back (later epochs), beside the live step, with attention and router
losses off (records cannot serve them), and the records' disk bytes per token.
"""

from jaxdistill import cli

cli.quiet_environment()

import dataclasses  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

from absl import flags  # noqa: E402
import jax  # noqa: E402
import numpy as np  # noqa: E402

from jaxdistill import config as config_lib  # noqa: E402
from jaxdistill import inputs  # noqa: E402
from jaxdistill import parallel  # noqa: E402
from jaxdistill.models import ModelConfig, param_shapes, save_pretrained  # noqa: E402
from jaxdistill.objective import offline_teacher  # noqa: E402
from jaxdistill.training import steps  # noqa: E402
from jaxdistill.training.build import build_run, build_tokenizer  # noqa: E402


def _define_flags() -> None:
  """The command line (defined only when run as a program, so tests can import this module)."""
  config_lib.define_config_flag()
  flags.DEFINE_list("seq_lens", [], "Sequence lengths to sweep; default: data.seq_len.")
  flags.DEFINE_list("batch_sizes", [], "Micro-batch sizes to sweep; default: data.batch_size.")
  flags.DEFINE_integer("repeats", 5, "Timed optimizer steps after the warm-up one.")
  flags.DEFINE_boolean("compile_only", False, "Only compile each sweep point: compile time and XLA's peak "
                       "estimate (a memory fit check without the device, or without running).")
  flags.DEFINE_boolean("donate", True, "Donate the train state's buffers to the step (as training does).")
  flags.DEFINE_boolean("reference", False, "Also time the PyTorch reference on the same step.")
  flags.DEFINE_boolean("offline", False, "Also time the offline teacher's epoch-1 and epoch-2 steps.")
  flags.DEFINE_integer("offline_top_k", 64, "Teacher logits per token for --offline (or the config's "
                       "offline_teacher.top_k when set).")


# Dense peak FLOP/s by device kind (substring) and compute dtype; float32 matmuls run as TF32 on GPUs that have it.
PEAK_FLOPS = {
    "H100": {"bfloat16": 989e12, "float16": 989e12, "float32": 495e12},
    "H200": {"bfloat16": 989e12, "float16": 989e12, "float32": 495e12},
    "A100": {"bfloat16": 312e12, "float16": 312e12, "float32": 156e12},
    "P100": {"float16": 18.7e12, "float32": 9.3e12},
}


def matmul_params(cfg: ModelConfig) -> float:
  """Parameters a token multiplies through: all but the input embeddings, the LM head counted once,
  and of each MoE layer's experts only the k of E a token is routed to."""
  total = 0.0
  for path, leaf in jax.tree_util.tree_leaves_with_path(param_shapes(cfg)):
    names = [getattr(p, "key", "") for p in path]
    size = float(np.prod(leaf.shape))
    if names[0] in ("embed", "pos_embed"):
      continue
    if "mlp" in names and names[-1] in ("gate", "up", "down") and cfg.num_experts:  # [E, ...] expert stacks
      size *= cfg.num_experts_per_tok / cfg.num_experts
    total += size
  if cfg.tie_word_embeddings:
    total += cfg.vocab_size * cfg.hidden_size
  return total


def step_flops_per_token(student: ModelConfig, teacher: ModelConfig | None, seq_len: int,
                         teacher_seq_len: int | None = None) -> float:
  """Model FLOPs of one distillation step per student token (convention in the module docstring)."""
  def attention(cfg, length):
    return 4.0 * length * cfg.num_layers * cfg.num_heads * cfg.head_dim

  flops = 6.0 * matmul_params(student) + 3.0 * attention(student, seq_len)
  if teacher is not None:
    teacher_len = teacher_seq_len or seq_len
    flops += (teacher_len / seq_len) * (2.0 * matmul_params(teacher) + attention(teacher, teacher_len))
  return flops


def peak_flops(device_kind: str, dtype: str) -> float | None:
  """The device's dense peak FLOP/s for `dtype`, or None when unknown (CPUs)."""
  for kind, by_dtype in PEAK_FLOPS.items():
    if kind in device_kind:
      return by_dtype.get(dtype)
  return None


@dataclasses.dataclass
class Bench:
  """One sweep point's models, compiled-step inputs and the micro-batches of one optimizer step."""
  cfg: config_lib.Config
  setup: steps.StepSetup
  teacher: object           # hf_io.Pretrained with its params placed, or None (mode 'lm')
  state: object
  batches: list
  plan: parallel.MeshPlan

  @property
  def teacher_params(self):
    return None if self.teacher is None else self.teacher.params

  @property
  def tokens_per_step(self) -> int:
    return sum(int(b["student_attention_mask"].sum()) for b in self.batches)


def build(cfg: config_lib.Config, batch_size: int, seq_len: int) -> Bench:
  """Models from the config (random or loaded), a fresh state and random token batches of one step.

  Everything is placed on the config's mesh (`cfg.mesh`; one device is a 1 x 1 x 1 mesh), as training places it.
  """
  plan = parallel.MeshPlan(cfg.mesh)
  plan.check_batch_size(batch_size)
  run = build_run(cfg, plan, cfg.train.max_steps or 1000, build_tokenizer(cfg), seq_len=seq_len)
  teacher_config = run.setup.teacher
  student_vocab = run.setup.student.vocab_size
  vocab = min(student_vocab, teacher_config.vocab_size if teacher_config else student_vocab)
  tokens = np.random.default_rng(cfg.seed)  # the batches' own generator: the models' keys are training's
  batches = []
  for _ in range(cfg.optim.accumulation_steps):
    ids_BxL = tokens.integers(0, vocab, (batch_size, seq_len), dtype=np.int32)
    mask_BxL = np.ones_like(ids_BxL)
    batches.append(plan.global_batch({"student_input_ids": ids_BxL, "student_attention_mask": mask_BxL,
                                      "teacher_input_ids": ids_BxL, "teacher_attention_mask": mask_BxL}, batch_size))
  return Bench(cfg, run.setup, run.teacher, run.state, batches, plan)


def _median_seconds(run_step, repeats: int) -> float:
  run_step()  # warm-up: first dispatch, allocation
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    run_step()
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def compile_step(bench: Bench, donate: bool = True):
  """(the compiled train step, seconds to lower and compile it, XLA's estimate of its peak bytes)."""
  jit_train = steps.jit_train_step(bench.plan, bench.state, donate)
  start = time.perf_counter()
  compiled = jit_train.lower(bench.state, bench.batches[0], bench.teacher_params, setup=bench.setup).compile()
  return compiled, time.perf_counter() - start, xla_peak_bytes(compiled.memory_analysis())


def time_train_step(bench: Bench, repeats: int, donate: bool = True) -> dict:
  """Compile time, memory and the median optimizer step of `bench` (its state is consumed)."""
  compiled, compile_s, xla_peak = compile_step(bench, donate)
  state = bench.state

  def run_step():
    nonlocal state
    for batch in bench.batches:
      state, metrics = compiled(state, batch, bench.teacher_params)
    jax.block_until_ready((state, metrics))

  seconds = _median_seconds(run_step, repeats)
  bench.state = state
  device = jax.devices()[0]
  result = {"compile_s": compile_s, "step_ms": seconds * 1e3, "tokens_per_s": bench.tokens_per_step / seconds,
            "xla_peak_bytes": xla_peak, "device_peak_bytes": None, "mfu": None}
  stats = device.memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    result["device_peak_bytes"] = stats["peak_bytes_in_use"]
  peak = peak_flops(device.device_kind, bench.setup.student.dtype)
  if peak:  # tokens/s counts every device of the mesh, and so does the peak
    peak *= jax.device_count()
    seq_len = bench.batches[0]["student_input_ids"].shape[1]
    flops = step_flops_per_token(bench.setup.student, bench.setup.teacher, seq_len)
    result["mfu"] = flops * result["tokens_per_s"] / peak
  return result


def xla_peak_bytes(memory) -> int:
  """A compiled program's peak from XLA's analysis: arguments + outputs - aliased (donated) + temporaries."""
  return (memory.argument_size_in_bytes + memory.output_size_in_bytes - memory.alias_size_in_bytes
          + memory.temp_size_in_bytes)


def offline_objective(objective):
  """The objective with a live teacher, without the components records cannot serve (the registry's `records=False`)."""
  return dataclasses.replace(objective.without_unserved(teacher="records"), teacher="live", offline_top_k=0)


def time_offline(bench: Bench, top_k: int, repeats: int, directory: str) -> dict:
  """Median optimizer-step seconds: live teacher, epoch 1 (record and write), epoch 2 (read back)."""
  setup = bench.setup
  live_setup = dataclasses.replace(setup, objective=offline_objective(setup.objective))
  # Built in the records mode, the objective refuses what records cannot serve (ConfigError).
  off_objective = dataclasses.replace(live_setup.objective, teacher="records", offline_top_k=top_k)
  off_setup = dataclasses.replace(live_setup, objective=off_objective)
  state = bench.state
  jit_train = steps.jit_train_step(bench.plan, bench.state)
  batch_size, seq_len = bench.batches[0]["student_input_ids"].shape
  vocab = min(setup.student.vocab_size, setup.teacher.vocab_size)
  arrays = offline_teacher.layout(off_setup.objective, setup.teacher, seq_len, vocab)
  store = offline_teacher.OfflineTeacher(directory, {"bench": True}, batch_size * len(bench.batches), arrays)
  rows = [np.arange(i * batch_size, (i + 1) * batch_size) for i in range(len(bench.batches))]

  def compute(batch):
    return offline_teacher.compute_records(bench.teacher_params, batch, cfg=off_setup.objective,
                                           student=setup.student, teacher=setup.teacher)

  def run(records_of):
    nonlocal state
    for i, batch in enumerate(bench.batches):
      records, write = records_of(i, batch)
      batch = {**batch, offline_teacher.RECORD_KEY: records}
      state, metrics = jit_train(state, batch, bench.teacher_params, setup=off_setup)
      if write:
        store.put(rows[i], records)
    jax.block_until_ready((state, metrics))

  def live_step():
    nonlocal state
    for batch in bench.batches:
      state, metrics = jit_train(state, batch, bench.teacher_params, setup=live_setup)
    jax.block_until_ready((state, metrics))

  live_s = _median_seconds(live_step, repeats)
  epoch1_s = _median_seconds(lambda: run(lambda i, batch: (compute(batch), True)), repeats)
  epoch2_s = _median_seconds(lambda: run(lambda i, batch: (store.get(rows[i]), False)), repeats)
  bench.state = state
  tokens = bench.tokens_per_step
  return {"live_ms": live_s * 1e3, "epoch1_ms": epoch1_s * 1e3, "epoch2_ms": epoch2_s * 1e3,
          "live_tokens_per_s": tokens / live_s, "epoch1_tokens_per_s": tokens / epoch1_s,
          "epoch2_tokens_per_s": tokens / epoch2_s, "bytes_per_token": store.bytes_per_token}


def time_reference(bench: Bench, repeats: int, directory: str) -> dict:
  """The PyTorch reference on this bench's models, heads and batches (imported only when asked for)."""
  from bench import torch_reference

  teacher_dir = save_pretrained(bench.teacher_params, bench.setup.teacher, os.path.join(directory, "teacher"))
  student_dir = save_pretrained(bench.state.params["student"], bench.setup.student, os.path.join(directory, "student"))
  import torch
  device = "cuda" if torch.cuda.is_available() else "cpu"
  return torch_reference.run_reference(
      teacher_dir, student_dir, bench.batches, bench.setup.objective, 0, jax.device_get(bench.state.params["heads"]),
      bench.setup.optim, dtype=bench.setup.student.dtype, device=device, repeats=repeats)


def _mib(value) -> str:
  return "-" if value is None else f"{value / 2 ** 20:,.0f}"


def main(argv) -> None:
  del argv
  args = flags.FLAGS
  cfg = config_lib.parse(config_lib.loaded_config(flags.FlagHolder(args, args["config"])))
  inputs.check_inputs(cfg)  # every missing model, tokenizer or data source in one error, before any load
  seq_lens = [int(v) for v in args.seq_lens] or [cfg.data.seq_len]
  batch_sizes = [int(v) for v in args.batch_sizes] or [cfg.data.batch_size]
  device = jax.devices()[0]
  print(f"device: {jax.device_count()} x {device.platform} ({device.device_kind}); jax {jax.__version__}; "
        f"{cfg.optim.accumulation_steps} micro-batches per optimizer step; student {cfg.student.dtype} compute, "
        f"teacher {cfg.teacher.param_dtype}/{cfg.teacher.dtype}; remat {cfg.student.remat}; chunk "
        f"{cfg.objective.distill.chunk_size}; donate {args.donate}")
  print(f"{'seq':>5s} {'batch':>5s} {'compile s':>9s} {'ms/step':>9s} {'tokens/s':>10s} {'XLA peak MiB':>12s} "
        f"{'device peak MiB':>15s} {'MFU':>6s}")
  for seq_len in seq_lens:
    for batch_size in batch_sizes:
      bench = build(cfg, batch_size, seq_len)
      if args.compile_only:
        _, compile_s, xla_peak = compile_step(bench, args.donate)
        print(f"{seq_len:5d} {batch_size:5d} {compile_s:9.2f} {'-':>9s} {'-':>10s} {_mib(xla_peak):>12s}")
        continue
      if args.reference:  # saved before the timed steps change the student
        with tempfile.TemporaryDirectory() as directory:
          reference = time_reference(bench, args.repeats, directory)
      r = time_train_step(bench, args.repeats, args.donate)
      mfu = "-" if r["mfu"] is None else f"{r['mfu']:.1%}"
      print(f"{seq_len:5d} {batch_size:5d} {r['compile_s']:9.2f} {r['step_ms']:9.1f} {r['tokens_per_s']:10,.0f} "
            f"{_mib(r['xla_peak_bytes']):>12s} {_mib(r['device_peak_bytes']):>15s} {mfu:>6s}")
      if args.reference:
        print(f"{'':11s} torch reference: {reference['step_ms']:9.1f} ms/step {reference['tokens_per_s']:10,.0f} "
              f"tokens/s, peak {_mib(reference['peak_bytes'])} MiB; jaxdistill / reference = "
              f"{r['tokens_per_s'] / reference['tokens_per_s']:.2f}x tokens/s")
      if args.offline:
        with tempfile.TemporaryDirectory() as directory:
          o = time_offline(build(cfg, batch_size, seq_len), cfg.objective.offline_top_k or args.offline_top_k,
                           args.repeats, directory)
        print(f"{'':11s} offline teacher (attention, router off): live {o['live_ms']:.1f} ms/step, epoch 1 "
              f"(record) {o['epoch1_ms']:.1f}, epoch 2 (read back) {o['epoch2_ms']:.1f} = "
              f"{o['live_ms'] / o['epoch2_ms']:.2f}x the live step; {o['bytes_per_token']:,.0f} bytes per token")


if __name__ == "__main__":
  _define_flags()
  cli.run(main)
