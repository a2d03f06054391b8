"""Tokenizers (Hugging Face `tokenizers`): a character-level one for synthetic tasks, a byte-level
BPE trained on a corpus (python -m jaxformer.prepare), or any tokenizer.json loaded as it is.

The tokenizers built here reserve the same special ids so the models, losses and samplers can rely
on them; a loaded one (GPT-2's) keeps its own.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Iterable, Optional

import numpy as np
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

from jaxformer.errors import UserError

PAD, BOS, EOS, UNK, MASK = "<pad>", "<bos>", "<eos>", "<unk>", "<mask>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, MASK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID, MASK_ID = range(len(SPECIAL_TOKENS))
NUM_SPECIAL = len(SPECIAL_TOKENS)  # the first alphabet character's id
BYTE_ALPHABET_SIZE = 256  # a byte-level BPE starts from every byte, so no text needs <unk>
# end-of-document tokens of tokenizers made elsewhere (GPT-2, Llama / T5), in the order looked for
EOS_TOKENS = (EOS, "<|endoftext|>", "</s>")
TOKENIZER_FILE = "tokenizer.json"


def sentinel_tokens(count: int) -> list[str]:
    """`<extra_id_0>` ... `<extra_id_{count-1}>`: span corruption's (T5) placeholders."""
    return [f"<extra_id_{i}>" for i in range(count)]


def char_tokenizer(alphabet: str) -> Tokenizer:
    """One token per character of `alphabet`, after the special tokens (ids 0..NUM_SPECIAL-1)."""
    if len(set(alphabet)) != len(alphabet):
        raise UserError(f"alphabet {alphabet!r} repeats a character")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    vocab.update({char: NUM_SPECIAL + i for i, char in enumerate(alphabet)})
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # in Oniguruma (?m) lets "." match a newline too: every character is its own token
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("(?m)."), behavior="isolated")
    tokenizer.decoder = decoders.Fuse()  # characters join back without separators
    tokenizer.add_special_tokens(list(SPECIAL_TOKENS))
    return tokenizer


def save_tokenizer(tokenizer: Tokenizer, path: Path) -> None:
    tokenizer.save(str(path))


def load_tokenizer(path: Path, key: str = "tokenizer file") -> Tokenizer:
    """A tokenizer.json; `key` names the setting in errors (`tokenizer.path=...`)."""
    if not Path(path).is_file():
        raise UserError(f"{key} {path} does not exist: point to a tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        raise UserError(f"{key} {path} is not a Hugging Face tokenizer.json "
                        f"({str(err).strip().splitlines()[0]}): re-create it or point to another"
                        ) from err


