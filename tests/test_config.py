"""Config files, overrides, validation and the model-config readers/writers."""

import dataclasses
import glob

import jax
import numpy as np
import pytest

from conftest import FAMILY_CONFIGS, make_torch_model
from jaxdistill import config as config_lib
from jaxdistill import models
from jaxdistill.errors import CommandLineError, ConfigError, ModelLoadError

CONFIG_FILES = sorted(glob.glob("configs/*.py"))


def test_there_are_configs():
  assert {"configs/cpu_demo.py", "configs/p100.py", "configs/p100_same_tokenizer.py"} <= set(CONFIG_FILES)


@pytest.mark.parametrize("arg", ["", ":smoke"])
@pytest.mark.parametrize("path", CONFIG_FILES)
def test_every_config_loads_locked_and_validates(path, arg):
  cfg = config_lib.load(path + arg)
  assert cfg.is_locked
  parsed = config_lib.parse(cfg)
  assert parsed.data.seq_len >= 2 and parsed.data.batch_size >= 1
  if arg == ":smoke":  # smoke forms must run offline: no checkpoint to download
    assert parsed.teacher.arch is not None and parsed.student.arch is not None
    assert parsed.tokenizer in ("byte", "bpe:400") and parsed.teacher_tokenizer in ("", "sp:600")


@pytest.mark.parametrize("path, teacher, teacher_seq_len", [
    ("configs/p100.py", "./checkpoints/qwen3-moe-1b", 576),                  # the seed pairing: two tokenizers
    ("configs/p100_same_tokenizer.py", "HuggingFaceTB/SmolLM-360M", 0),    # one shared tokenizer
])
def test_p100_configs_pair_a_teacher_with_smollm_135m_without_bf16(path, teacher, teacher_seq_len):
  parsed = config_lib.parse(config_lib.load(path))
  assert parsed.teacher.name_or_path == teacher and parsed.student.name_or_path == "HuggingFaceTB/SmolLM-135M"
  assert (parsed.tokenizer, parsed.teacher_tokenizer) == ("", "")  # each checkpoint's own tokenizer
  # The P100 has no bf16: fp32 master weights, fp16 compute (dynamic loss scaling), an fp16 teacher.
  assert (parsed.student.param_dtype, parsed.student.dtype) == ("float32", "float16")
  assert (parsed.teacher.param_dtype, parsed.teacher.dtype) == ("float16", "float16")
  assert parsed.data.seq_len == 512 and parsed.optim.accumulation_steps == 16 and parsed.train.epochs == 3
  assert parsed.data.teacher_seq_len == teacher_seq_len


def test_p100_smoke_pairs_a_tiny_moe_teacher_and_two_local_tokenizers():
  parsed = config_lib.parse(config_lib.load("configs/p100.py:smoke"))
  assert (parsed.tokenizer, parsed.teacher_tokenizer) == ("bpe:400", "sp:600")
  arch = parsed.teacher.arch
  assert (arch["family"], arch["num_experts"], arch["num_experts_per_tok"]) == ("qwen3_moe", 4, 2)
  assert parsed.objective.router.experts == "auto"


def test_override_changes_one_field():
  parsed = config_lib.parse(config_lib.load("configs/cpu_demo.py:smoke", {"student.dtype": "bfloat16",
                                                                          "data.seq_len": 16}))
  assert parsed.student.dtype == "bfloat16" and parsed.teacher.dtype == "float32"
  assert parsed.data.seq_len == 16


def test_total_steps_is_not_a_config_field():
  with pytest.raises(ConfigError, match=r"'optim.total_steps'.*an existing field"):
    config_lib.load("configs/cpu_demo.py:smoke", {"optim.total_steps": 5})


def test_unknown_field_cannot_be_added():
  with pytest.raises(ConfigError, match=r"'student.dtyp'.*an existing field"):
    config_lib.load("configs/cpu_demo.py:smoke", {"student.dtyp": "bfloat16"})


def test_missing_config_file():
  with pytest.raises(CommandLineError, match=r"no config file 'configs/nope.py'"):
    config_lib.load("configs/nope.py")


@pytest.mark.parametrize("argv", [["--config=configs/nope.py"],
                                  ["--config", "configs/nope.py:smoke", "--config.seed=3"]])
