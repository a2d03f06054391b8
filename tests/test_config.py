"""Config composition and validation: every experiment composes, bad values fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError

from helpers import REPO, compose_train, run_module
from jaxformer.config import ModelConfig, TrainConfig, register_configs, to_train_config
from jaxformer.errors import UserError

register_configs()
EXPERIMENTS = sorted(p.stem for p in (REPO / "conf" / "experiment").glob("*.yaml"))


def test_default_config_composes_to_typed_schema():
    config = to_train_config(compose_train())
    assert isinstance(config, TrainConfig)
    assert config.model.kind == "decoder" and config.task.name == "addition"
    assert config.logger.wandb.mode is None  # $WANDB_MODE, else offline (tests/test_tracking.py)


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_composes(experiment):
    config = to_train_config(compose_train(f"experiment={experiment}"))
    assert config.trainer.steps > 0


def test_experiment_values_override_the_root_config():
    config = to_train_config(compose_train("experiment=quickstart"))
    assert config.name == "quickstart" and config.trainer.steps == 1500
    # and the command line still overrides the experiment
    config = to_train_config(compose_train("experiment=quickstart", "trainer.steps=7"))
    assert config.trainer.steps == 7


def test_override_reaches_typed_config():
    config = to_train_config(compose_train("model.n_layers=4", "optim.lr=0.01", "seed=3"))
    assert (config.model.n_layers, config.optim.lr, config.seed) == (4, 0.01, 3)


def test_unknown_key_fails_at_composition():
    with pytest.raises((ConfigCompositionException, ConfigKeyError)):
        compose_train("model.n_layerz=4")


def test_unknown_group_option_fails_at_composition():
    with pytest.raises(ConfigCompositionException):
        compose_train("model=transformerXL")


def test_wrong_type_fails_at_composition():
    with pytest.raises(Exception, match="n_layers"):
        compose_train("model.n_layers=deep")


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"d_model": 30, "n_heads": 4}, "model.d_model=30 is not divisible by model.n_heads=4"),
        ({"n_layers": 0}, "model.n_layers=0 must be a positive number"),
        ({"activation": "swish2"}, "model.activation='swish2' is not one of"),
        ({"positions": "alibi"}, "model.positions='alibi' is not one of"),
        ({"norm": "sandwich"}, "model.norm='sandwich' is not one of"),
        ({"dropout": 1.5}, "model.dropout=1.5 must be in"),
    ],
)
def test_bad_model_values_name_the_key(fields, message):
    with pytest.raises(UserError, match=message.replace("(", r"\(")):
        ModelConfig(**fields)


def test_bad_values_through_hydra_raise_config_error():
    with pytest.raises(UserError, match="trainer.steps=-5 must be a positive number"):
        to_train_config(compose_train("trainer.steps=-5"))
    with pytest.raises(UserError, match="logger.wandb.mode='loud'"):
        to_train_config(compose_train("logger.wandb.mode=loud"))


def test_cli_bad_value_is_one_clear_line(tmp_path: Path):
    proc = run_module("jaxformer.train", "model.d_model=30", f"hydra.run.dir={tmp_path / 'run'}")
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines == [
        "error: model.d_model=30 is not divisible by model.n_heads=4: pick d_model as a multiple of n_heads or set model.head_dim"
    ]


def test_cli_unwritable_run_dir_is_one_clear_line(tmp_path: Path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    proc = run_module("jaxformer.train", f"hydra.run.dir={blocker}/run")
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"error: hydra.run.dir={blocker}/run is not writable ({blocker} is not a writable "
        "directory): choose another directory"
    ]


@pytest.mark.parametrize(
    "override, message",
    [
        ("model.n_layerz=3", "error: Could not override 'model.n_layerz': Key 'n_layerz' not in 'ModelConfig'"),
        ("model=transformerXL", "error: In 'train': Could not find 'model/transformerXL' (options: decoder, encoder, encoder_decoder, llama, mlp)"),
        ("experiment=nope", "error: In 'train': Could not find 'experiment/nope' (options: "
                            + ", ".join(EXPERIMENTS) + ")"),
        ("trainer.steps=0", "error: trainer.steps=0 must be a positive number"),
    ],
)
def test_cli_unknown_keys_groups_and_values_are_one_line(override, message):
    proc = run_module("jaxformer.train", "-m", override)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [message]
