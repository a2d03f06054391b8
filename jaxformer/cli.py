"""Checks shared by the Hydra entry points, run before Hydra starts a job.

Hydra reports a bad override with a multi-line message and a stack-trace hint, and creates the
run dir before the app runs. `preflight` composes the config once itself (sweeps reduced to their
first value) and turns any problem into one `error: ...` line and exit code 2.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Callable

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, MissingMandatoryValue, OmegaConf

from jaxformer.config import ConfigError

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"
MULTIRUN_FLAGS = ("-m", "--multirun")


def _one_line(err: Exception) -> str:
    head = str(err).strip().splitlines()[0].rstrip(".")
    if isinstance(err, MissingConfigException) and "Available options in" in str(err):
        lines = str(err).split("Available options in", 1)[1].splitlines()[1:]
        options = []
        for line in lines:
            if not line.startswith("\t"):
                break
            if not line.strip().endswith("_schema"):
                options.append(line.strip())
        return f"{head} (options: {', '.join(options)})"
    cause = err.__cause__
    if cause is not None and str(cause).strip():
        return f"{head}: {str(cause).strip().splitlines()[0]}"
    return head


def _check_output_dir(key: str, value: str) -> None:
    path = Path(value.split("${")[0] or ".").absolute()
    while not path.exists():
        path = path.parent
    if not path.is_dir() or not os.access(path, os.W_OK):
        sys.exit(f"error: {key}={value} is not writable ({path} is not a writable directory): "
                 "choose another directory")


def preflight(argv: list[str], config_name: str, validate: Callable[[DictConfig], object]) -> None:
    """Exit with one clear line if the command line cannot make a valid config."""
    if any(arg.startswith("-") and arg not in MULTIRUN_FLAGS for arg in argv):
        return  # --help, --cfg, -cn ...: Hydra's own business
    try:
        parsed = OverridesParser.create().parse_overrides(
            [arg for arg in argv if arg not in MULTIRUN_FLAGS]
        )
    except Exception as err:  # malformed override syntax
        print(f"error: cannot parse the overrides {' '.join(argv)}: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)
    overrides = []
    for override in parsed:
        key = override.get_key_element()
        if override.key_or_group in ("hydra.run.dir", "hydra.sweep.dir"):
            _check_output_dir(override.key_or_group, override.value())
        if override.key_or_group.startswith("hydra"):
            continue
        if override.is_sweep_override():
            overrides.append(f"{key}={next(override.sweep_string_iterator())}")
        else:
            overrides.append(override.input_line)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            validate(compose(config_name=config_name, overrides=overrides))
    except Exception as err:
        print(f"error: {_one_line(err)}", file=sys.stderr)
        sys.exit(2)


def process_id_hint(argv: list[str]) -> int:
    """This process's index in a multi-process job, as far as it is known before JAX starts:
    a `mesh.process_id=` override, else SLURM's task id, else 0."""
    for arg in argv:
        if arg.startswith("mesh.process_id="):
            value = arg.split("=", 1)[1]
            return int(value) if value.isdigit() else 0
    if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        return int(os.environ.get("SLURM_PROCID", "0"))
    return 0


def per_process_overrides(argv: list[str]) -> list[str]:
    """Every process of a multi-host job runs the same command on a shared run dir: only
    process 0 writes Hydra's .hydra/ and train.log there; the others log to stdout."""
    if process_id_hint(argv) == 0:
        return argv
    return [*argv, "hydra.output_subdir=null", "hydra/job_logging=stdout"]


def typed_config(cfg: DictConfig, usage: str):
    """The dataclass a composed config stands for, built (and so validated); a missing required
    key names the command's usage, other problems their first line."""
    try:
        return OmegaConf.to_object(cfg)
    except ConfigError:
        raise
    except MissingMandatoryValue as err:
        raise ConfigError(f"{err.full_key} is required: {usage}") from None
    except Exception as err:  # OmegaConf type errors
        raise ConfigError(str(err).splitlines()[0]) from None
