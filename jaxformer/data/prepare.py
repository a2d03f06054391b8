"""What `python -m jaxformer.prepare` does: a corpus (jaxformer/data/corpus.py) -> a tokenizer
(a byte-level BPE trained on the training split, or `tokenizer.path`'s tokenizer.json) -> token
shards in `data.out_dir` (format: jaxformer/data/shards.py).

Three passes read the corpus: a scan (documents and bytes per split; bad files are refused here,
before any work), the tokenizer's training on the training split, and the tokenization in
batches (`encode_batch_fast`: Hugging Face tokenizers encodes a batch on every core).

The shards are built in a temporary folder beside `data.out_dir` and renamed into place when
complete, so a failure leaves the previous state. Re-running with the same sources (paths, sizes
and modification times; sha256 when those differ) and settings does nothing.
"""

from __future__ import annotations

import contextlib
import datetime
import hashlib
import json
import os
import platform
import secrets
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple, Optional, TypeVar

from tokenizers import Tokenizer

from jaxformer.config import DataConfig, TokenizerConfig, to_dict
from jaxformer.data.corpus import SPLITS, Corpus, Document, Source
from jaxformer.data.shards import (
    FORMAT, MANIFEST, SplitWriter, read_manifest, shard_files, token_dtype,
)
from jaxformer.data.tokenizers import (
    TOKENIZER_FILE, check_bpe_vocab_size, eos_id, load_tokenizer, tokenizer_file, train_bpe,
    vocab_size,
)
from jaxformer.errors import UserError
from jaxformer.progress import Progress, is_terminal

BATCH_DOCUMENTS = 1024  # documents per encode_batch call, at most ...
BATCH_CHARACTERS = 4 << 20  # ... and about this much text
REPORT_SECONDS = 10.0  # off a terminal, one progress line at most this often
T = TypeVar("T")


@dataclass
class PrepareConfig:
    data: DataConfig = field(default_factory=DataConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)

    def __post_init__(self) -> None:
        if self.tokenizer.path is None:
            check_bpe_vocab_size(self.tokenizer.vocab_size, self.tokenizer.sentinels)
        elif not str(self.tokenizer.path).strip():
            raise UserError("tokenizer.path is empty: point to a tokenizer.json (or a folder "
                            "holding one), or null to train a BPE")


class Prepared(NamedTuple):
    out_dir: Path
    manifest: dict
    built: bool  # False: out_dir was up to date
    reason: str  # why it was built, or why it was left alone
    seconds: float


def prepare(config: PrepareConfig) -> Prepared:
    started = time.monotonic()
    out_dir = Path(config.data.out_dir).expanduser()
    corpus = Corpus(config.data)
    source = (tokenizer_file(config.tokenizer.path, "tokenizer.path")
              if config.tokenizer.path is not None else None)
    settings = settings_of(config)
    reason = why_stale(out_dir, corpus.sources, settings, source)
    if reason is None:
        return Prepared(out_dir, read_manifest(out_dir), False,
                        f"{len(corpus.sources)} sources and the settings unchanged",
                        time.monotonic() - started)
    with staging_folder(out_dir) as staging:
        manifest = build(config, corpus, source, settings, staging)
    return Prepared(out_dir, manifest, True, reason, time.monotonic() - started)


def settings_of(config: PrepareConfig) -> dict:
    """What the shards depend on besides the sources (out_dir is where, not what), as JSON
    has it."""
    data = {k: v for k, v in to_dict(config.data).items() if k != "out_dir"}
    return json.loads(json.dumps({"data": data, "tokenizer": to_dict(config.tokenizer)}))


def sha256(path: Path) -> str:
    with path.open("rb") as file:
        return hashlib.file_digest(file, "sha256").hexdigest()


