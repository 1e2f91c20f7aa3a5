"""Architecture description of a causal LM, read from and written to Hugging Face `config.json`.

`ModelConfig` is the one typed, frozen (hashable, so usable as a static jit argument) description
the Flax model code sees. How each family's `config.json` maps to it lives in `models/families/`;
`from_hf_config` and `to_hf_config` dispatch on `model_type`. The helpers here (rope, activation,
required keys) are the parts of that mapping several families share.
"""

import dataclasses
from typing import Any

from jaxdistill.errors import ConfigError, ModelLoadError

DTYPES = ("float32", "bfloat16", "float16")
# What the backward pass keeps of each block (`jax.checkpoint` policies); the rest is recomputed.
#   none: everything (no recomputation); full: only the block's input (recompute the whole block);
#   dots: every matmul output (recompute norms, activations, softmax);
#   dots_no_batch: matmuls with the weights only (recompute attention scores and probabilities, the
#     B*H*L*L part, and the elementwise work).
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch")
# How attention is computed (models/attention.py): auto (cuDNN flash attention where the GPU has it, else
# blockwise), cudnn, blockwise (query blocks under remat: no B*H*L*L kept), xla (materialised, for comparison).
ATTENTION_IMPLEMENTATIONS = ("auto", "cudnn", "blockwise", "xla")
# The params hold each kind of block stacked on a leading layer axis: dense blocks under `blocks`, blocks
# with routed experts under `moe_blocks` (in layer order within each stack).
STACKS = ("blocks", "moe_blocks")


def is_stacked(path_names) -> bool:
  """Whether a params (or optimizer-state) path runs through a stack: its leaf has a leading layer axis."""
  return bool(set(path_names) & set(STACKS))