def tokenizer_file(path: Path, key: str) -> Path:
    """`path` itself, or the tokenizer.json in the folder `path` (a Hugging Face model folder)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UserError(f"{key}={path} does not exist: point to a tokenizer.json or a folder "
                        "holding one")
    if path.is_dir():
        if not (path / TOKENIZER_FILE).is_file():
            raise UserError(f"{key}={path} is a folder without a {TOKENIZER_FILE}: point to the "
                            "file itself or to a folder holding one")
        return path / TOKENIZER_FILE
    return path


def bpe_min_vocab_size(sentinels: int) -> int:
    return BYTE_ALPHABET_SIZE + NUM_SPECIAL + sentinels


def check_bpe_vocab_size(vocab_size: int, sentinels: int) -> None:
    minimum = bpe_min_vocab_size(sentinels)
    if vocab_size < minimum:
        raise UserError(
            f"tokenizer.vocab_size={vocab_size} is smaller than the {BYTE_ALPHABET_SIZE} bytes + "
            f"{NUM_SPECIAL + sentinels} special tokens ({NUM_SPECIAL} + tokenizer.sentinels="
            f"{sentinels}) a byte-level BPE starts from: use tokenizer.vocab_size >= {minimum}")


def train_bpe(texts: Iterable[str], *, vocab_size: int, min_frequency: int, sentinels: int,
              length: Optional[int] = None, show_progress: bool = False) -> Tokenizer:
    """A byte-level BPE (GPT-2's scheme: every byte is a token, so any text encodes and decodes
    back exactly) trained on `texts` (`length` of them, for the trainer's progress). The special
    tokens keep ids 0..NUM_SPECIAL-1 as in the char tokenizer, the sentinels follow, then the
    256 bytes and the merges."""
    check_bpe_vocab_size(vocab_size, sentinels)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency,
        special_tokens=[*SPECIAL_TOKENS, *sentinel_tokens(sentinels)],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    tokenizer.train_from_iterator(texts, trainer, length=length)
    return tokenizer


def tokenizer_sha256(tokenizer: Tokenizer) -> str:
    """A tokenizer's identity: the hash of its serialised JSON (vocabulary, merges, settings)."""
    return hashlib.sha256(tokenizer.to_str().encode("utf-8")).hexdigest()


def vocab_size(tokenizer: Tokenizer) -> int:
    """Rows an embedding table needs: the largest id + 1 (added tokens included)."""
    return max(tokenizer.get_vocab(with_added_tokens=True).values()) + 1


def eos_id(tokenizer: Tokenizer, key: str) -> int:
    """The id ending each document: `<eos>`, else GPT-2's `<|endoftext|>`, else `</s>`."""
    for token in EOS_TOKENS:
        token_id = tokenizer.token_to_id(token)
        if token_id is not None:
            return token_id
    raise UserError(f"{key} has no end-of-document token ({', '.join(EOS_TOKENS)}): add one to "
                    "its special tokens, or leave tokenizer.path unset to train a BPE")


def is_byte_level(tokenizer: Tokenizer) -> bool:
    """Whether the decoder is byte-level (GPT-2's alphabet: one vocabulary character per byte)."""
    def has_byte_level(node) -> bool:
        if isinstance(node, dict):
            return node.get("type") == "ByteLevel" or any(map(has_byte_level, node.values()))
        return isinstance(node, list) and any(map(has_byte_level, node))
    return has_byte_level(json.loads(tokenizer.to_str()).get("decoder"))


def token_byte_lengths(tokenizer: Tokenizer) -> np.ndarray:
    """(vocab,) int32: the UTF-8 bytes of text each token id stands for, so bits per byte =
    summed loss / sum of these over the targets. Special tokens stand for none; a byte-level
    vocabulary string has one character per byte; other tokens count their own UTF-8 bytes
    (exact for character-level vocabularies; WordPiece's `##` or SentencePiece's `▁` are not
    undone)."""
    per_char = is_byte_level(tokenizer)
    lengths = np.zeros(vocab_size(tokenizer), np.int32)
    for token, token_id in tokenizer.get_vocab(with_added_tokens=False).items():
        lengths[token_id] = len(token) if per_char else len(token.encode("utf-8"))
    # added tokens match the raw text (not the byte alphabet); special ones stand for no text
    for token_id, added in tokenizer.get_added_tokens_decoder().items():
        lengths[token_id] = 0 if added.special else len(added.content.encode("utf-8"))
    return lengths


def encode_text(tokenizer: Tokenizer, text: str, key: str, *, bos: bool, eos: bool,
                max_len: int) -> list[int]:
    """Token ids of user text framed as in training (`<bos>` / `<eos>` added as asked); `key`
    names the setting in errors: characters outside the vocabulary, or longer than max_len."""
    encoding = tokenizer.encode(text)
    unknown = sorted({text[start:end] for (start, end), token_id in
                      zip(encoding.offsets, encoding.ids) if token_id == UNK_ID})
    if unknown:
        alphabet = "".join(token for token, token_id in sorted(
            tokenizer.get_vocab().items(), key=lambda item: item[1]) if token_id >= NUM_SPECIAL)
        raise UserError(f"{key}={text!r} has characters outside the tokenizer's vocabulary "
                        f"({', '.join(map(repr, unknown))}): use only {alphabet!r}")
    ids = [BOS_ID] * bos + encoding.ids + [EOS_ID] * eos
    if len(ids) > max_len:
        raise UserError(f"{key} is {len(ids)} tokens long with its special tokens but "
                        f"model.max_len={max_len}: shorten it")
    return ids