def why_stale(out_dir: Path, sources: list[Source], settings: dict,
              tokenizer_source: Optional[Path]) -> Optional[str]:
    """Why out_dir must be (re)built, or None when it already holds these sources and settings."""
    try:
        manifest = read_manifest(out_dir)
    except UserError:
        return "no prepared corpus in data.out_dir yet"
    missing = [name for name in shard_files() if not (out_dir / name).is_file()]
    if missing:
        return f"data.out_dir lacks {', '.join(missing)}"
    if manifest.get("settings") != settings:
        old, new = _flatten(manifest.get("settings") or {}), _flatten(settings)
        changed = [f"{key} {old.get(key)!r} -> {new.get(key)!r}"
                   for key in sorted(old.keys() | new.keys()) if old.get(key) != new.get(key)]
        return f"settings changed: {'; '.join(changed)}"
    if tokenizer_source is not None and sha256(tokenizer_source) != manifest["tokenizer"]["sha256"]:
        return f"tokenizer.path's file {tokenizer_source} changed"
    recorded = {entry["path"]: entry for entry in manifest.get("sources", [])}
    current = {str(source.path): source for source in sources}
    if recorded.keys() != current.keys():
        added, removed = current.keys() - recorded.keys(), recorded.keys() - current.keys()
        return f"sources changed: {len(added)} added, {len(removed)} removed"
    changed = [path for path, source in current.items() if _changed(source, recorded[path])]
    if changed:
        return f"{len(changed)} source(s) changed, e.g. {changed[0]}"
    return None


def _changed(source: Source, recorded: dict) -> bool:
    """Same size and modification time: unchanged; else the sha256 decides (a file touched but
    not changed is not rebuilt for)."""
    if (source.bytes, source.mtime_ns) == (recorded["bytes"], recorded.get("mtime_ns")):
        return False
    return source.bytes != recorded["bytes"] or sha256(source.path) != recorded["sha256"]


def _flatten(settings: dict) -> dict:
    return {f"{section}.{key}": value for section, values in settings.items()
            for key, value in values.items()}


