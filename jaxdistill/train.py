"""Distill a teacher into a student (or, with `mode='lm'`, train a model by plain LM).

    python -m jaxdistill.train --config configs/NAME.py[:smoke] [--config.x.y=v ...] [--workdir DIR] [--resume [PATH]]

A workdir that already has checkpoints resumes from its newest good one; `--resume PATH` resumes
from a given checkpoint (a step directory or a checkpoints directory). Everything else lives in
`stages.run` (teacher training and scratch baseline, when the config asks for them) and
`trainer.train_and_evaluate` (one training run).
"""

from jaxdistill import cli

cli.quiet_environment()

import os  # noqa: E402
import sys  # noqa: E402

from absl import flags  # noqa: E402

from jaxdistill import config as config_lib  # noqa: E402
from jaxdistill.errors import ConfigError  # noqa: E402

_CONFIG = config_lib.define_config_flag()
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory; default runs/<config file name>.")
_RESUME = flags.DEFINE_string("resume", None, "Checkpoint to resume from; bare --resume: the workdir's newest good "
                                              "checkpoint (the default whenever the workdir has checkpoints).")
LATEST = "latest"


def _with_bare_resume(argv: list[str]) -> list[str]:
  """absl string flags need a value: a bare `--resume` becomes `--resume=latest`."""
  out = []
  for i, arg in enumerate(argv):
    bare = arg == "--resume" and (i + 1 == len(argv) or argv[i + 1].startswith("-"))
    out.append(f"--resume={LATEST}" if bare else arg)
  return out


def _writable_workdir(path: str) -> str:
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, ".write_test")
    with open(probe, "w"):
      pass
    os.remove(probe)
  except OSError as e:
    raise ConfigError("--workdir", path, f"a writable directory ({e.strerror})") from None
  return path


def main(argv) -> None:
  del argv
  cfg = config_lib.parse(config_lib.loaded_config(_CONFIG))
  config_name = os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename.split(":")[0]))[0]
  workdir = _writable_workdir(_WORKDIR.value or os.path.join("runs", config_name))
  resume = None if _RESUME.value in (None, LATEST) else _RESUME.value
  if _RESUME.value == LATEST and not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise ConfigError("--resume", LATEST, f"a run with checkpoints: {workdir} has none")
  from jaxdistill import parallel  # after flag parsing: keeps --help and config errors fast
  from jaxdistill.training import stages

  parallel.initialize(cfg.mesh)  # a multi-host run joins its cluster before any device is touched
  stages.run(cfg, workdir, resume)


def console_main() -> None:
  """`jaxdistill-train`, the console script pip installs: the same as `python -m jaxdistill.train`."""
  sys.argv = _with_bare_resume(sys.argv)
  cli.run(main)


if __name__ == "__main__":
  console_main()
