"""Tokenizers (Hugging Face `tokenizers`): a character-level one for synthetic tasks.

Every tokenizer reserves the same special ids so the models, losses and samplers can rely on them.
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

from jaxformer.errors import UserError

PAD, BOS, EOS, UNK, MASK = "<pad>", "<bos>", "<eos>", "<unk>", "<mask>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK, MASK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID, MASK_ID = range(len(SPECIAL_TOKENS))
NUM_SPECIAL = len(SPECIAL_TOKENS)  # the first alphabet character's id


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


def load_tokenizer(path: Path) -> Tokenizer:
    if not Path(path).is_file():
        raise UserError(f"tokenizer file {path} does not exist: point to a tokenizer.json")
    try:
        return Tokenizer.from_file(str(path))
    except Exception as err:  # tokenizers raises a bare Exception on malformed files
        raise UserError(f"tokenizer file {path} is not a Hugging Face tokenizer.json "
                        f"({str(err).strip().splitlines()[0]}): re-create it or point to another"
                        ) from err


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