@contextlib.contextmanager
def staging_folder(out_dir: Path) -> Iterator[Path]:
    """A new folder beside out_dir to build in; renamed to out_dir when the block ends normally
    (a previous out_dir is replaced), removed when it raises."""
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"data.out_dir={out_dir} is a file: choose a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).exists():
        raise UserError(f"data.out_dir={out_dir} holds files but no {MANIFEST} (it is no "
                        "prepared corpus, so it is not replaced): choose another folder or "
                        "empty it")
    staging = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    try:
        staging.mkdir(parents=True)
    except OSError as err:
        raise UserError(f"data.out_dir={out_dir} is not writable ({err.strerror}: "
                        f"{err.filename}): choose another folder") from err
    try:
        yield staging
        if out_dir.exists():
            previous = staging.with_name(staging.name.replace(".tmp-", ".old-"))
            out_dir.rename(previous)
            staging.rename(out_dir)
            shutil.rmtree(previous)
        else:
            staging.rename(out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def build(config: PrepareConfig, corpus: Corpus, tokenizer_source: Optional[Path],
          settings: dict, folder: Path) -> dict:
    """Scan, tokenizer, shards and manifest, written into `folder`; returns the manifest."""
    if tokenizer_source is not None:  # a bad tokenizer file is refused before any reading
        tokenizer = load_tokenizer(tokenizer_source, key="tokenizer.path")
        end_id = eos_id(tokenizer, f"tokenizer.path={tokenizer_source}")
        shutil.copyfile(tokenizer_source, folder / TOKENIZER_FILE)  # as it is: same sha256
    counts = scan(corpus)
    if tokenizer_source is None:
        tokenizer = train(corpus, config.tokenizer, counts["train"]["documents"])
        end_id = eos_id(tokenizer, "the trained BPE")
        tokenizer.save(str(folder / TOKENIZER_FILE))
    size = vocab_size(tokenizer)
    splits = tokenize(corpus, tokenizer, folder, token_dtype(size), end_id,
                      sum(split["documents"] for split in counts.values()))
    manifest = {
        "format": FORMAT,
        "dtype": token_dtype(size),
        "tokenizer": {"file": TOKENIZER_FILE, "sha256": sha256(folder / TOKENIZER_FILE),
                      "vocab_size": size, "trained": tokenizer_source is None,
                      "source": None if tokenizer_source is None else str(tokenizer_source)},
        "eos_id": end_id,
        "sources": [{"path": str(source.path), "sha256": sha256(source.path),
                     "bytes": source.bytes, "mtime_ns": source.mtime_ns}
                    for source in corpus.sources],
        "settings": settings,
        "python": platform.python_version(),
        "replaced_characters": corpus.replaced_characters,
        "splits": splits,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def scan(corpus: Corpus) -> dict[str, dict]:
    """Documents and bytes per split; refuses a corpus without text or with an empty split."""
    counts = {split: {"documents": 0, "bytes": 0} for split in SPLITS}
    with Progress(len(corpus.sources), desc="scan", unit="file") as progress:
        for source in _tracked(corpus.sources, progress):
            for document in corpus.split_documents([source]):
                counts[document.split]["documents"] += 1
                counts[document.split]["bytes"] += document.bytes
    total = sum(split["documents"] for split in counts.values())
    where = f"the {len(corpus.sources)} files data.paths matches"
    if not total:
        raise UserError(f"{where} hold no text (empty or whitespace only): point data.paths at "
                        "files with text")
    for split, other in zip(SPLITS, reversed(SPLITS)):
        if not counts[split]["documents"]:
            raise UserError(
                f"all {total} documents of {where} fell in the {other} split "
                f"(data.validation_fraction={corpus.config.validation_fraction}): add documents, "
                "change data.validation_fraction, or split files into more documents "
                "(data.documents=blank_line)")
    return counts


def train(corpus: Corpus, config: TokenizerConfig, documents: int) -> Tokenizer:
    """A byte-level BPE on the training split's documents."""
    # on a terminal the trainer draws its own bars (reading, then merging); off one, ours
    # prints lines (the trainer's then stay silent)
    on_terminal = is_terminal(sys.stderr)
    with Progress(documents, desc="tokenizer", unit="doc", enabled=not on_terminal) as progress:
        texts = (doc.text for doc in corpus.split_documents() if doc.split == "train")
        return train_bpe(_tracked(texts, progress), vocab_size=config.vocab_size,
                         min_frequency=config.min_frequency, sentinels=config.sentinels,
                         length=documents, show_progress=on_terminal)


def tokenize(corpus: Corpus, tokenizer: Tokenizer, folder: Path, dtype: str, end_id: int,
             documents: int) -> dict[str, dict]:
    """Every document's ids into its split's shards; the splits' counts."""
    tokenizer.encode_special_tokens = True  # "<eos>" inside a document is text, not a boundary
    tokenizer.no_truncation()  # a loaded tokenizer.json may truncate or pad: shards hold all
    tokenizer.no_padding()
    writers = {split: SplitWriter(folder, split, dtype, end_id) for split in SPLITS}
    with Progress(documents, desc="tokenize", unit="doc") as progress:
        for batch in _tracked(_batches(corpus.split_documents()), progress, len):
            encodings = tokenizer.encode_batch_fast([doc.text for doc in batch],
                                                    add_special_tokens=False)
            for document, encoding in zip(batch, encodings):
                writers[document.split].add(encoding.ids, document.bytes)
    return {split: writer.close() for split, writer in writers.items()}


def _batches(documents: Iterable[Document]) -> Iterator[list[Document]]:
    batch: list[Document] = []
    characters = 0
    for document in documents:
        batch.append(document)
        characters += len(document.text)
        if len(batch) >= BATCH_DOCUMENTS or characters >= BATCH_CHARACTERS:
            yield batch
            batch, characters = [], 0
    if batch:
        yield batch


def _tracked(items: Iterable[T], progress: Progress, size=lambda item: 1) -> Iterator[T]:
    """`items`, counted on `progress` (`size(item)` units each) as they are consumed."""
    last = time.monotonic()
    for item in items:
        yield item
        progress.update(size(item))
        if time.monotonic() - last >= REPORT_SECONDS:
            progress.report()
            last = time.monotonic()
    progress.report()