# Fields that change how a model runs, not what it computes (nor its weights).
RUNTIME_FIELDS = ("remat", "attention", "attention_block", "scan_layers")
ROPE_TYPES = ("default", "linear", "llama3")
ACTIVATIONS = ("silu", "gelu", "gelu_new", "gelu_pytorch_tanh", "relu")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
  """Rotary position embedding; `rope_type` follows transformers' `rope_type` names."""
  theta: float = 10000.0
  rope_type: str = "default"
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Everything the forward pass needs to know about an architecture."""
  family: str                     # transformers' model_type: a module of models/families/
  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int
  head_dim: int
  intermediate_size: int
  max_position_embeddings: int
  norm: str = "rms"               # 'rms' (Llama, Qwen) or 'layer' (GPT-2)
  norm_eps: float = 1e-6
  activation: str = "silu"
  gated_mlp: bool = True          # SwiGLU-style gate/up/down (Llama, Qwen) vs fc/proj (GPT-2)
  rope: RopeConfig | None = RopeConfig()  # None: learned absolute positions (GPT-2)
  qkv_bias: bool = False
  o_bias: bool = False
  mlp_bias: bool = False
  qk_norm: bool = False           # RMSNorm over head_dim on queries and keys (Qwen3)
  sliding_window: int = 0         # > 0: each query sees itself and the sliding_window - 1 keys before it
                                  # (Mistral, Mixtral: transformers' `sliding_window`); 0: full causal attention
  full_attention_layers: tuple[int, ...] = ()  # blocks that ignore `sliding_window` (transformers' layer_types
                                  # 'full_attention'): local and global layers interleaved in one stack
  local_rope: RopeConfig | None = None  # RoPE of the windowed blocks when it differs from `rope` (a local base);
                                  # None: `rope` everywhere
  attn_logit_softcap: float = 0.0  # > 0: attention scores become cap * tanh(scores / cap) before the mask
  final_logit_softcap: float = 0.0  # > 0: the LM head's logits become cap * tanh(logits / cap)
  query_pre_attn_scalar: int = 0  # > 0: scores are scaled by its ** -0.5 instead of head_dim ** -0.5
  norm_unit_offset: bool = False  # RMSNorm scales by (1 + weight) (weight initialised at 0), in float32 before the
                                  # cast back; every norm of the model, q/k norms included
  post_norms: bool = False        # each sublayer's output is normed before its residual add (4 norms per block)
  scale_embeddings: bool = False  # token embeddings times sqrt(hidden_size), that factor in the compute dtype
  tie_word_embeddings: bool = False
  scale_attn_by_inverse_layer_idx: bool = False  # GPT-2 option
  # Mixture of experts (transformers' Qwen3MoeConfig semantics); num_experts=0 is a dense model.
  num_experts: int = 0            # routed experts per sparse layer
  num_experts_per_tok: int = 0    # top-k experts mixed per token
  moe_intermediate_size: int = 0  # hidden width of each expert's SwiGLU
  norm_topk_prob: bool = False    # renormalise the top-k router probabilities to sum to 1 (always for Mixtral)
  decoder_sparse_step: int = 1    # layer i is sparse when (i + 1) % step == 0 ...
  mlp_only_layers: tuple[int, ...] = ()  # ... and i is not listed here
  param_dtype: str = "float32"    # storage dtype of the parameters
  dtype: str = "float32"          # compute dtype of activations and matmuls
  remat: str = "none"             # REMAT_POLICIES: what a block keeps for the backward pass (training only)
  attention: str = "auto"         # ATTENTION_IMPLEMENTATIONS
  attention_block: int = 512      # query rows per block: blockwise attention and the attention losses
  scan_layers: bool = True        # run each stack of identical blocks as one lax.scan (False: unrolled)

  def __post_init__(self):
    """Rejects settings transformers would mis-handle or silently ignore, or no kernel runs.

    ConfigError names the field, its value and what is allowed: `from_hf_config` turns it into a ModelLoadError
    naming the file, `families.from_arch` prefixes the config group (`student.arch.`).
    """
    if self.remat not in REMAT_POLICIES:
      raise ConfigError("remat", self.remat, f"one of {', '.join(REMAT_POLICIES)}")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ConfigError("attention", self.attention, f"one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if self.attention_block < 1:
      raise ConfigError("attention_block", self.attention_block, "an integer >= 1 (query rows per block)")
    if self.attention == "cudnn" and self.attn_logit_softcap:
      raise ConfigError("attention", self.attention, f"auto or blockwise with attn_logit_softcap="
                        f"{self.attn_logit_softcap} (cudnn cannot soft-cap attention scores)")
    outside = [i for i in self.full_attention_layers if not 0 <= i < self.num_layers]
    if outside:
      raise ConfigError("full_attention_layers", self.full_attention_layers,
                        f"layer indices in 0..{self.num_layers - 1} ({outside} are outside)")
    if not self.num_experts:
      return
    if not 1 <= self.num_experts_per_tok <= self.num_experts:
      raise ConfigError("num_experts_per_tok", self.num_experts_per_tok,
                        f"an integer in 1..num_experts={self.num_experts}")
    for name in ("moe_intermediate_size", "decoder_sparse_step"):
      if getattr(self, name) < 1:
        raise ConfigError(name, getattr(self, name), "an integer >= 1")
    outside = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
    if outside:
      raise ConfigError("mlp_only_layers", self.mlp_only_layers, f"layer indices in 0..{self.num_layers - 1} "
                        f"(num_layers={self.num_layers}; {outside} are outside)")

  def window_of(self, layer: int) -> int:
    """The sliding window of block `layer` (0: full causal attention)."""
    return 0 if layer in self.full_attention_layers else self.sliding_window

  @property
  def attention_scale(self) -> float:
    """What the attention scores q.k are multiplied by."""
    return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

  def is_sparse_layer(self, layer: int) -> bool:
    """Whether block `layer` has routed experts instead of a dense MLP (transformers' rule)."""
    return (self.num_experts > 0 and layer not in self.mlp_only_layers
            and (layer + 1) % self.decoder_sparse_step == 0)

  @property
  def sparse_layers(self) -> tuple[int, ...]:
    return tuple(i for i in range(self.num_layers) if self.is_sparse_layer(i))

  def stack_of(self, layer: int) -> tuple[str, int]:
    """(the stack in STACKS holding block `layer`, its index along that stack's layer axis)."""
    sparse = self.is_sparse_layer(layer)
    return STACKS[sparse], sum(self.is_sparse_layer(i) == sparse for i in range(layer))

  @property
  def stacks(self) -> dict[str, tuple[int, ...]]:
    """The non-empty stacks and the layers each holds, in order."""
    layers = {name: tuple(i for i in range(self.num_layers) if self.stack_of(i)[0] == name) for name in STACKS}
    return {name: held for name, held in layers.items() if held}

  def architecture(self) -> "ModelConfig":
    """This config with the RUNTIME_FIELDS at their defaults: what identifies the model's function."""
    defaults = ModelConfig.__dataclass_fields__
    return dataclasses.replace(self, **{f: defaults[f].default for f in RUNTIME_FIELDS})

  def with_dtypes(self, param_dtype: str, dtype: str) -> "ModelConfig":
    for name, value in (("param_dtype", param_dtype), ("dtype", dtype)):
      if value not in DTYPES:
        raise ModelLoadError(f"{name} {value!r} is not one of {', '.join(DTYPES)}")
    return dataclasses.replace(self, param_dtype=param_dtype, dtype=dtype)


def require_hf(hf: dict[str, Any], key: str, where: str):
  """`hf[key]`; ModelLoadError naming the file and the key where it is missing."""
  if key not in hf or hf[key] is None:
    raise ModelLoadError(f"{where}: config.json has no '{key}', which the {hf.get('model_type')} family needs")
  return hf[key]


def rope_from_hf(hf: dict[str, Any], where: str, default_theta: float = 10000.0) -> RopeConfig:
  # transformers >= 5 writes `rope_parameters` (theta inside); older files use `rope_theta` + `rope_scaling`.
  params = dict(hf.get("rope_parameters") or {})
  scaling = dict(hf.get("rope_scaling") or {})
  params = {**scaling, **params}
  theta = float(params.get("rope_theta", hf.get("rope_theta") or default_theta))
  rope_type = params.get("rope_type", params.get("type", "default"))
  if rope_type not in ROPE_TYPES:
    raise ModelLoadError(f"{where}: rope_type {rope_type!r} is not supported; supported: {', '.join(ROPE_TYPES)}")
  if rope_type == "default":
    return RopeConfig(theta=theta)
  factor = float(require_hf(params, "factor", where + " rope_scaling"))
  if rope_type == "linear":
    return RopeConfig(theta=theta, rope_type="linear", factor=factor)
  return RopeConfig(
      theta=theta, rope_type="llama3", factor=factor,
      low_freq_factor=float(params.get("low_freq_factor", 1.0)),
      high_freq_factor=float(params.get("high_freq_factor", 4.0)),
      original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)))


def rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
  scaling = None
  if rope.rope_type == "linear":
    scaling = {"rope_type": "linear", "factor": rope.factor}
  elif rope.rope_type == "llama3":
    scaling = {"rope_type": "llama3", "factor": rope.factor, "low_freq_factor": rope.low_freq_factor,
               "high_freq_factor": rope.high_freq_factor,
               "original_max_position_embeddings": rope.original_max_position_embeddings}
  return {"rope_theta": rope.theta, "rope_scaling": scaling}


def check_activation(act: str, where: str) -> str:
  if act not in ACTIVATIONS:
    raise ModelLoadError(f"{where}: activation {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
  return act


def from_hf_config(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
  """Reads a transformers `config.json` dict; raises ModelLoadError naming what is wrong."""
  from jaxdistill.models import families  # here: each family module builds on this one
  try:
    return families.get(hf.get("model_type"), where).from_hf(hf, where)
  except ConfigError as e:  # ModelConfig's own checks
    raise ModelLoadError(f"{where}: {e.field}={e.value!r} is not allowed: {e.allowed}") from None


def to_hf_config(cfg: ModelConfig, base: dict[str, Any] | None = None,
                 torch_dtype: str = "float32") -> dict[str, Any]:
  """A `config.json` dict for `cfg`; fields of `base` (e.g. token ids) are kept unless `cfg` owns them."""
  from jaxdistill.models import families  # here: each family module builds on this one
  family = families.get(cfg.family, "ModelConfig")
  out = dict(base or {})
  for stale in ("rope_parameters", "transformers_version", "_name_or_path"):
    out.pop(stale, None)
  out.update(family.to_hf(cfg))
  out.update({"model_type": cfg.family, "architectures": [family.architecture], "torch_dtype": torch_dtype})
  out.setdefault("pad_token_id", None)  # not the family's default id (Phi-3's 32000 may lie outside the vocabulary)
  return out
