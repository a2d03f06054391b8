"""`python -m jaxformer.compare PATH... [--by KEY,KEY] [--metric NAME] [--out DIR]`: runs compared
from their directories (jaxformer/analysis/compare.py).

A Hydra app over conf/compare.yaml (`paths=[...] by=[...] metric=... out=...` work too); the
command line's bare paths and --options become those overrides first. A bare argument is a path
unless it sets one of the app's keys, so a sweep job's directory (`seed=1`) stays a path.
"""

from __future__ import annotations

import sys

import hydra
from omegaconf import DictConfig

from jaxformer.analysis.compare import USAGE, CompareConfig, compare
from jaxformer.cli.app import CONF_PATH, quiet_libraries, quote, register_schema, run_app, \
    user_errors
from jaxformer.config import to_config

KEYS = ("paths", "by", "metric", "out")  # CompareConfig's fields
OPTIONS = ("by", "metric", "out")  # also as --by K,K / --by=K,K
quiet_libraries()
register_schema("compare_schema", CompareConfig)


def to_compare_config(cfg: DictConfig) -> CompareConfig:
    """Build (and so validate) the typed config from a composed DictConfig."""
    return to_config(cfg, CompareConfig, USAGE)


def to_overrides(argv: list[str]) -> list[str]:
    """`runs/a runs/b --by model.activation,model.n_layers` -> `by=['model.activation',
    'model.n_layers'] paths=['runs/a','runs/b']`; Hydra's own flags and overrides pass through."""
    out, paths = [], []
    args = iter(argv)
    for arg in args:
        key, sep, value = arg.partition("=")
        if arg.startswith("--") and key[2:] in OPTIONS:
            key = key[2:]
            if not sep:
                value = next(args, None)
                if value is None or value.startswith("--"):
                    print(f"error: --{key} needs a value: {USAGE}", file=sys.stderr)
                    sys.exit(2)
            items = [v for v in value.split(",") if v]
            out.append(f"{key}=[{','.join(map(quote, items))}]" if key == "by" else
                       f"{key}={quote(value)}")
        elif arg.startswith("-") or (sep and (key.lstrip("+~") in KEYS
                                              or key.lstrip("+~").startswith("hydra"))):
            out.append(arg)
        else:
            paths.append(arg)
    if paths:
        out.append(f"paths=[{','.join(map(quote, paths))}]")
    return out


@hydra.main(version_base=None, config_path=CONF_PATH, config_name="compare")
def main(cfg: DictConfig) -> None:
    with user_errors():
        comparison = compare(to_compare_config(cfg))
    print(comparison.report())


def launch() -> None:
    sys.argv[1:] = to_overrides(sys.argv[1:])
    run_app(main, "compare", to_compare_config)


if __name__ == "__main__":
    launch()
