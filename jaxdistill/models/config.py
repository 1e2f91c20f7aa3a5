"""Architecture description of a causal LM, read from and written to Hugging Face `config.json`.

`ModelConfig` is the one typed, frozen (hashable, so usable as a static jit argument) description
the Flax model code sees. Each supported family has a reader (`config.json` dict -> ModelConfig)
and a writer (ModelConfig -> `config.json` dict that `transformers` loads). The mixture-of-experts
families (Qwen3-MoE, Mixtral) are the Llama-like block with some MLPs replaced by routed experts.
"""

import dataclasses
from typing import Any

from jaxdistill.errors import ModelLoadError

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
MOE_FAMILIES = ("qwen3_moe", "mixtral")  # families whose blocks may route tokens to experts
WINDOWED_FAMILIES = ("mistral", "mixtral", "phi3")  # transformers' `sliding_window` on every layer


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
  family: str                     # one of SUPPORTED_FAMILIES
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
    """Rejects MoE settings transformers would mis-handle or silently ignore (ValueError)."""
    if self.remat not in REMAT_POLICIES:
      raise ValueError(f"remat {self.remat!r} is not one of {', '.join(REMAT_POLICIES)}")
    if self.attention not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"attention {self.attention!r} is not one of {', '.join(ATTENTION_IMPLEMENTATIONS)}")
    if self.attention_block < 1:
      raise ValueError(f"attention_block {self.attention_block} must be a positive number of query rows")
    if not self.num_experts:
      return
    if not 1 <= self.num_experts_per_tok <= self.num_experts:
      raise ValueError(f"num_experts_per_tok={self.num_experts_per_tok} must be in 1..num_experts "
                       f"({self.num_experts})")
    for name in ("moe_intermediate_size", "decoder_sparse_step"):
      if getattr(self, name) < 1:
        raise ValueError(f"{name} ({getattr(self, name)}) must be positive")
    outside = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
    if outside:
      raise ValueError(f"mlp_only_layers {outside} are outside 0..{self.num_layers - 1} "
                       f"(num_hidden_layers={self.num_layers})")
    if self.family == "mixtral" and (not self.norm_topk_prob or len(self.sparse_layers) != self.num_layers):
      raise ValueError("mixtral routes every layer and always renormalises its top-k weights")

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


def _require(hf: dict[str, Any], key: str, where: str):
  if key not in hf or hf[key] is None:
    raise ModelLoadError(f"{where}: config.json has no '{key}', which the {hf.get('model_type')} family needs")
  return hf[key]


def _rope_from_hf(hf: dict[str, Any], where: str, default_theta: float = 10000.0) -> RopeConfig:
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
  factor = float(_require(params, "factor", where + " rope_scaling"))
  if rope_type == "linear":
    return RopeConfig(theta=theta, rope_type="linear", factor=factor)
  return RopeConfig(
      theta=theta, rope_type="llama3", factor=factor,
      low_freq_factor=float(params.get("low_freq_factor", 1.0)),
      high_freq_factor=float(params.get("high_freq_factor", 4.0)),
      original_max_position_embeddings=int(params.get("original_max_position_embeddings", 8192)))


def _rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
  scaling = None
  if rope.rope_type == "linear":
    scaling = {"rope_type": "linear", "factor": rope.factor}
  elif rope.rope_type == "llama3":
    scaling = {"rope_type": "llama3", "factor": rope.factor, "low_freq_factor": rope.low_freq_factor,
               "high_freq_factor": rope.high_freq_factor,
               "original_max_position_embeddings": rope.original_max_position_embeddings}
  return {"rope_theta": rope.theta, "rope_scaling": scaling}


def _check_activation(act: str, where: str) -> str:
  if act not in ACTIVATIONS:
    raise ModelLoadError(f"{where}: activation {act!r} is not supported; supported: {', '.join(ACTIVATIONS)}")
  return act