def test_missing_config_file_on_the_command_line_is_one_clear_line(argv, monkeypatch):
  """Before: `--config: Configuration is not available because of an earlier failure to load: Failed loading
  config file config_config [Errno 2] No such file or directory: 'configs/nope.py'`."""
  from absl import flags
  monkeypatch.setattr("sys.argv", ["train", *argv])   # config_flags finds the overrides in sys.argv
  flag_values = flags.FlagValues()
  holder = config_lib.define_config_flag(flag_values)
  with pytest.raises(CommandLineError) as error:
    flag_values(["train", *argv])
    config_lib.loaded_config(holder)
  assert str(error.value) == "--config: no config file 'configs/nope.py'"


def test_an_existing_config_file_still_loads_with_overrides(monkeypatch):
  from absl import flags
  argv = ["train", "--config=configs/cpu_demo.py:smoke", "--config.seed=3"]
  monkeypatch.setattr("sys.argv", argv)
  flag_values = flags.FlagValues()
  holder = config_lib.define_config_flag(flag_values)
  flag_values(argv)
  cfg = config_lib.loaded_config(holder)
  assert cfg.is_locked and cfg.seed == 3 and cfg.data.seq_len == 32


def _config_arguments():
  for path in CONFIG_FILES:
    for arg in ("",) + getattr(config_lib.config_module(path), "ARGS", ("smoke",)):
      yield path + (f":{arg}" if arg else "")


@pytest.mark.parametrize("config", list(_config_arguments()))
def test_every_config_argument_parses_with_its_warmup_inside_its_steps(config):
  """Every shipped config form (:smoke, :cross, ...): the warmup fits the run and the teacher stage."""
  parsed = config_lib.parse(config_lib.load(config))
  for steps in (parsed.train.max_steps, parsed.stages.teacher_steps):
    assert steps == 0 or parsed.optim.warmup_steps <= steps


