"""What every Hydra entry point shares: quiet library logs, schema registration, the preflight
check run before Hydra starts a job, and "a user error -> one `error: ...` line, exit code 2".

Hydra reports a bad override with a multi-line message and a stack-trace hint, and creates the
run dir before the app runs. `preflight` composes the config once itself (sweeps reduced to their
first value) and turns any problem into one `error: ...` line and exit code 2. An app is

    @hydra.main(version_base=None, config_path=CONF_PATH, config_name="NAME")
    def main(cfg):
        with user_errors():
            ...

    def launch():  # what `python -m jaxformer.NAME` runs
        run_app(main, "NAME", to_config)
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any, Callable

from hydra import compose, initialize_config_dir
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.errors import MissingConfigException
from omegaconf import DictConfig, OmegaConf, open_dict

from jaxformer.config import register_configs
from jaxformer.errors import UserError

CONF_DIR = Path(__file__).resolve().parent.parent.parent / "conf"
CONF_PATH = str(CONF_DIR)  # hydra.main's config_path: absolute, whatever module runs the app
MULTIRUN_FLAGS = ("-m", "--multirun")
JOB_DIR_MAX = 120  # characters of a sweep job's directory name (file systems allow 255 bytes)
# what Hydra may instantiate from a config: its own launchers and sweepers, jaxformer's, and
# Optuna's samplers (hydra/sweeper=optuna instantiates hydra.sweeper.sampler)
TARGET_PREFIXES = ("hydra.", "hydra_plugins.", "jaxformer.", "optuna.samplers.")
# keys naming a callable Hydra imports, as _target_ does (the Optuna sweeper's search-space hook)
TARGET_KEYS = ("_target_", "custom_search_space")


def job_dir_name(override_dirname: str, job_num: int | str) -> str:
    """A sweep job's directory: its overrides (`model.n_layers=4,seed=1`), readable and unique
    within the sweep; characters a path cannot hold become '_', and a name past JOB_DIR_MAX is
    cut and suffixed with a hash of the whole, so two jobs never share a directory."""
    if not override_dirname:
        return str(job_num)
    name = re.sub(r"[^A-Za-z0-9._=,+\-]", "_", override_dirname)
    if len(name) > JOB_DIR_MAX:
        digest = hashlib.sha1(override_dirname.encode()).hexdigest()[:10]
        name = f"{name[:JOB_DIR_MAX - 11]}-{digest}"
    return name


OmegaConf.register_new_resolver("job_dir", job_dir_name, replace=True)


def check_targets(cfg: DictConfig) -> None:
    """Refuse `_target_`s outside Hydra's and jaxformer's own classes: a config must never make
    Hydra import and call arbitrary code (`hydra.launcher._target_=os.system`)."""
    def walk(node, path: str) -> None:
        if isinstance(node, dict):
            for key in TARGET_KEYS:
                target = node.get(key)
                if target is not None and not str(target).startswith(TARGET_PREFIXES):
                    raise UserError(f"{path}.{key}={target} is not allowed: only classes under "
                                    f"{', '.join(TARGET_PREFIXES)} may be instantiated")
            for key, value in node.items():
                walk(value, f"{path}.{key}" if path else str(key))
        elif isinstance(node, list):
            for index, value in enumerate(node):
                walk(value, f"{path}[{index}]")
    walk(OmegaConf.to_container(cfg, resolve=False), "")


# Hydra plugins the configs name that are optional extras: a missing one names its install
PLUGIN_EXTRAS = {"hydra/sweeper/optuna": "hydra-optuna-sweeper: pip install -e \".[search]\"",
                 "hydra/launcher/submitit_slurm": "hydra-submitit-launcher: pip install -e "
                                                  "\".[slurm]\""}


def _one_line(err: Exception) -> str:
    head = str(err).strip().splitlines()[0].rstrip(".")
    missing = [f"needs {extra}" for name, extra in PLUGIN_EXTRAS.items() if f"'{name}'" in head]
    if isinstance(err, MissingConfigException) and missing:
        return f"{head} ({missing[0]})"
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
    # a UserError says all in its own line; Hydra's errors keep the reason in their cause
    if cause is not None and str(cause).strip() and not isinstance(err, UserError):
        return f"{head}: {str(cause).strip().splitlines()[0]}"
    return head


def _check_output_dir(key: str, value: str) -> None:
    path = Path(value.split("${")[0] or ".").absolute()
    while not path.exists():
        path = path.parent
    if not path.is_dir() or not os.access(path, os.W_OK):
        sys.exit(f"error: {key}={value} is not writable ({path} is not a writable directory): "
                 "choose another directory")


def preflight(argv: list[str], config_name: str, validate: Callable[[DictConfig], object],
              check_sweeper: Callable[[DictConfig, DictConfig], None] | None = None) -> None:
    """Exit with one clear line if the command line cannot make a valid config (`check_sweeper`:
    also the app's config against the composed `hydra.sweeper`, once `validate` passed)."""
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
            continue  # may hold ${now:...}, resolved by Hydra's own run
        if override.is_interval_sweep():  # a search's range (hydra/sweeper=optuna): its start
            overrides.append(f"{key}={override.value().start}")
        elif override.is_sweep_override():
            overrides.append(f"{key}={next(override.sweep_string_iterator())}")
        else:
            overrides.append(override.input_line)
    try:
        with initialize_config_dir(config_dir=str(CONF_DIR), version_base=None):
            cfg = compose(config_name=config_name, overrides=overrides, return_hydra_config=True)
        check_targets(cfg)
        sweeper = cfg.hydra.sweeper
        with open_dict(cfg):
            del cfg["hydra"]
        validate(cfg)
        if check_sweeper is not None:
            check_sweeper(sweeper, cfg)
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


def quote(value: str) -> str:
    """`value` as a single-quoted string of Hydra's override grammar, taken verbatim."""
    # Hydra escapes: a backslash run before a quote (or the closing quote) is doubled
    value = re.sub(r"(\\*)'", lambda m: m.group(1) * 2 + "\\'", value)
    value = re.sub(r"(\\+)$", lambda m: m.group(1) * 2, value)
    return f"'{value}'"


def quote_free_text(argv: list[str], keys: tuple[str, ...]) -> list[str]:
    """Single-quote the values of `keys` (free text such as `prompt=`) for Hydra's override
    grammar, which would reject `12+34=` and turn `007` into 7 or `true` into a bool. Already
    quoted values are left alone."""
    out = []
    for arg in argv:
        key, sep, value = arg.partition("=")
        quoted = len(value) >= 2 and value[0] == value[-1] and value[0] in "'\""
        if key in keys and sep and not quoted:
            arg = f"{key}={quote(value)}"
        out.append(arg)
    return out


EXCLUDED_FROM_JOB_NAMES = ("experiment", "hydra.run.dir", "hydra.sweep.dir")


def name_jobs_by_swept_keys(argv: list[str]) -> list[str]:
    """In a multirun, name each job (its run dir, its wandb run) by the overrides that vary across
    the sweep only: the fixed command-line ones are excluded from `override_dirname`, so
    `-m model.d_model=32 seed=0,1` gives jobs `seed=0` and `seed=1`."""
    if not any(arg in MULTIRUN_FLAGS for arg in argv):
        return argv
    parsed = OverridesParser.create().parse_overrides([a for a in argv if a not in MULTIRUN_FLAGS])
    fixed = [o.key_or_group for o in parsed
             if not o.is_sweep_override() and not o.key_or_group.startswith("hydra")]
    keys = ",".join(dict.fromkeys([*EXCLUDED_FROM_JOB_NAMES, *fixed]))
    return [*argv, f"hydra.job.config.override_dirname.exclude_keys=[{keys}]"]


# -- the app's frame ------------------------------------------------------------------------------
def quiet_libraries(level: int = logging.ERROR) -> None:
    """absl / orbax / jax chatter stays out of the console (Hydra's job logging turns the root
    logger to INFO); the train app keeps their warnings (level WARNING) for train.log. alembic:
    Optuna's database layer, imported by hydra/sweeper=optuna, lists its plugins at INFO."""
    for noisy in ("absl", "orbax", "jax", "alembic"):
        logging.getLogger(noisy).setLevel(level)


def register_schema(name: str, node: Any) -> None:
    """Register the training schemas (groups such as sampling/ and logger/ are shared) and the
    app's own schema `name` (its YAML's `defaults: [name, ...]` picks it)."""
    register_configs()
    ConfigStore.instance().store(name=name, node=node)


@contextlib.contextmanager
def user_errors():
    """A UserError becomes one `error: ...` line on stderr and exit code 2."""
    try:
        yield
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


def run_app(main: Callable[[], Any], config_name: str, validate: Callable[[DictConfig], object],
            *, free_text_keys: tuple[str, ...] = (), sweeps: bool = False,
            check_sweeper: Callable[[DictConfig, DictConfig], None] | None = None) -> None:
    """`python -m jaxformer.NAME`: quote free-text values, refuse a bad command line in one
    line before Hydra starts (`check_sweeper`: see preflight), and (`sweeps`: train) name sweep
    jobs by their swept keys and keep other processes of a multi-host job from writing Hydra's
    files; then run `main`."""
    argv = quote_free_text(sys.argv[1:], free_text_keys) if free_text_keys else sys.argv[1:]
    preflight(argv, config_name, validate, check_sweeper)
    if sweeps:
        argv = name_jobs_by_swept_keys(per_process_overrides(argv))
    sys.argv[1:] = argv
    main()