def _llama_like_from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
  family = hf["model_type"]
  if hf.get("use_sliding_window"):  # Qwen's per-layer windows (max_window_layers)
    raise ModelLoadError(f"{where}: use_sliding_window=true is not supported; only full attention is")
  window = hf.get("sliding_window") if family in WINDOWED_FAMILIES else None  # Qwen's is off unless used
  if float(hf.get("partial_rotary_factor") or 1.0) != 1.0:
    raise ModelLoadError(f"{where}: partial_rotary_factor={hf['partial_rotary_factor']} is not supported; only "
                         "rotary embeddings over the whole head are")
  hidden = int(_require(hf, "hidden_size", where))
  heads = int(_require(hf, "num_attention_heads", where))
  head_dim = hf.get("head_dim") or hidden // heads
  attention_bias = bool(hf.get("attention_bias", False)) and family != "mixtral"
  fields = dict(
      family=family,
      vocab_size=int(_require(hf, "vocab_size", where)),
      hidden_size=hidden,
      num_layers=int(_require(hf, "num_hidden_layers", where)),
      num_heads=heads,
      num_kv_heads=int(hf.get("num_key_value_heads") or heads),
      head_dim=int(head_dim),
      intermediate_size=int(_require(hf, "intermediate_size", where)),
      max_position_embeddings=int(hf.get("max_position_embeddings", 2048)),
      norm="rms",
      norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      activation=_check_activation(hf.get("hidden_act", "silu"), where),
      gated_mlp=True,
      rope=_rope_from_hf(hf, where, default_theta=1e6 if family == "mixtral" else 10000.0),
      # Qwen2 always has q/k/v biases and no o bias; Llama and Qwen3 put `attention_bias` on all four.
      qkv_bias=True if family == "qwen2" else attention_bias,
      o_bias=False if family == "qwen2" else attention_bias,
      mlp_bias=bool(hf.get("mlp_bias", False)),
      qk_norm=family in ("qwen3", "qwen3_moe"),
      sliding_window=int(window or 0),
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
      **(_moe_from_hf(hf, where) if family in MOE_FAMILIES else {}),
  )
  try:
    return ModelConfig(**fields)
  except ValueError as e:  # __post_init__'s consistency checks
    raise ModelLoadError(f"{where}: {e}") from None


def _moe_from_hf(hf: dict[str, Any], where: str) -> dict[str, Any]:
  """The MoE fields of a Qwen3-MoE or Mixtral `config.json`."""
  # Hub files say `num_experts` (Qwen3-MoE) or `num_local_experts` (Mixtral); transformers 5 writes the
  # latter for both.
  counts = {k: int(hf[k]) for k in ("num_experts", "num_local_experts") if hf.get(k) is not None}
  if not counts:
    raise ModelLoadError(f"{where}: config.json has no 'num_experts', which the {hf['model_type']} family needs")
  if len(set(counts.values())) > 1:
    raise ModelLoadError(f"{where}: num_experts and num_local_experts disagree ({counts})")
  moe = dict(num_experts=next(iter(counts.values())),
             num_experts_per_tok=int(_require(hf, "num_experts_per_tok", where)))
  if hf["model_type"] == "mixtral":  # every layer sparse, experts as wide as `intermediate_size`, renormalised
    return dict(moe, moe_intermediate_size=int(_require(hf, "intermediate_size", where)), norm_topk_prob=True)
  return dict(moe, moe_intermediate_size=int(_require(hf, "moe_intermediate_size", where)),
              norm_topk_prob=bool(hf.get("norm_topk_prob", False)),
              decoder_sparse_step=int(1 if hf.get("decoder_sparse_step") is None else hf["decoder_sparse_step"]),
              mlp_only_layers=tuple(int(i) for i in hf.get("mlp_only_layers") or ()))


def _moe_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  if cfg.family == "mixtral":
    return {"num_local_experts": cfg.num_experts, "num_experts_per_tok": cfg.num_experts_per_tok,
            "intermediate_size": cfg.moe_intermediate_size}
  return {"num_experts": cfg.num_experts, "num_local_experts": cfg.num_experts,
          "num_experts_per_tok": cfg.num_experts_per_tok, "moe_intermediate_size": cfg.moe_intermediate_size,
          "norm_topk_prob": cfg.norm_topk_prob, "decoder_sparse_step": cfg.decoder_sparse_step,
          "mlp_only_layers": list(cfg.mlp_only_layers)}


def _llama_like_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  out = {
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size,
      "intermediate_size": cfg.intermediate_size, "num_hidden_layers": cfg.num_layers,
      "num_attention_heads": cfg.num_heads, "num_key_value_heads": cfg.num_kv_heads,
      "head_dim": cfg.head_dim, "hidden_act": cfg.activation,
      "max_position_embeddings": cfg.max_position_embeddings, "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_word_embeddings, **_rope_to_hf(cfg.rope),
  }
  if cfg.family == "qwen2":
    out["use_sliding_window"] = False
  elif cfg.family not in WINDOWED_FAMILIES:
    out["attention_bias"] = cfg.qkv_bias
  if cfg.family in WINDOWED_FAMILIES:
    out["sliding_window"] = cfg.sliding_window or None
  if cfg.family in ("qwen3", "qwen3_moe"):
    out["use_sliding_window"] = False
  if cfg.family == "llama":
    out["mlp_bias"] = cfg.mlp_bias
  if cfg.family in MOE_FAMILIES:
    out.update(_moe_to_hf(cfg))
  return out