@pytest.mark.parametrize("field, value, message", [
    ("student.dtype", "float64", r"'student.dtype' = 'float64' is not allowed: one of float32, bfloat16, float16"),
    ("teacher.param_dtype", "int8", r"'teacher.param_dtype' = 'int8' .* one of float32, bfloat16, float16"),
    ("student.remat", "all", r"'student.remat' = 'all' .* one of none, full, dots, dots_no_batch"),
    ("student.arch.family", "mamba",
     r"'student.arch.family' = 'mamba' .* one of llama, qwen2, qwen3, gpt2, qwen3_moe, mixtral, mistral, phi3"),
    ("student.arch.num_heads", 3, r"'student.arch.num_heads' = 3 .* a divisor of hidden_size=32"),
    ("student.arch.num_kv_heads", 3, r"'student.arch.num_kv_heads' = 3 .* a divisor of num_heads=4"),
    ("student.arch.num_layers", 0, r"'student.arch.num_layers' = 0 .* an integer >= 1"),
    ("student.arch.num_experts", 4, r"'student.arch.num_experts' = 4 .* 0 for the dense family llama \(experts need"),
    ("student.arch.family", "qwen3_moe", r"'student.arch.num_experts' = 0 .* an integer >= 1 for the MoE family"),
    ("student.arch.num_experts_per_tok", 0, r"'student.arch.num_experts_per_tok' = 0 .* an integer >= 1"),
    ("student.arch.moe_intermediate_size", -1, r"'student.arch.moe_intermediate_size' = -1 .* an integer >= 0"),
    ("student.arch.decoder_sparse_step", 0, r"'student.arch.decoder_sparse_step' = 0 .* an integer >= 1"),
    ("data.seq_len", 1, r"'data.seq_len' = 1 .* an integer >= 2"),
    ("data.batch_size", 0, r"'data.batch_size' = 0 .* an integer >= 1"),
    ("seed", -1, r"'seed' = -1 .* an integer >= 0"),
    ("distill.kd_mode", "kl", r"'distill.kd_mode' = 'kl' .* one of forward_kl, reverse_kl, jsd"),
    ("distill.kd_topk_tail", "drop", r"'distill.kd_topk_tail' = 'drop' .* one of renormalize, other_bucket"),
    ("distill.jsd_beta", 1.5, r"'distill.jsd_beta' = 1.5 .* a number in \[0, 1\] \(0: forward KL, 1: reverse KL\)$"),
    ("distill.attention_pairs", ((1,),), r"'distill.attention_pairs' = \(\(1,\),\) .* index pairs"),
    ("curriculum.kd", (0.7, 0.7), r"'curriculum.kd' = \(0.7, 0.7\) .* 3 values, one per phase"),
    ("curriculum.boundaries", (0.6, 0.3), r"'curriculum.boundaries' .* increasing fractions"),
    ("curriculum.lm", ("a", 1, 1), r"'curriculum.lm' = \('a', 1, 1\) .* a tuple of numbers, one weight per phase$"),
    ("router.top_k_end", 9, r"'router.top_k_end' = 9 .* an integer in 1..num_experts=4"),
    ("optim.accumulation_steps", 0, r"'optim.accumulation_steps' = 0 .* an integer >= 1"),
    ("optim.learning_rate", "fast", r"'optim.learning_rate' = 'fast' .* cannot be casted to type <class 'float'>"),
    ("mode", "pretrain", r"'mode' = 'pretrain' is not allowed: one of distill, lm$"),
    ("stages.teacher_steps", -1, r"'stages.teacher_steps' = -1 .* an integer >= 0 \(0: no teacher training\)"),
    ("stages.teacher_learning_rate", -1.0, r"'stages.teacher_learning_rate' = -1.0 .* a number >= 0"),
    ("log.print_every_steps", 0, r"'log.print_every_steps' = 0 is not allowed: an integer >= 1$"),
    ("log.print_every_steps", 2.5, r"'log.print_every_steps' = 2.5 .* cannot be casted to type <class 'int'>"),
])
def test_bad_values_name_field_value_and_allowed(field, value, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.parse(config_lib.load("configs/cpu_demo.py:smoke", {field: value}))


@pytest.mark.parametrize("overrides, message", [
    ({"mode": "lm"}, r"'stages.teacher_steps' = 8 .* 0 in mode 'lm' \(there is no teacher\)"),
    ({"mode": "lm", "stages.teacher_steps": 0}, r"'stages.scratch_baseline' = True .* False in mode 'lm'"),
    ({"mode": "lm", "stages.teacher_steps": 0, "stages.scratch_baseline": False, "train.best_metric": "kl_t1"},
     r"'train.best_metric' = 'kl_t1' .* one of student_lm_loss, loss, raw/lm$"),
    ({"mode": "lm", "stages.teacher_steps": 0, "stages.scratch_baseline": False, "debug.inject_nonfinite": "kd",
      "debug.inject_every": 2}, r"'debug.inject_nonfinite' = 'kd' .* '' or one of lm$"),
    ({"teacher.name_or_path": "HuggingFaceTB/SmolLM-360M"},
     r"'stages.teacher_steps' = 8 .* 0 when teacher.name_or_path is set \('HuggingFaceTB/SmolLM-360M' is trained"),
])
def test_stages_and_mode_must_agree(overrides, message):
  with pytest.raises(ConfigError, match=message):
    config_lib.parse(config_lib.load("configs/cpu_demo.py:smoke", overrides))


@pytest.mark.parametrize("overrides, message", [
    ({"student.arch.num_experts_per_tok": 5},
     r"'student.arch.num_experts_per_tok' = 5 .* an integer in 1..num_experts=4$"),
    ({"student.arch.decoder_sparse_step": 3},
     r"'student.arch.decoder_sparse_step' = 3 .* an integer in 1..num_layers=2 \(a larger step leaves no sparse block"),
    ({"student.arch.family": "mixtral", "student.arch.norm_topk_prob": False},
     r"'student.arch.norm_topk_prob' = False .* True for mixtral \(it always renormalises"),
    ({"student.arch.family": "mixtral", "student.arch.decoder_sparse_step": 2},
     r"'student.arch.decoder_sparse_step' = 2 .* 1 for mixtral \(every block is sparse\)$"),
    ({"student.arch.family": "mixtral", "student.arch.moe_intermediate_size": 16},
     r"'student.arch.moe_intermediate_size' = 16 .* 0 or intermediate_size=64 for mixtral"),
])
def test_bad_expert_settings_name_field_value_and_allowed(overrides, message):
  moe_student = {"student.arch.family": "qwen3_moe", "student.arch.num_experts": 4}
  with pytest.raises(ConfigError, match=message):
    config_lib.parse(config_lib.load("configs/cpu_demo.py:smoke", {**moe_student, **overrides}))


def test_lm_mode_weighs_only_the_lm_term():
  cfg = config_lib.parse(config_lib.load("configs/cpu_demo.py:smoke", {
      "mode": "lm", "stages.teacher_steps": 0, "stages.scratch_baseline": False}))
  curriculum = cfg.objective.curriculum
  assert curriculum.values("lm") == (1.0, 1.0, 1.0) and curriculum.values("kd") == (0.0, 0.0, 0.0)
  assert [c.name for c in cfg.objective.components()] == ["lm"] and cfg.objective.teacher == "none"
  assert not cfg.objective.needs_teacher and not cfg.objective.needs_heads


def test_the_curriculum_group_is_the_registrys_entries_with_the_recommended_recipe_and_the_seeds_on_request():
  from jaxdistill.objective import ENTRIES

  group = config_lib.base_config().curriculum
  assert set(group.keys()) == {e.name for e in ENTRIES} | {"boundaries", "alpha_kd", "temperature", "ramp_fraction"}
  # The recommended recipe: kd 0.7 + lm 0.3 at T = 1, every other entry off.
  assert {e.name: tuple(group[e.name]) for e in ENTRIES} == {
      e.name: e.defaults if e.name in ("kd", "lm") else (0.0, 0.0, 0.0) for e in ENTRIES}
  assert tuple(group["kd"]) == (0.7, 0.7, 0.7) and tuple(group["temperature"]) == (1.0, 1.0, 1.0)
  # The seed run's: the registry's per-component defaults, T = 2.0 / 1.75 / 1.5.
  seed = config_lib.seed_recipe(config_lib.base_config()).curriculum
  assert {e.name: tuple(seed[e.name]) for e in ENTRIES} == {e.name: e.defaults for e in ENTRIES}
  assert tuple(seed["feature"]) == (0.0, 0.1, 0.1) and tuple(seed["temperature"]) == (2.0, 1.75, 1.5)
  p100 = config_lib.parse(config_lib.load("configs/p100_same_tokenizer.py"))
  assert p100.objective.curriculum.temperature == (2.0, 1.75, 1.5)


def test_the_teacher_cache_key_follows_what_the_weights_depend_on(tmp_path):
  from jaxdistill.training import stages

  def directory(**overrides):
    return stages.teacher_dir(config_lib.parse(config_lib.load(
        "configs/cpu_demo.py:smoke", {"stages.teacher_cache": str(tmp_path), **overrides})))

  base = directory()
  assert base.startswith(str(tmp_path / "llama-64x2-"))
  # The distillation's own settings do not touch the teacher: the same cached teacher.
  assert directory(**{"curriculum.kd": (0.5, 0.5, 0.5), "train.max_steps": 99, "student.arch.hidden_size": 64}) == base
  # Its architecture, data, seed, steps and optimizer do.
  for override in ({"teacher.arch.num_layers": 3}, {"data.seq_len": 64}, {"seed": 1}, {"stages.teacher_steps": 9},
                   {"stages.teacher_learning_rate": 1e-3}, {"optim.warmup_steps": 7},
                   {"teacher.arch.family": "qwen3_moe", "teacher.arch.num_experts": 4}):
    assert directory(**override) != base, override


def test_random_student_needs_a_tokenizer():
  cfg = config_lib.load("configs/cpu_demo.py:smoke", {"tokenizer": ""})
  with pytest.raises(ConfigError, match=r"'tokenizer' = '' .*when the student has no checkpoint"):
    config_lib.parse(cfg)


def _spec(arch, dtype="float32") -> config_lib.ModelSpec:
  """A random-model spec of the arch group `arch`."""
  return config_lib.ModelSpec(name_or_path="", revision="main", arch=arch, param_dtype="float32", dtype=dtype)


@pytest.mark.parametrize("family, expected", [
    ("llama", dict(qkv_bias=False, qk_norm=False, norm="rms", gated_mlp=True)),
    ("qwen2", dict(qkv_bias=True, o_bias=False, qk_norm=False, norm="rms")),
    ("qwen3", dict(qkv_bias=False, qk_norm=True, norm="rms")),
    ("gpt2", dict(qkv_bias=True, o_bias=True, norm="layer", gated_mlp=False, rope=None,
                  activation="gelu_new", tie_word_embeddings=True)),
])
def test_arch_builds_the_family_transformers_defines(family, expected):
  arch = config_lib.arch_group(family=family, vocab_size=0, hidden_size=32, num_layers=2, num_heads=4,
                               num_kv_heads=2 if family != "gpt2" else 4, intermediate_size=64,
                               max_position_embeddings=128, tie_word_embeddings=True)
  cfg = _spec(arch, dtype="bfloat16").model_config(vocab_size=300)
  assert (cfg.family, cfg.vocab_size, cfg.hidden_size, cfg.head_dim, cfg.dtype) == (family, 300, 32, 8, "bfloat16")
  assert cfg.intermediate_size == 64
  for key, value in expected.items():
    assert getattr(cfg, key) == value, key
  # The same architecture as transformers builds it from these sizes with its own defaults.
  import transformers
  kwargs = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=128,
                tie_word_embeddings=True)
  if family == "gpt2":
    kwargs["n_inner"] = 64
  else:
    kwargs.update(intermediate_size=64, num_key_value_heads=2, head_dim=8)
  reference = models.from_hf_config(transformers.AutoConfig.for_model(family, **kwargs).to_dict())
  assert dataclasses.replace(reference, param_dtype="float32", dtype="bfloat16") == cfg


