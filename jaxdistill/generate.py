"""Print completions of a trained student (or any supported checkpoint) for a few prompts.

    python -m jaxdistill.generate --model runs/cpu_demo --prompt "def " [--prompt TEXT ...] \
        [--max_new_tokens 64] [--temperature 0.0] [--top_p 1.0] [--top_k 0] [--num_samples 1] [--seed 0]

`--model` is a checkpoint directory, a hub id, or a run workdir (its exported `student_hf/` is
used); the tokenizer comes from the same directory. Greedy by default. Generation prefills a KV cache
and decodes one token per step (`sampling.generate`): meant for looking at samples of small models, not
for serving.
"""

from jaxdistill import cli

cli.quiet_environment()

import dataclasses  # noqa: E402
import os  # noqa: E402

from absl import flags  # noqa: E402

from jaxdistill.errors import CommandLineError, ConfigError, ModelLoadError  # noqa: E402
from jaxdistill.models.config import DTYPES  # noqa: E402


def _define_flags() -> None:
  """Command-line flags, defined only when run as a program (importing must not claim global flag names)."""
  flags.DEFINE_string("model", None, "Checkpoint dir or hub id, or a run workdir with student_hf/.")
  flags.DEFINE_multi_string("prompt", [], "Prompt text; repeat the flag for several prompts.")
  flags.DEFINE_integer("max_new_tokens", 64, "Tokens generated per completion.")
  flags.DEFINE_float("temperature", 0.0, "0: greedy; > 0: sample from softmax(logits / T).")
  flags.DEFINE_float("top_p", 1.0, "Nucleus sampling mass in (0, 1]; 1 disables it.")
  flags.DEFINE_integer("top_k", 0, "Sample among the k most probable tokens; 0 disables it.")
  flags.DEFINE_integer("num_samples", 1, "Completions per prompt.")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_string("dtype", "float32", "Parameter and compute dtype: float32 | bfloat16 | float16.")


STUDENT_DIR = "student_hf"


@dataclasses.dataclass(frozen=True)
class SamplingSettings:
  """How completions are drawn; `check` validates every field against its flag."""
  max_new_tokens: int = 64
  temperature: float = 0.0
  top_p: float = 1.0
  top_k: int = 0
  num_samples: int = 1
  seed: int = 0

  def check(self) -> "SamplingSettings":
    if self.max_new_tokens < 1:
      raise ConfigError("--max_new_tokens", self.max_new_tokens, "an integer >= 1")
    if self.temperature < 0:
      raise ConfigError("--temperature", self.temperature, "a value >= 0 (0 is greedy)")
    if not 0 < self.top_p <= 1:
      raise ConfigError("--top_p", self.top_p, "a value in (0, 1]")
    if self.top_k < 0:
      raise ConfigError("--top_k", self.top_k, "an integer >= 0 (0: no limit)")
    if self.num_samples < 1:
      raise ConfigError("--num_samples", self.num_samples, "an integer >= 1")
    return self

  def describe(self) -> str:
    """'greedy' or 'temperature 0.8, top_p 0.9[, top_k 40]' (filters that are off are left out)."""
    if self.temperature == 0:
      return "greedy"
    parts = [f"temperature {self.temperature:g}"]
    if self.top_p < 1:
      parts.append(f"top_p {self.top_p:g}")
    if self.top_k > 0:
      parts.append(f"top_k {self.top_k}")
    return ", ".join(parts)


@dataclasses.dataclass(frozen=True)
class Completion:
  """One sample for one prompt: the decoded prompt followed by its completion."""
  prompt_index: int
  sample_index: int
  text: str
  new_tokens: int

  def header(self, settings: SamplingSettings) -> str:
    return f"--- prompt {self.prompt_index + 1}, sample {self.sample_index + 1} ({settings.describe()}) ---"


def model_dir(name_or_path: str) -> str:
  """A run workdir (a directory with `student_hf/` and no config.json) means its exported student."""
  student = os.path.join(name_or_path, STUDENT_DIR)
  if (os.path.isdir(name_or_path) and not os.path.isfile(os.path.join(name_or_path, "config.json"))
      and os.path.isdir(student)):
    return student
  return name_or_path


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
  """Token ids without special tokens; an empty prompt starts from the bos (or else eos) token."""
  start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
  encoded = []
  for text in prompts:
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if not ids:
      if start is None:
        raise ConfigError("--prompt", text, "a non-empty prompt (the tokenizer has no bos or eos token)")
      ids = [start]
    encoded.append(ids)
  return encoded


def complete(model, tokenizer, prompts: list[str], settings: SamplingSettings) -> list[Completion]:
  """Generates `settings.num_samples` completions of every prompt in one batched call."""
  import jax

  from jaxdistill import sampling

  encoded = encode_prompts(tokenizer, prompts)
  rows = [ids for ids in encoded for _ in range(settings.num_samples)]
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  ids_BxP, mask_BxP = sampling.left_pad(rows, pad_id)
  new_ids_BxN, lengths_B = jax.device_get(sampling.generate(
      model.params, model.config, ids_BxP, mask_BxP, jax.random.key(settings.seed),
      max_new_tokens=settings.max_new_tokens, temperature=settings.temperature, top_p=settings.top_p,
      top_k=settings.top_k, eos_id=tokenizer.eos_token_id))
  completions = []
  for row, (prompt_ids, new_ids, length) in enumerate(zip(rows, new_ids_BxN, lengths_B)):
    text = tokenizer.decode(list(prompt_ids) + new_ids[:length].tolist(), skip_special_tokens=True)
    completions.append(Completion(row // settings.num_samples, row % settings.num_samples, text, int(length)))
  return completions


def main(argv) -> None:
  FLAGS = flags.FLAGS
  if len(argv) > 1:
    raise CommandLineError(f"unexpected arguments {' '.join(argv[1:])!r}; quote a prompt: --prompt 'some text'")
  if not FLAGS.model:
    raise ConfigError("--model", FLAGS.model, "a checkpoint dir, hub id or run workdir")
  if not FLAGS.prompt:
    raise ConfigError("--prompt", None, "at least one --prompt TEXT")
  if FLAGS.dtype not in DTYPES:
    raise ConfigError("--dtype", FLAGS.dtype, f"one of {', '.join(DTYPES)}")
  settings = SamplingSettings(FLAGS.max_new_tokens, FLAGS.temperature, FLAGS.top_p, FLAGS.top_k,
                              FLAGS.num_samples, FLAGS.seed).check()
  path = model_dir(FLAGS.model)
  if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
    raise ModelLoadError(f"{path}: neither a checkpoint (no config.json) nor a run workdir (no {STUDENT_DIR}/)")
  from jaxdistill.data.tokenizer import load_tokenizer
  from jaxdistill.models import load_pretrained  # after validation: keeps flag errors fast

  model = load_pretrained(path, param_dtype=FLAGS.dtype, dtype=FLAGS.dtype)
  tokenizer = load_tokenizer(path)
  for completion in complete(model, tokenizer, FLAGS.prompt, settings):
    print(completion.header(settings))
    print(completion.text, flush=True)


def console_main() -> None:
  """`jaxdistill-generate`, the console script pip installs: the same as `python -m jaxdistill.generate`."""
  _define_flags()
  cli.run(main)


if __name__ == "__main__":
  console_main()
