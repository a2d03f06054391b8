"""`python -m jaxformer.prepare [data.paths='[corpus/**/*.txt]'] [data.out_dir=DIR]
[tokenizer.vocab_size=8192 | tokenizer.path=TOKENIZER_JSON]`: a text corpus -> a tokenizer ->
token shards for task=text (see jaxformer/data/prepare.py). With no arguments: the default
corpus, Python's standard library (conf/data/python_stdlib.yaml). Re-running it with the same
sources and settings does nothing.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from jaxformer.cli.app import CONF_PATH, quiet_libraries, register_schema, run_app, user_errors
from jaxformer.config import to_config
from jaxformer.data.prepare import PrepareConfig, Prepared, prepare

quiet_libraries()
register_schema("prepare_schema", PrepareConfig)


def to_prepare_config(cfg: DictConfig) -> PrepareConfig:
    return to_config(cfg, PrepareConfig, "python -m jaxformer.prepare [data.paths=[GLOB,...]] "
                                         "(conf/prepare.yaml)")


def report(prepared: Prepared) -> None:
    if not prepared.built:
        print(f"{prepared.out_dir} is up to date ({prepared.reason}): nothing to do "
              f"({prepared.seconds:.1f} s)")
        return
    manifest = prepared.manifest
    tokenizer = manifest["tokenizer"]
    how = "trained" if tokenizer["trained"] else f"loaded from {tokenizer['source']}"
    print(f"prepared {prepared.out_dir} in {prepared.seconds:.1f} s ({prepared.reason}): "
          f"{len(manifest['sources'])} files, tokenizer {how} (vocab {tokenizer['vocab_size']}, "
          f"{manifest['dtype']}), {manifest['replaced_characters']} characters replaced "
          "(not UTF-8)")
    for split, counts in manifest["splits"].items():
        bytes_per_token = counts["bytes"] / counts["tokens"]
        print(f"  {split:<10} {counts['documents']:>9,} documents {counts['tokens']:>13,} tokens "
              f"{counts['bytes']:>14,} bytes ({bytes_per_token:.2f} bytes/token)")


@hydra.main(version_base=None, config_path=CONF_PATH, config_name="prepare")
def main(cfg: DictConfig) -> None:
    with user_errors():
        report(prepare(to_prepare_config(cfg)))


def launch() -> None:
    run_app(main, "prepare", to_prepare_config)


if __name__ == "__main__":
    launch()