@pytest.mark.parametrize("family, experts, hf_experts, expected", [
    # Defaults: experts as wide as intermediate_size, top-k renormalised, every block sparse.
    ("qwen3_moe", {}, dict(moe_intermediate_size=64, norm_topk_prob=True),
     dict(qk_norm=True, norm_eps=1e-6, moe_intermediate_size=64, sparse_layers=(0, 1))),
    ("qwen3_moe", dict(moe_intermediate_size=16, norm_topk_prob=False, decoder_sparse_step=2),
     dict(moe_intermediate_size=16, norm_topk_prob=False, decoder_sparse_step=2),
     dict(norm_topk_prob=False, moe_intermediate_size=16, sparse_layers=(1,))),
    ("mixtral", {}, {}, dict(qk_norm=False, qkv_bias=False, norm_eps=1e-5, norm_topk_prob=True,
                             moe_intermediate_size=64, sparse_layers=(0, 1))),
])
def test_moe_arch_builds_the_family_transformers_defines(family, experts, hf_experts, expected):
  arch = config_lib.arch_group(family=family, vocab_size=0, hidden_size=32, num_layers=2, num_heads=4,
                               num_kv_heads=2, intermediate_size=64, max_position_embeddings=128,
                               tie_word_embeddings=True, num_experts=4, num_experts_per_tok=2, **experts)
  cfg = _spec(arch, dtype="bfloat16").model_config(vocab_size=300)
  assert (cfg.num_experts, cfg.num_experts_per_tok, cfg.intermediate_size) == (4, 2, 64)
  for key, value in expected.items():
    assert getattr(cfg, key) == value, key
  assert cfg.rope.theta == (1e6 if family == "mixtral" else 10000.0)
  # The same architecture as transformers builds it from these sizes with its own defaults.
  import transformers
  kwargs = dict(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=8, intermediate_size=64, max_position_embeddings=128, tie_word_embeddings=True,
                num_experts_per_tok=2, **hf_experts)
  kwargs["num_local_experts" if family == "mixtral" else "num_experts"] = 4
  reference = models.from_hf_config(transformers.AutoConfig.for_model(family, **kwargs).to_dict())
  assert dataclasses.replace(reference, param_dtype="float32", dtype="bfloat16") == cfg


