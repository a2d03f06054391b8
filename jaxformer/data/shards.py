"""Token shards of a prepared corpus (`python -m jaxformer.prepare`): their format, their writer
and their reader.

    OUT_DIR/manifest.json       what was prepared from what, how (jaxformer/data/prepare.py);
                                written last, so a folder without one is incomplete
    OUT_DIR/tokenizer.json      the tokenizer the shards were encoded with
    OUT_DIR/S.tokens.npy        S = train, validation: every document's token ids followed by one
                                end-of-document id (manifest `eos_id`), concatenated in document
                                order; dtype uint16 (vocabularies up to 65536) or uint32
    OUT_DIR/S.docs.npy          int64 (D+1,): where document d starts in S.tokens.npy; the last
                                entry is the total token count
    OUT_DIR/S.doc_bytes.npy     int64 (D,): UTF-8 bytes of each document's text (bits per byte)

All are plain `np.save` files: `np.load(path, mmap_mode="r")` reads them without loading them.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

from jaxformer.data.corpus import SPLITS
from jaxformer.data.tokenizers import TOKENIZER_FILE, load_tokenizer
from jaxformer.errors import UserError

FORMAT = 1
MANIFEST = "manifest.json"
ARRAYS = ("tokens", "docs", "doc_bytes")  # per split: S.tokens.npy, S.docs.npy, S.doc_bytes.npy


def array_file(split: str, array: str) -> str:
    return f"{split}.{array}.npy"


def shard_files() -> list[str]:
    """Every file of a prepared corpus, the manifest last."""
    return [TOKENIZER_FILE, *(array_file(s, a) for s in SPLITS for a in ARRAYS), MANIFEST]


def token_dtype(vocab_size: int) -> str:
    return "uint16" if vocab_size <= 2**16 else "uint32"


def rerun_hint(path: Path) -> str:
    return f"run python -m jaxformer.prepare data.out_dir={path} (with the corpus' data.paths)"


class SplitWriter:
    """One split's shards, streamed: token ids go to a raw file as documents come (a corpus need
    not fit in memory) and become S.tokens.npy at `close` (numpy's header, then those bytes)."""

    def __init__(self, folder: Path, split: str, dtype: str, eos_id: int):
        self.folder, self.split, self.dtype, self.eos_id = folder, split, np.dtype(dtype), eos_id
        self.raw_path = folder / f"{split}.tokens.raw"
        self.raw = self.raw_path.open("wb")
        self.starts = [0]  # S.docs
        self.doc_bytes: list[int] = []

    def add(self, ids: list[int], text_bytes: int) -> None:
        """One document: its token ids (the end-of-document id is appended here)."""
        tokens = np.empty(len(ids) + 1, self.dtype)
        tokens[:-1] = ids
        tokens[-1] = self.eos_id
        self.raw.write(tokens.tobytes())
        self.starts.append(self.starts[-1] + len(tokens))
        self.doc_bytes.append(text_bytes)

    def close(self) -> dict:
        """Write the .npy files; the split's counts for the manifest."""
        self.raw.close()
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False,
                  "shape": (self.starts[-1],)}
        with (self.folder / array_file(self.split, "tokens")).open("wb") as out:
            np.lib.format.write_array_header_1_0(out, header)
            with self.raw_path.open("rb") as raw:
                shutil.copyfileobj(raw, out, 1 << 24)
        self.raw_path.unlink()
        np.save(self.folder / array_file(self.split, "docs"), np.asarray(self.starts, np.int64))
        np.save(self.folder / array_file(self.split, "doc_bytes"),
                np.asarray(self.doc_bytes, np.int64))
        return {"documents": len(self.doc_bytes), "tokens": self.starts[-1],
                "bytes": sum(self.doc_bytes)}


def read_manifest(path: Path) -> dict:
    """OUT_DIR/manifest.json, refused (one line) when missing, unreadable or of another format."""
    path = Path(path)
    if not path.is_dir():
        raise UserError(f"{path} is not a prepared corpus (no such folder): {rerun_hint(path)}")
    try:
        manifest = json.loads((path / MANIFEST).read_text())
    except FileNotFoundError as err:
        raise UserError(f"{path} has no {MANIFEST} (not prepared, or the preparation did not "
                        f"finish): {rerun_hint(path)}") from err
    except (OSError, ValueError) as err:
        raise UserError(f"{path / MANIFEST} is unreadable ({str(err).splitlines()[0]}): "
                        f"{rerun_hint(path)}") from err
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else None
        raise UserError(f"{path / MANIFEST} is of format {found}, not {FORMAT}: "
                        f"{rerun_hint(path)}")
    return manifest


@dataclass(frozen=True)
class SplitShards:
    """One split's arrays, memory-mapped."""

    tokens: np.ndarray  # (T,) token ids, each document followed by the end-of-document id
    docs: np.ndarray  # (D+1,) int64 start of each document in tokens; docs[-1] == T
    doc_bytes: np.ndarray  # (D,) int64 UTF-8 bytes of each document

    @property
    def num_documents(self) -> int:
        return len(self.doc_bytes)

    def document(self, index: int) -> np.ndarray:
        """Document `index`'s token ids, its end-of-document id included."""
        return self.tokens[self.docs[index]:self.docs[index + 1]]


@dataclass(frozen=True)
class Shards:
    """A prepared corpus: `Shards.open(out_dir)`."""

    path: Path
    manifest: dict
    tokenizer: Tokenizer
    splits: dict[str, SplitShards]

    @property
    def eos_id(self) -> int:
        return self.manifest["eos_id"]

    @classmethod
    def open(cls, path: str | Path) -> Shards:
        path = Path(path)
        manifest = read_manifest(path)
        try:
            tokenizer = load_tokenizer(path / TOKENIZER_FILE)
        except UserError as err:
            raise UserError(f"{path / TOKENIZER_FILE} is missing or unreadable: "
                            f"{rerun_hint(path)}") from err
        return cls(path, manifest, tokenizer,
                   {split: _open_split(path, split, manifest) for split in SPLITS})


def _open_split(path: Path, split: str, manifest: dict) -> SplitShards:
    arrays = {}
    for array in ARRAYS:
        file = path / array_file(split, array)
        try:
            arrays[array] = np.load(file, mmap_mode="r")
        except (OSError, ValueError) as err:
            raise UserError(f"{file} is missing or unreadable ({str(err).splitlines()[0]}): "
                            f"{rerun_hint(path)}") from err
    shards = SplitShards(**arrays)
    counts = manifest.get("splits", {}).get(split, {})
    consistent = (str(shards.tokens.dtype) == manifest.get("dtype")
                  and len(shards.docs) == shards.num_documents + 1
                  and shards.docs[-1] == len(shards.tokens)
                  and counts.get("tokens") == len(shards.tokens)
                  and counts.get("documents") == shards.num_documents)
    if not consistent:
        raise UserError(f"{path}'s {split} shards do not match its {MANIFEST} (a file changed "
                        f"or was cut short): {rerun_hint(path)}")
    return shards
