"""A text corpus: the files that `data.paths` globs match (less `data.exclude`), read as documents.

- `.jsonl`: one document per line, the `data.text_field` field (json);
- `.parquet`: one document per row, the `data.text_field` column (pyarrow);
- any other file: text, one document per file, or per blank-line-separated block
  (`data.documents=blank_line`).

Sources are read in sorted path order, so the documents always come in the same order. Bytes
that are not UTF-8 never stop a run: they decode to U+FFFD and are counted
(`Corpus.replaced_characters`; JSON's lone surrogate escapes too). Empty and whitespace-only
documents are skipped.

Each document goes to the train or the validation split by a seeded hash of its text: the same
text always lands in the same split (a duplicate never straddles them), whatever order or
company it comes in.
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, NamedTuple, Optional

import pyarrow as pa
import pyarrow.parquet as pq

from jaxformer.config import DataConfig
from jaxformer.errors import UserError

BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")  # the separator of data.documents=blank_line
SURROGATE = re.compile("[\ud800-\udfff]")  # json's "\ud800" escapes: no UTF-8 exists for them
REPLACEMENT = "\ufffd"
PARQUET_BATCH_ROWS = 4096
SPLITS = ("train", "validation")
TEXT_TYPES = (pa.types.is_string, pa.types.is_large_string, pa.types.is_binary,
              pa.types.is_large_binary)


@dataclass(frozen=True)
class Source:
    """A corpus file as found on disk (size and mtime: the cheap test of "unchanged")."""

    path: Path
    bytes: int
    mtime_ns: int

    @classmethod
    def stat(cls, path: Path) -> Source:
        info = path.stat()
        return cls(path, info.st_size, info.st_mtime_ns)


def find_sources(paths: list[str], exclude: list[str]) -> list[Source]:
    """The files the globs `paths` match (`**` recursive), less those an `exclude` glob matches,
    sorted. An exclude glob is matched (fnmatch: `*` also crosses `/`, so `**/test/**` drops
    every file under a folder named test) against each file's path as its glob gave it and as
    an absolute path."""
    if not paths:
        raise UserError("data.paths is empty: give globs of the corpus files, e.g. "
                        "data.paths='[corpus/**/*.txt]'")
    found: dict[Path, str] = {}  # absolute path -> as matched
    for pattern in paths:
        files = [match for match in glob.glob(os.path.expanduser(pattern), recursive=True)
                 if os.path.isfile(match)]
        if not files:
            raise UserError(f"data.paths glob {pattern!r} matches no file (from {Path.cwd()}): "
                            "fix the glob or remove it")
        found.update((Path(file).absolute(), file) for file in files)
    kept = sorted(path for path, matched in found.items()
                  if not any(fnmatch.fnmatch(name, pattern) for pattern in exclude
                             for name in (matched, path.as_posix())))
    if not kept:
        raise UserError(f"data.exclude={list(exclude)} leaves none of the {len(found)} files "
                        "data.paths matches: narrow the exclude globs")
    return [Source.stat(path) for path in kept]


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """`raw` as text and how many characters had to be replaced (bytes that are not UTF-8)."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        # U+FFFD already present in the input (as its valid 3-byte encoding) was not replaced
        return text, text.count(REPLACEMENT) - raw.count(REPLACEMENT.encode("utf-8"))


def split_of(text_utf8: bytes, seed: int, validation_fraction: float) -> str:
    """`train` or `validation`: the document's keyed hash, as a fraction of 2**64, against
    validation_fraction."""
    digest = hashlib.blake2b(text_utf8, digest_size=8, key=str(seed).encode()).digest()
    return SPLITS[int.from_bytes(digest, "little") < validation_fraction * 2**64]


class Document(NamedTuple):
    text: str
    split: str  # one of SPLITS
    bytes: int  # UTF-8 bytes of the text


class Corpus:
    """The documents of `config`'s sources; each pass over `documents()` reads the files again
    (a corpus need not fit in memory)."""

    def __init__(self, config: DataConfig):
        self.config = config
        self.sources = find_sources(list(config.paths), list(config.exclude))
        self.replaced: dict[Path, int] = {}  # characters replaced per source, when last read
        self._replacing = 0  # ... in the source being read

    @property
    def replaced_characters(self) -> int:
        return sum(self.replaced.values())

    def documents(self, sources: Optional[list[Source]] = None) -> Iterator[str]:
        """The non-blank documents of `sources` (default: all), in order."""
        for source in self.sources if sources is None else sources:
            self._replacing = 0
            for text in self._read(source.path):
                if text.strip():
                    yield text
            self.replaced[source.path] = self._replacing

    def split_documents(self, sources: Optional[list[Source]] = None) -> Iterator[Document]:
        """`documents()`, each with its split and its UTF-8 size."""
        seed, fraction = self.config.split_seed, self.config.validation_fraction
        for text in self.documents(sources):
            utf8 = text.encode("utf-8")
            yield Document(text, split_of(utf8, seed, fraction), len(utf8))

    def _decode(self, raw: bytes) -> str:
        text, replaced = decode_utf8(raw)
        self._replacing += replaced
        return text

    def _read(self, path: Path) -> Iterator[str]:
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            yield from self._read_jsonl(path)
        elif suffix == ".parquet":
            yield from self._read_parquet(path)
        elif self.config.documents == "blank_line":
            for block in BLANK_LINE.split(self._decode(path.read_bytes())):
                yield block.strip("\r\n")
        else:
            yield self._decode(path.read_bytes())

    def _read_jsonl(self, path: Path) -> Iterator[str]:
        field = self.config.text_field
        # binary lines split at b"\n" only (a JSON string may hold U+2028, a str line break)
        with path.open("rb") as lines:
            for number, raw in enumerate(lines, 1):
                line = self._decode(raw)
                if number == 1:
                    line = line.removeprefix("\ufeff")  # a byte-order mark, which json refuses
                if not line.strip():
                    continue
                try:
                    record = json.loads(line)
                except json.JSONDecodeError as err:
                    raise UserError(f"{path}:{number} is not JSON ({err.msg}, column {err.colno}): "
                                    "fix or remove the line") from err
                if not isinstance(record, dict) or field not in record:
                    raise UserError(f"{path}:{number} has no field {field!r}: set "
                                    "data.text_field to the field holding the text")
                text = record[field]
                if not isinstance(text, str):
                    raise UserError(f"{path}:{number} field {field!r} holds "
                                    f"{type(text).__name__}, not text: set data.text_field to "
                                    "the field holding the text")
                text, replaced = SURROGATE.subn(REPLACEMENT, text)
                self._replacing += replaced
                yield text

    def _read_parquet(self, path: Path) -> Iterator[str]:
        field = self.config.text_field
        try:
            parquet = pq.ParquetFile(path)
            schema = parquet.schema_arrow
            if field not in schema.names:
                raise UserError(f"{path} has no column {field!r} (columns: "
                                f"{', '.join(schema.names)}): set data.text_field to the column "
                                "holding the text")
            if not any(is_type(schema.field(field).type) for is_type in TEXT_TYPES):
                raise UserError(f"{path} column {field!r} holds {schema.field(field).type}, not "
                                "text: set data.text_field to the column holding the text")
            for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[field]):
                # as bytes: parquet strings are meant to be UTF-8 but nothing forces them to be
                for raw in batch.column(0).cast(pa.large_binary()).to_pylist():
                    if raw is not None:
                        yield self._decode(raw)
        except (pa.ArrowException, OSError) as err:
            raise UserError(f"{path} is not a readable parquet file ({str(err).splitlines()[0]}): "
                            "re-create it or leave it out with data.exclude") from err
