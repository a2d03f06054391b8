"""Attention inspection: restore tiny checkpoints of each family, capture, plot, fail clearly."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from flax import nnx
from hydra.core.override_parser.overrides_parser import OverridesParser

from helpers import RUN_CONFIGS as CONFIGS
from helpers import initial_params, run_module, write_run
from jaxformer.cli.app import quote_free_text
from jaxformer.cli.inspect import FREE_TEXT_KEYS
from jaxformer.errors import UserError
from jaxformer.inference.attention_maps import InspectConfig, attention_maps, inspect_run
from jaxformer.runs import restore_run as restore_params
from jaxformer.models.instrument import SowConfig

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("runs")
    for kind in CONFIGS:
        write_run(root / kind, kind)
    return {kind: root / kind for kind in CONFIGS}


def rows_sum_to_one(weights_hqk: np.ndarray) -> None:
    np.testing.assert_allclose(weights_hqk.sum(-1), 1.0, atol=1e-5)


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_restore_params_gives_the_saved_model(runs, kind):
    def params_of(model):
        return jax.tree.leaves(nnx.state(model, nnx.Param))

    run = restore_params(runs[kind])
    assert run.step == 2 and run.model_cfg == CONFIGS[kind]
    saved = jax.tree.leaves(initial_params(kind))
    assert len(params_of(run.model)) == len(saved)
    for restored, original in zip(params_of(run.model), saved):
        np.testing.assert_array_equal(restored, original)
    older = restore_params(runs[kind], step=1)
    np.testing.assert_array_equal(params_of(older.model)[0], saved[0] + 1.0)


def test_decoder_maps_are_causal_and_written_per_layer(runs, tmp_path):
    config = InspectConfig(checkpoint=str(runs["decoder"]), text="12+34=", out_dir=str(tmp_path))
    paths = inspect_run(config)
    assert [p.name for p in paths] == ["decoder_layer00_self.png", "decoder_layer01_self.png"]
    for path in paths:
        assert path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 5000

    run = restore_params(runs["decoder"])
    maps = attention_maps(run.model, run.model_cfg, run.tokenizer, "12+34=")
    assert maps[0].query_tokens == maps[0].key_tokens == ["<bos>", *"12+34="]
    for m in maps:
        assert m.weights_hqk.shape == (2, 7, 7)
        rows_sum_to_one(m.weights_hqk)
        assert np.all(np.triu(m.weights_hqk, k=1) == 0.0)  # no query sees a later key
    # captured on a copy: the restored model itself sows nothing
    assert run.model.stack.blocks.attention.sow_config == SowConfig()


def test_encoder_decoder_maps_cover_both_stacks_and_cross_attention(runs, tmp_path):
    config = InspectConfig(checkpoint=str(runs["encoder_decoder"]), text="12+34",
                           target="64", out_dir=str(tmp_path))
    names = [p.name for p in inspect_run(config)]
    assert names == ["encoder_layer00_self.png", "encoder_layer01_self.png",
                     "decoder_layer00_self.png", "decoder_layer00_cross.png"]
    assert all((tmp_path / name).stat().st_size > 0 for name in names)

    run = restore_params(runs["encoder_decoder"])
    captured = attention_maps(run.model, run.model_cfg, run.tokenizer, "12+34", "64")
    maps = {m.name: m for m in captured}
    encoder, self_attn, cross = (maps["encoder_layer00_self"], maps["decoder_layer00_self"],
                                 maps["decoder_layer00_cross"])
    assert encoder.query_tokens == [*"12+34", "<eos>"] and encoder.weights_hqk.shape == (2, 6, 6)
    assert self_attn.query_tokens == ["<bos>", "6", "4"]
    assert self_attn.weights_hqk.shape == (2, 3, 3)
    assert cross.key_tokens == encoder.key_tokens and cross.weights_hqk.shape == (2, 3, 6)
    for m in maps.values():
        rows_sum_to_one(m.weights_hqk)
    assert np.all(np.triu(self_attn.weights_hqk, k=1) == 0.0)
    later_keys = np.triu_indices(6, k=1)
    assert np.all(encoder.weights_hqk[:, later_keys[0], later_keys[1]] > 0.0)  # it looks both ways
    # without a target the decoder reads just <bos>
    no_target = attention_maps(run.model, run.model_cfg, run.tokenizer, "12+34")
    assert no_target[-1].query_tokens == ["<bos>"]


def test_encoder_maps_frame_the_text_like_training(runs):
    run = restore_params(runs["encoder"])
    maps = attention_maps(run.model, run.model_cfg, run.tokenizer, "1 2")
    assert [m.name for m in maps] == ["encoder_layer00_self", "encoder_layer01_self"]
    assert maps[0].key_tokens == ["<bos>", "1", "\u2423", "2", "<eos>"]  # spaces stay visible
    rows_sum_to_one(maps[0].weights_hqk)


@pytest.mark.parametrize("fields, message", [
    ({"text": ""}, "text is empty"),
    ({"text": "12", "target": " "}, "target is empty"),
    ({"text": "12", "step": -1}, "step=-1 must be >= 0"),
])
def test_bad_config_values_are_one_line_errors(runs, fields, message):
    with pytest.raises(UserError, match=message):
        InspectConfig(checkpoint=str(runs["decoder"]), **fields)


def test_missing_or_empty_run_dirs_are_clear_errors(runs, tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        InspectConfig(checkpoint=str(tmp_path / "nowhere"), text="1")
    with pytest.raises(UserError, match="has no checkpoints/ folder"):
        InspectConfig(checkpoint=str(tmp_path), text="1")
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(UserError, match="holds no checkpoints"):
        restore_params(tmp_path)
    with pytest.raises(UserError, match=r"step=7 is not in .* \(available: 1, 2\)"):
        restore_params(runs["decoder"], step=7)


def test_missing_tokenizer_is_a_clear_error(runs, tmp_path):
    run_dir = tmp_path / "run"
    shutil.copytree(runs["decoder"] / "checkpoints", run_dir / "checkpoints")
    with pytest.raises(UserError, match="tokenizer.json does not exist"):
        restore_params(run_dir)


@pytest.mark.parametrize("kind, text, target, message", [
    ("decoder", "12*3", None, r"text='12\*3' has characters outside .* \('\*'\): use only '0123"),
    ("decoder", "1" * 10, None, "text is 11 tokens long .* model.max_len=10"),
    ("encoder", "1" * 9, None, "text is 11 tokens long"),
    ("encoder_decoder", "12", "x", "target='x' has characters outside"),
    ("decoder", "12", "3", "target is only for encoder_decoder models"),
])
def test_bad_text_is_a_clear_error(runs, kind, text, target, message):
    run = restore_params(runs[kind])
    with pytest.raises(UserError, match=message):
        attention_maps(run.model, run.model_cfg, run.tokenizer, text, target)


FREE_TEXTS = ["12+34=", "007", "true", "1e3", "a,b", "it's\\", 'say "hi"', " x "]


@pytest.mark.parametrize("raw", FREE_TEXTS)
def test_free_text_reaches_the_app_verbatim(raw):
    (quoted,) = quote_free_text([f"text={raw}"], FREE_TEXT_KEYS)
    assert OverridesParser.create().parse_overrides([quoted])[0].value() == raw
    assert quote_free_text(["step=3", "target='x'"], FREE_TEXT_KEYS) == ["step=3", "target='x'"]


def test_cli_writes_pngs_and_reports_errors_in_one_line(runs, tmp_path):
    done = run_module("jaxformer.inspect", f"checkpoint={runs['encoder_decoder']}",
                      "text=007+042=", "target=94", "step=1", f"out_dir={tmp_path}")
    assert done.returncode == 0, done.stderr
    printed = [Path(line) for line in done.stdout.split()]
    assert len(printed) == 4 and all(p.parent == tmp_path and p.stat().st_size for p in printed)

    for text, message in (("text=12*3", "outside the tokenizer's vocabulary"),  # found in the app
                          ("text=", "text is empty")):  # found by the preflight
        bad = run_module("jaxformer.inspect", f"checkpoint={runs['decoder']}", text)
        assert bad.returncode == 2 and bad.stdout == ""
        assert bad.stderr.startswith("error: ") and bad.stderr.strip().count("\n") == 0
        assert message in bad.stderr
    assert not (runs["decoder"] / "inspect").exists()