@pytest.mark.parametrize("arch, sparse_layers, expert_width", [
    (dict(family="qwen3_moe", num_experts=4, moe_intermediate_size=16, decoder_sparse_step=2), (1,), 16),
    (dict(family="mixtral", num_experts=4), (0, 1), 64),
])
def test_random_moe_arch_initialises_and_returns_router_logits(arch, sparse_layers, expert_width):
  from jaxdistill.models import transformer
  from jaxdistill.training import build
  overrides = {f"student.arch.{field}": value for field, value in arch.items()}
  cfg = config_lib.parse(config_lib.load("configs/cpu_demo.py:smoke", overrides))
  model = build.build_model(cfg.student, 300, jax.random.PRNGKey(0), "student")
  assert model.config.sparse_layers == sparse_layers
  assert models.from_hf_config(model.hf_config) == model.config   # the export describes the same model
  mlp = model.params["moe_blocks"]["mlp"]   # the sparse blocks, stacked
  n = len(sparse_layers)
  assert (mlp["gate"].shape, mlp["down"].shape, mlp["router"]["kernel"].shape) == (
      (n, 4, 32, expert_width), (n, 4, expert_width, 32), (n, 32, 4))
  ids_BxL = jax.random.randint(jax.random.PRNGKey(1), (2, 8), 0, 300)
  out = transformer.forward(model.params, model.config, ids_BxL, output_router_logits=True)
  assert out.logits_BxLxV.shape == (2, 8, 300) and np.isfinite(np.asarray(out.logits_BxLxV)).all()
  assert [r.shape for r in out.router_logits] == [(2, 8, 4)] * len(sparse_layers)
  router_BxLxE = np.asarray(out.router_logits[0])
  assert np.isfinite(router_BxLxE).all() and router_BxLxE.std() > 1e-3   # a real, initialised router
  # The router is linear without bias, and its layer's input does not depend on it: doubling the first sparse
  # layer's router kernel doubles exactly the logits it returns.
  doubled_mlp = {**mlp, "router": {"kernel": mlp["router"]["kernel"].at[0].multiply(2)}}   # stack index 0
  doubled = {**model.params, "moe_blocks": {**model.params["moe_blocks"], "mlp": doubled_mlp}}
  router2_BxLxE = transformer.forward(doubled, model.config, ids_BxL, output_router_logits=True).router_logits[0]
  np.testing.assert_allclose(np.asarray(router2_BxLxE), 2 * router_BxLxE, rtol=1e-6)