def _gpt2_from_hf(hf: dict[str, Any], where: str) -> ModelConfig:
  if hf.get("reorder_and_upcast_attn"):
    raise ModelLoadError(f"{where}: reorder_and_upcast_attn=true is not supported")
  if not hf.get("scale_attn_weights", True):
    raise ModelLoadError(f"{where}: scale_attn_weights=false is not supported")
  hidden = int(_require(hf, "n_embd", where))
  heads = int(_require(hf, "n_head", where))
  return ModelConfig(
      family="gpt2",
      vocab_size=int(_require(hf, "vocab_size", where)),
      hidden_size=hidden,
      num_layers=int(_require(hf, "n_layer", where)),
      num_heads=heads, num_kv_heads=heads, head_dim=hidden // heads,
      intermediate_size=int(hf.get("n_inner") or 4 * hidden),
      max_position_embeddings=int(_require(hf, "n_positions", where)),
      norm="layer",
      norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
      activation=_check_activation(hf.get("activation_function", "gelu_new"), where),
      gated_mlp=False, rope=None, qkv_bias=True, o_bias=True, mlp_bias=True,
      tie_word_embeddings=bool(hf.get("tie_word_embeddings", True)),
      scale_attn_by_inverse_layer_idx=bool(hf.get("scale_attn_by_inverse_layer_idx", False)),
  )


def _gpt2_to_hf(cfg: ModelConfig) -> dict[str, Any]:
  return {
      "vocab_size": cfg.vocab_size, "n_embd": cfg.hidden_size, "n_layer": cfg.num_layers,
      "n_head": cfg.num_heads, "n_inner": cfg.intermediate_size,
      "n_positions": cfg.max_position_embeddings, "layer_norm_epsilon": cfg.norm_eps,
      "activation_function": cfg.activation, "scale_attn_weights": True,
      "scale_attn_by_inverse_layer_idx": cfg.scale_attn_by_inverse_layer_idx,
      "reorder_and_upcast_attn": False, "tie_word_embeddings": cfg.tie_word_embeddings,
      "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
  }


# model_type -> (reader, writer, transformers architecture class name)
_FAMILIES = {
    "llama": (_llama_like_from_hf, _llama_like_to_hf, "LlamaForCausalLM"),
    "qwen2": (_llama_like_from_hf, _llama_like_to_hf, "Qwen2ForCausalLM"),
    "qwen3": (_llama_like_from_hf, _llama_like_to_hf, "Qwen3ForCausalLM"),
    "gpt2": (_gpt2_from_hf, _gpt2_to_hf, "GPT2LMHeadModel"),
    "qwen3_moe": (_llama_like_from_hf, _llama_like_to_hf, "Qwen3MoeForCausalLM"),
    "mixtral": (_llama_like_from_hf, _llama_like_to_hf, "MixtralForCausalLM"),
    "mistral": (_llama_like_from_hf, _llama_like_to_hf, "MistralForCausalLM"),
    "phi3": (_llama_like_from_hf, _llama_like_to_hf, "Phi3ForCausalLM"),
}
SUPPORTED_FAMILIES = tuple(_FAMILIES)


def check_family(model_type, where: str) -> None:
  if model_type not in _FAMILIES:
    raise ModelLoadError(
        f"{where}: model_type {model_type!r} is not supported; supported families: "
        f"{', '.join(SUPPORTED_FAMILIES)}")


def from_hf_config(hf: dict[str, Any], where: str = "config.json") -> ModelConfig:
  """Reads a transformers `config.json` dict; raises ModelLoadError naming what is wrong."""
  check_family(hf.get("model_type"), where)
  return _FAMILIES[hf["model_type"]][0](hf, where)


def to_hf_config(cfg: ModelConfig, base: dict[str, Any] | None = None,
                 torch_dtype: str = "float32") -> dict[str, Any]:
  """A `config.json` dict for `cfg`; fields of `base` (e.g. token ids) are kept unless `cfg` owns them."""
  _, writer, architecture = _FAMILIES[cfg.family]
  out = dict(base or {})
  for stale in ("rope_parameters", "transformers_version", "_name_or_path"):
    out.pop(stale, None)
  out.update(writer(cfg))
  out.update({"model_type": cfg.family, "architectures": [architecture], "torch_dtype": torch_dtype})
  out.setdefault("pad_token_id", None)  # not the family's default id (Phi-3's 32000 may lie outside the vocabulary)
  return out
