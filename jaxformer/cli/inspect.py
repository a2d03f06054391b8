"""`python -m jaxformer.inspect checkpoint=RUN_DIR text=...`: attention maps of a trained run
(jaxformer/inference/attention_maps.py); with `lens=true` the logit lens and direct logit
attribution (jaxformer/inference/lens_report.py).

`text`, `target` and `answer` are free text: they reach the app verbatim, never
parsed as Hydra values (so `text=12+34=` and `text=007` work unquoted).
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from jaxformer.cli.app import CONF_PATH, quiet_libraries, register_schema, run_app, user_errors
from jaxformer.config import to_config
from jaxformer.inference.attention_maps import InspectConfig, inspect_run
from jaxformer.inference.lens_report import lens_run

FREE_TEXT_KEYS = ("text", "target", "answer")
quiet_libraries()
register_schema("inspect_schema", InspectConfig)


def to_inspect_config(cfg: DictConfig) -> InspectConfig:
    """Build (and so validate) the typed config from a composed DictConfig."""
    return to_config(cfg, InspectConfig, "python -m jaxformer.inspect checkpoint=RUN_DIR text=TEXT")


@hydra.main(version_base=None, config_path=CONF_PATH, config_name="inspect")
def main(cfg: DictConfig) -> None:
    with user_errors():
        config = to_inspect_config(cfg)
        paths = (lens_run if config.lens else inspect_run)(config)
    for path in paths:
        print(path)


def launch() -> None:
    run_app(main, "inspect", to_inspect_config, free_text_keys=FREE_TEXT_KEYS)


if __name__ == "__main__":
    launch()