@pytest.mark.parametrize("name", list(FAMILY_CONFIGS))
def test_hf_config_round_trip(name):
  hf = make_torch_model(name).config.to_dict()
  cfg = models.from_hf_config(hf)
  assert models.from_hf_config(models.to_hf_config(cfg)) == cfg
  assert models.from_hf_config(models.to_hf_config(cfg, base=hf)) == cfg


def test_log_prints_a_train_line_every_50_steps_unless_told():
  assert config_lib.parse(config_lib.load("configs/cpu_demo.py:smoke")).log.print_every_steps == 50
  told = config_lib.parse(config_lib.load("configs/cpu_demo.py:smoke", {"log.print_every_steps": 7}))
  assert told.log.print_every_steps == 7


def test_training_groups_become_typed_configs():
  parsed = config_lib.parse(config_lib.load("configs/cpu_demo.py:smoke", {
      "curriculum.kd": (0.5, 0.6, 0.7), "distill.attention_pairs": ((0, 1),), "optim.accumulation_steps": 4,
      "optim.learning_rate": 1}))
  assert parsed.objective.curriculum.values("kd") == (0.5, 0.6, 0.7)
  assert parsed.objective.distill.attention_pairs == ((0, 1),)
  assert parsed.optim.accumulation_steps == 4 and parsed.optim.learning_rate == 1.0
  assert parsed.objective.total_steps == parsed.optim.total_steps == 0  # derived by the trainer
  hash(parsed)  # static jit arguments must be hashable


# ---------------------------------------------------------------------------------------------
# Values that fail only against the models, the devices or the run's length: one line each.

def _smoke(**overrides):
  return config_lib.parse(config_lib.load("configs/cpu_demo.py:smoke", overrides))


def _models(cfg, vocab_size=257):
  return cfg.student.model_config(vocab_size), cfg.teacher.model_config(vocab_size)


@pytest.mark.parametrize("objective, message", [
    (dict(attention_pairs=((2, 0),)), "config field 'distill.attention_pairs' = ((2, 0),) is not allowed: (student, "
                                      "teacher) block pairs in student blocks 0..1, teacher blocks 0..1"),
    (dict(layer_map=((1, 1), (3, 2))), "config field 'distill.layer_map' = ((1, 1), (3, 2)) is not allowed: "
                                       "(student, teacher) hidden_states index pairs in student 0..2, teacher 0..2 "
                                       "(0: the embeddings)"),
    (dict(expert_layers=(1, 2, 2, 5)), "config field 'distill.expert_layers' = (1, 2, 2, 5) is not allowed: "
                                       "router.num_experts=4 teacher hidden_states indices in 1..2"),
    (dict(kd_top_k=258), "config field 'distill.kd_top_k' = 258 is not allowed: an integer <= 257, the vocabulary kd "
                         "compares (teacher.vocab_size=257, student.vocab_size=257), or 0"),
    (dict(offline_top_k=300), "config field 'offline_teacher.top_k' = 300 is not allowed: an integer <= 257, the "
                              "vocabulary kd compares (teacher.vocab_size=257, student.vocab_size=257), or 0"),
])
def test_layer_indices_and_top_k_outside_the_models_name_field_value_and_range(objective, message):
  """Before: a bare ValueError (a traceback) for the layer indices; top-k larger than the vocabulary was not checked."""
  cfg = _smoke()
  student, teacher = _models(cfg)

  def changed(changes):  # `distill` fields, and offline_top_k: records (of what records can serve)
    distill = {k: v for k, v in changes.items() if k != "offline_top_k"}
    obj = dataclasses.replace(cfg.objective, distill=dataclasses.replace(cfg.objective.distill, **distill))
    if "offline_top_k" in changes:
      obj = dataclasses.replace(obj.without_unserved(teacher="records"), teacher="records",
                                offline_top_k=changes["offline_top_k"])
    return obj

  with pytest.raises(ConfigError) as error:
    changed(objective).resolve_layers(student, teacher)
  assert str(error.value) == message
  assert changed(dict(kd_top_k=257)).resolve_layers(student, teacher).distill.kd_top_k == 257


@pytest.mark.parametrize("mesh, message", [
    (dict(fsdp=3), "config field 'mesh.fsdp' = 3 is not allowed: mesh.fsdp x mesh.tensor = 3 x 1 = 3 must divide "
                   "the 1 device(s) of this run"),
    (dict(tensor=3), "config field 'mesh.tensor' = 3 is not allowed: mesh.fsdp x mesh.tensor = 1 x 3 = 3 must divide "
                     "the 1 device(s) of this run"),
    (dict(data=1, fsdp=3), "config field 'mesh.fsdp' = 3 is not allowed: mesh.fsdp x mesh.tensor = 3 x 1 = 3 must "
                           "divide the 1 device(s) of this run"),
    (dict(data=3), "config field 'mesh.data' = 3 is not allowed: 1 or -1: mesh.data x mesh.fsdp x mesh.tensor = 3 x 1 "
                   "x 1 must be the 1 device(s) of this run (-1 takes every device not in mesh.fsdp x mesh.tensor)"),
])
def test_an_impossible_mesh_names_the_mesh_and_the_devices_not_the_batch(mesh, message):
  """Before: mesh.tensor=3 blamed 'mesh.fsdp' = 1, and an explicit mesh.data (data=1, fsdp=3 or data=3) blamed
  'data.batch_size' = 4 at parse time, before the devices were known."""
  from jaxdistill import parallel
  cfg = _smoke(**{f"mesh.{field}": value for field, value in mesh.items()})   # the batch of 4 is no longer blamed
  with pytest.raises(ConfigError) as error:
    parallel.MeshPlan(cfg.mesh, jax.devices()[:1])
  assert str(error.value) == message
  with pytest.raises(ConfigError) as error:   # the batch is blamed only where the mesh fits and the batch does not
    parallel.check_batch_size(cfg.data.batch_size, 3, 1)
  assert str(error.value) == ("config field 'data.batch_size' = 4 is not allowed: a multiple of 3, the devices the "
                              "batch is split over (mesh.data x mesh.fsdp = 3 x 1); or change the mesh")


@pytest.mark.parametrize("path", ["/no/such/dir", "./x", "~/no/such/dir", "runs/a/student_hf"])
def test_a_missing_local_model_path_is_not_a_hub_id(path):
  """Before: 'runs/a/student_hf' (and '~/x' that existed) went to the hub: 'could not get ... from the hub'."""
  from jaxdistill.paths import looks_like_local_path
  from jaxdistill.training import build
  cfg = _smoke(**{"teacher.name_or_path": path, "stages.teacher_steps": 0})
  with pytest.raises(ModelLoadError) as error:
    build.build_model(cfg.teacher, 257, jax.random.key(0), "teacher")
  assert str(error.value) == (f"teacher.name_or_path: directory '{path}' does not exist (a local path: hub ids are "
                              f"'name' or 'owner/name')")
  assert looks_like_local_path(path)
  assert not any(map(looks_like_local_path, ["gpt2", "HuggingFaceTB/SmolLM-135M", "checkpoints/qwen3-moe-1b"]))


@pytest.mark.parametrize("overrides, message", [
    ({"optim.warmup_steps": 13}, "config field 'optim.warmup_steps' = 13 is not allowed: an integer <= 12, the run's "
                                 "optimizer steps (train.max_steps): a longer warmup never reaches the peak learning "
                                 "rate"),
    ({"optim.warmup_steps": 9}, "config field 'optim.warmup_steps' = 9 is not allowed: an integer <= 8, the teacher "
                                "stage's optimizer steps (stages.teacher_steps): a longer warmup never reaches the "
                                "peak learning rate"),
])
def test_a_warmup_longer_than_the_run_is_refused(overrides, message):
  """Before: accepted; the learning rate never reached its peak."""
  with pytest.raises(ConfigError) as error:
    _smoke(**overrides)
  assert str(error.value) == message
  assert _smoke(**{"optim.warmup_steps": 8}).optim.warmup_steps == 8   # equal to the teacher stage's steps is fine


def test_check_warmup_against_the_steps_the_data_gives():
  from jaxdistill.training.optim import OptimConfig, check_warmup
  check_warmup(OptimConfig(warmup_steps=50), 50)
  with pytest.raises(ConfigError) as error:
    check_warmup(OptimConfig(warmup_steps=100), 37)
  assert str(error.value) == ("config field 'optim.warmup_steps' = 100 is not allowed: an integer <= 37, the run's "
                              "optimizer steps: a longer warmup never reaches the peak learning rate")


@pytest.mark.parametrize("config, overrides, message", [
    ("configs/cpu_demo.py:smoke", {"student.arch.max_position_embeddings": 31},
     "config field 'student.arch.max_position_embeddings' = 31 is not allowed: an integer >= data.seq_len=32, the "
     "tokens the student reads per sequence (or lower data.seq_len)"),
    ("configs/cpu_demo.py:smoke", {"teacher.arch.family": "gpt2", "teacher.arch.num_kv_heads": 4,
                                   "teacher.arch.max_position_embeddings": 16},
     "config field 'teacher.arch.max_position_embeddings' = 16 is not allowed: an integer >= data.seq_len=32, the "
     "tokens the teacher reads per sequence (or lower data.seq_len)"),
    ("configs/cpu_demo.py:cross_smoke", {"teacher.arch.max_position_embeddings": 39},
     "config field 'teacher.arch.max_position_embeddings' = 39 is not allowed: an integer >= data.teacher_seq_len=40, "
     "the tokens the teacher reads per sequence (or lower data.teacher_seq_len)"),
])
def test_fewer_positions_than_tokens_are_refused(config, overrides, message):
  """Before: accepted; GPT-2's learned positions past their table gave NaN losses."""
  with pytest.raises(ConfigError) as error:
    config_lib.parse(config_lib.load(config, overrides))
  assert str(error.value) == message
  # Plain LM training has no teacher: its positions do not matter.
  lm = {"mode": "lm", "stages.teacher_steps": 0, "stages.scratch_baseline": False}
  assert config_lib.parse(config_lib.load("configs/cpu_demo.py:smoke", {
      "teacher.arch.max_position_embeddings": 16, **lm})).mode == "lm"


def test_check_positions_of_a_checkpoint():
  from jaxdistill.training import build
  student, _ = _models(_smoke())
  short = dataclasses.replace(student, max_position_embeddings=16)
  build.check_positions(short, 16, "data.seq_len", "the student checkpoint")
  with pytest.raises(ConfigError) as error:
    build.check_positions(short, 32, "data.seq_len", "the student checkpoint")
  assert str(error.value) == ("config field 'data.seq_len' = 32 is not allowed: an integer <= 16, the "
                              "max_position_embeddings of the student checkpoint (llama)")


def test_a_random_mistral_has_a_sliding_window_and_other_families_refuse_one():
  cfg = config_lib.parse(config_lib.load("configs/cpu_demo.py:smoke", {
      "student.arch.family": "mistral", "student.arch.sliding_window": 8}))
  model = cfg.student.model_config(257)
  assert (model.family, model.sliding_window, model.rope.theta) == ("mistral", 8, 10000.0)
  assert models.to_hf_config(model)["sliding_window"] == 8
  assert models.from_hf_config(models.to_hf_config(model)).sliding_window == 8
  with pytest.raises(ConfigError, match=r"'student.arch.sliding_window' = 8 is not allowed: 0 for family llama "
                                        r"\(sliding windows: .*mistral, mixtral, phi3\)"):
    config_lib.parse(config_lib.load("configs/cpu_demo.py:smoke", {"student.arch.sliding_window": 8}))
