"""`python -m jaxformer.prepare`: corpora (text, blank-line blocks, jsonl, parquet, bytes that are
not UTF-8) -> a byte-level BPE -> token shards; the shard format, the seeded split, the
idempotent re-run, bad inputs (one line, nothing half-written) and the CLI. Tiny corpora in
tmp_path and vocabularies of ~300 tokens keep every prepare well under a second."""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from helpers import REPO, run_module
from jaxformer.config import DataConfig, TokenizerConfig, register_configs
from jaxformer.data.corpus import SPLITS, Corpus, decode_utf8, split_of
from jaxformer.data.prepare import PrepareConfig, prepare
from jaxformer.data.shards import Shards, array_file, token_dtype
from jaxformer.data.tokenizers import (
    EOS_ID, NUM_SPECIAL, SPECIAL_TOKENS, char_tokenizer, load_tokenizer, token_byte_lengths,
    train_bpe,
)
from jaxformer.errors import UserError

register_configs()
VOCAB, SENTINELS = 320, 4  # 256 bytes + 5 special + 4 sentinels + a few dozen merges
PROPERTY = settings(max_examples=60, deadline=None)  # tokenizer calls: no per-example deadline
WORDS = ("alpha beta gamma delta épsilon ζήτα 数据 naïve café def return import self "
         "for while lambda yield").split()


def texts(count: int, seed: int = 0) -> list[str]:
    """`count` distinct multi-line documents of WORDS."""
    rng = np.random.default_rng(seed)
    return [f"doc {i}: " + "\n".join(" ".join(rng.choice(WORDS, 6)) for _ in range(3))
            for i in range(count)]


def write_texts(folder: Path, documents: list[str], suffix: str = ".txt") -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / f"doc{i:03d}{suffix}" for i in range(len(documents))]
    for path, text in zip(paths, documents):
        path.write_text(text, encoding="utf-8")
    return paths


def config(tmp_path: Path, *paths: str, **data) -> PrepareConfig:
    data = {"paths": list(paths) or [str(tmp_path / "corpus" / "**" / "*.txt")],
            "out_dir": str(tmp_path / "out"), "validation_fraction": 0.3, **data}
    return PrepareConfig(DataConfig(**data),
                         TokenizerConfig(vocab_size=VOCAB, min_frequency=1, sentinels=SENTINELS))


def split_texts(shards: Shards, split: str) -> list[str]:
    part = shards.splits[split]
    return [shards.tokenizer.decode(part.document(i)[:-1].tolist())
            for i in range(part.num_documents)]


@pytest.fixture(scope="module")
def bpe() -> Tokenizer:
    tokenizer = train_bpe(texts(40), vocab_size=VOCAB, min_frequency=1, sentinels=SENTINELS)
    tokenizer.encode_special_tokens = True  # as prepare encodes: "<eos>" in a text is text
    return tokenizer


@pytest.fixture(scope="module")
def gpt2_style(tmp_path_factory) -> Path:
    """A folder holding a tokenizer.json laid out as GPT-2's Hugging Face one (byte-level BPE,
    `<|endoftext|>` last, byte-level post-processor); GPT-2's own is not available offline."""
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    tokenizer.train_from_iterator(texts(40), trainers.BpeTrainer(
        vocab_size=300, min_frequency=1, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    tokenizer.add_special_tokens(["<|endoftext|>"])
    folder = tmp_path_factory.mktemp("gpt2_style")
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


# -- tokenizers -----------------------------------------------------------------------------------
def test_trained_bpe_keeps_the_special_ids_then_sentinels_then_bytes(bpe):
    assert [bpe.id_to_token(i) for i in range(NUM_SPECIAL)] == list(SPECIAL_TOKENS)
    assert [bpe.id_to_token(NUM_SPECIAL + i) for i in range(SENTINELS)] == [
        f"<extra_id_{i}>" for i in range(SENTINELS)]
    assert bpe.get_vocab_size() == VOCAB


@PROPERTY
@given(raw=st.binary(max_size=200), text=st.text(max_size=100))
def test_bpe_round_trips_any_text(bpe, raw, text):
    for sample in (raw.decode("utf-8", errors="replace"), text, text + " <eos> <pad>"):
        assert bpe.decode(bpe.encode(sample).ids) == sample


@PROPERTY
@given(text=st.text(max_size=100))
def test_token_byte_lengths_add_up_to_the_utf8_bytes(bpe, gpt2_style, text):
    gpt2 = load_tokenizer(gpt2_style / "tokenizer.json")
    for tokenizer in (bpe, gpt2):
        lengths = token_byte_lengths(tokenizer)
        assert lengths.dtype == np.int32 and len(lengths) == tokenizer.get_vocab_size()
        assert lengths[tokenizer.encode(text).ids].sum() == len(text.encode("utf-8"))


def test_token_byte_lengths_of_special_and_character_tokens():
    tokenizer = char_tokenizer("aé数")
    lengths = token_byte_lengths(tokenizer)
    assert lengths[:NUM_SPECIAL].tolist() == [0] * NUM_SPECIAL
    assert lengths[NUM_SPECIAL:].tolist() == [1, 2, 3]
    ids = tokenizer.encode("a数éa").ids
    assert lengths[ids].sum() == len("a数éa".encode("utf-8"))


def test_the_vocabulary_must_hold_the_bytes_and_the_special_tokens():
    with pytest.raises(UserError, match=r"tokenizer.vocab_size=300 is smaller .* use "
                                        r"tokenizer.vocab_size >= 361"):
        PrepareConfig(tokenizer=TokenizerConfig(vocab_size=300))
    PrepareConfig(tokenizer=TokenizerConfig(vocab_size=300, sentinels=0))
    PrepareConfig(tokenizer=TokenizerConfig(vocab_size=100, path="tokenizer.json"))  # loaded: any


def test_token_dtype():
    assert (token_dtype(65536), token_dtype(65537)) == ("uint16", "uint32")


# -- the corpus -----------------------------------------------------------------------------------
def test_split_is_seeded_and_deterministic():
    documents = [text.encode() for text in texts(200)]
    first = [split_of(d, 0, 0.3) for d in documents]
    assert first == [split_of(d, 0, 0.3) for d in documents]
    assert first != [split_of(d, 1, 0.3) for d in documents]
    assert 30 < first.count("validation") < 90


def test_bytes_that_are_not_utf8_are_replaced_and_counted():
    assert decode_utf8("café".encode()) == ("café", 0)
    # \xe9 then a space, \xff, \xfe: three replaced; a U+FFFD already there is not counted
    text, replaced = decode_utf8(b"caf\xe9 \xff\xfe ok \xef\xbf\xbd")
    assert replaced == 3 and text == "caf\ufffd \ufffd\ufffd ok \ufffd"


def test_text_blank_line_jsonl_and_parquet_documents(tmp_path):
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "a.txt").write_text("one\nstill one\n\n  \n\ntwo\n\n")
    with (tmp_path / "c" / "b.jsonl").open("w") as f:
        f.write(json.dumps({"body": "three \u2028 line"}) + "\n\n")
        f.write(json.dumps({"body": "four", "other": 1}) + "\n")
        f.write('{"body": "lone \\ud800 surrogate"}\n')
    (tmp_path / "c" / "b2.jsonl").write_bytes(b'\xef\xbb\xbf{"body": "after a BOM"}\n')
    pq.write_table(pa.table({"body": ["five", None, "six"], "n": [1, 2, 3]}),
                   tmp_path / "c" / "c.parquet")
    (tmp_path / "c" / "d.txt").write_bytes(b"bad \xff byte")
    (tmp_path / "c" / "skip.txt").write_text("excluded")
    data = DataConfig(paths=[str(tmp_path / "c" / "*")], exclude=["*/skip.txt"],
                      documents="blank_line", text_field="body")
    corpus = Corpus(data)
    assert list(corpus.documents()) == ["one\nstill one", "two", "three \u2028 line", "four",
                                        "lone \ufffd surrogate", "after a BOM", "five", "six",
                                        "bad \ufffd byte"]
    assert corpus.replaced_characters == 2
    assert list(Corpus(DataConfig(paths=[str(tmp_path / "c" / "a.txt")])).documents()) == [
        "one\nstill one\n\n  \n\ntwo\n\n"]


# -- prepare: the shards ---------------------------------------------------------------------------
def test_shard_format(tmp_path):
    documents = texts(40)
    write_texts(tmp_path / "corpus", documents)
    (tmp_path / "corpus" / "empty.txt").write_text(" \n\t\n")  # skipped
    prepared = prepare(config(tmp_path))
    out = tmp_path / "out"
    manifest = json.loads((out / "manifest.json").read_text())
    assert prepared.built and manifest == prepared.manifest
    assert (manifest["format"], manifest["dtype"], manifest["eos_id"]) == (1, "uint16", EOS_ID)
    assert manifest["tokenizer"]["vocab_size"] == VOCAB and manifest["tokenizer"]["trained"]
    assert len(manifest["sources"]) == 41 and manifest["replaced_characters"] == 0
    decoded = {}
    for split in SPLITS:
        tokens = np.load(out / array_file(split, "tokens"), mmap_mode="r")
        docs = np.load(out / array_file(split, "docs"))
        doc_bytes = np.load(out / array_file(split, "doc_bytes"))
        assert tokens.dtype == np.uint16 and docs.dtype == doc_bytes.dtype == np.int64
        assert docs[0] == 0 and docs[-1] == len(tokens) and len(docs) == len(doc_bytes) + 1
        assert (tokens[docs[1:] - 1] == EOS_ID).all()  # one <eos> ends each document ...
        assert (tokens == EOS_ID).sum() == len(doc_bytes)  # ... and nothing else is <eos>
        counts = manifest["splits"][split]
        assert counts == {"documents": len(doc_bytes), "tokens": len(tokens),
                          "bytes": int(doc_bytes.sum())}
        decoded[split] = split_texts(Shards.open(out), split)
        assert [len(text.encode()) for text in decoded[split]] == doc_bytes.tolist()
    # every document once, in one split, in corpus order, as its seeded hash says
    assert sorted(decoded["train"] + decoded["validation"]) == sorted(documents)
    for split in SPLITS:
        assert decoded[split] == [d for d in documents if split_of(d.encode(), 0, 0.3) == split]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]  # no staging left


def test_split_follows_the_seed(tmp_path):
    write_texts(tmp_path / "corpus", texts(40))
    first = prepare(config(tmp_path)).manifest["splits"]
    assert prepare(config(tmp_path, out_dir=str(tmp_path / "again"))).manifest["splits"] == first
    reseeded = Shards.open(prepare(config(tmp_path, out_dir=str(tmp_path / "seed1"),
                                          split_seed=1)).out_dir)
    assert split_texts(reseeded, "validation") != split_texts(Shards.open(tmp_path / "out"),
                                                              "validation")


def test_jsonl_parquet_and_non_utf8_sources_are_prepared(tmp_path):
    documents = texts(30)
    folder = tmp_path / "mixed"
    folder.mkdir()
    with (folder / "a.jsonl").open("w") as f:
        f.writelines(json.dumps({"text": text}) + "\n" for text in documents[:10])
    pq.write_table(pa.table({"text": documents[10:20]}), folder / "b.parquet")
    write_texts(folder, documents[20:])
    (folder / "z.txt").write_bytes(b"caf\xe9 \xff ok")
    prepared = prepare(config(tmp_path, str(folder / "*")))
    assert prepared.manifest["replaced_characters"] == 2
    shards = Shards.open(prepared.out_dir)
    assert sorted(split_texts(shards, "train") + split_texts(shards, "validation")) == sorted(
        [*documents, "caf\ufffd \ufffd ok"])


def test_a_loaded_tokenizer_json_is_used_as_it_is(tmp_path, gpt2_style):
    write_texts(tmp_path / "corpus", texts(20))
    cfg = config(tmp_path)
    cfg.tokenizer.path = str(gpt2_style)  # a folder holding tokenizer.json
    manifest = prepare(cfg).manifest
    source = load_tokenizer(gpt2_style / "tokenizer.json")
    assert manifest["eos_id"] == source.token_to_id("<|endoftext|>") == 300
    assert not manifest["tokenizer"]["trained"]
    assert (tmp_path / "out" / "tokenizer.json").read_bytes() == (
        gpt2_style / "tokenizer.json").read_bytes()
    assert not prepare(cfg).built


# -- prepare: idempotent ---------------------------------------------------------------------------
def test_rerun_does_nothing_and_a_change_rebuilds(tmp_path):
    paths = write_texts(tmp_path / "corpus", texts(20))
    cfg = config(tmp_path)
    first = prepare(cfg)
    manifest_file = tmp_path / "out" / "manifest.json"
    written = manifest_file.stat().st_mtime_ns
    again = prepare(cfg)
    assert not again.built and again.manifest == first.manifest
    os.utime(paths[0], ns=(1, 1))  # touched, same bytes: the sha256 says unchanged
    assert not prepare(cfg).built and manifest_file.stat().st_mtime_ns == written
    paths[0].write_text("a changed document")
    changed = prepare(cfg)
    assert changed.built and "1 source(s) changed" in changed.reason
    assert "a changed document" in split_texts(Shards.open(tmp_path / "out"), "train") + \
        split_texts(Shards.open(tmp_path / "out"), "validation")
    write_texts(tmp_path / "corpus" / "more", ["a new file"])
    assert "1 added, 0 removed" in prepare(cfg).reason
    cfg.tokenizer.min_frequency = 2
    assert "tokenizer.min_frequency 1 -> 2" in prepare(cfg).reason
    (tmp_path / "out" / "train.docs.npy").unlink()
    assert "lacks train.docs.npy" in prepare(cfg).reason
    assert not prepare(cfg).built


# -- bad inputs ------------------------------------------------------------------------------------
def no_glob_match(tmp_path):
    return config(tmp_path, str(tmp_path / "nowhere" / "*.txt"))


def empty_corpus(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("")
    (tmp_path / "corpus" / "b.txt").write_text("  \n\n\t")
    return config(tmp_path)


def jsonl_line(line: str):
    def make(tmp_path):
        (tmp_path / "corpus").mkdir()
        (tmp_path / "corpus" / "a.jsonl").write_text(f'{{"text": "fine"}}\n{line}\n')
        return config(tmp_path, str(tmp_path / "corpus" / "*.jsonl"))
    return make


def parquet_without_column(tmp_path):
    (tmp_path / "corpus").mkdir()
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "corpus" / "a.parquet")
    return config(tmp_path, str(tmp_path / "corpus" / "*.parquet"))


def not_parquet(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.parquet").write_text("plain text")
    return config(tmp_path, str(tmp_path / "corpus" / "*.parquet"))


def everything_excluded(tmp_path):
    write_texts(tmp_path / "corpus", texts(3))
    return config(tmp_path, exclude=["**/corpus/*"])


def tokenizer_path(name: str, content: str | None):
    def make(tmp_path):
        write_texts(tmp_path / "corpus", texts(20))
        if content is not None:
            (tmp_path / name).write_text(content)
        cfg = config(tmp_path)
        cfg.tokenizer.path = str(tmp_path / name)
        return cfg
    return make


def unwritable_out_dir(tmp_path):
    write_texts(tmp_path / "corpus", texts(20))
    (tmp_path / "a_file").write_text("")
    return config(tmp_path, out_dir=str(tmp_path / "a_file" / "out"))


def out_dir_of_other_files(tmp_path):
    write_texts(tmp_path / "corpus", texts(20))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    return config(tmp_path)


def one_document(tmp_path):
    write_texts(tmp_path / "corpus", ["just one"])
    return config(tmp_path)


BAD_INPUTS = {
    "a glob that matches nothing": (no_glob_match, r"data.paths glob .*nowhere.* matches no file"),
    "an empty corpus": (empty_corpus, r"the 2 files data.paths matches hold no text"),
    "a jsonl line that is not JSON": (jsonl_line("{text: oops"), r"a.jsonl:2 is not JSON"),
    "a jsonl line without the field": (jsonl_line('{"body": "x"}'),
                                       r"a.jsonl:2 has no field 'text': set data.text_field"),
    "a jsonl field that is not text": (jsonl_line('{"text": 3}'),
                                       r"a.jsonl:2 field 'text' holds int"),
    "a parquet file without the column": (parquet_without_column,
                                          r"a.parquet has no column 'text' \(columns: body\)"),
    "a .parquet file that is not parquet": (not_parquet,
                                            r"a.parquet is not a readable parquet file"),
    "an exclude that leaves nothing": (everything_excluded,
                                       r"data.exclude=.* leaves none of the 3 files"),
    "a tokenizer.path that is not a tokenizer.json": (
        tokenizer_path("tok.json", "not json"), r"tokenizer.path .*tok.json is not a Hugging Face"),
    "a tokenizer.path that does not exist": (tokenizer_path("missing.json", None),
                                             r"tokenizer.path=.*missing.json does not exist"),
    "a tokenizer folder without tokenizer.json": (tokenizer_path(".", None),
                                                  r"is a folder without a tokenizer.json"),
    "an unwritable out_dir": (unwritable_out_dir, r"data.out_dir=.*a_file/out is not writable"),
    "an out_dir holding other files": (out_dir_of_other_files,
                                       r"holds files but no manifest.json .* choose another"),
    "a split left empty": (one_document,
                           r"all 1 documents .* fell in the (train|validation) split"),
}


@pytest.mark.parametrize("make_config, message", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, make_config, message):
    cfg = make_config(tmp_path)
    before = sorted(p.name for p in tmp_path.rglob("*"))
    with pytest.raises(UserError, match=message) as raised:
        prepare(cfg)
    assert "\n" not in str(raised.value)
    assert sorted(p.name for p in tmp_path.rglob("*")) == before  # nothing half-written


def test_a_failed_rebuild_keeps_the_previous_shards(tmp_path):
    write_texts(tmp_path / "corpus", texts(20))
    cfg = config(tmp_path)
    manifest = prepare(cfg).manifest
    (tmp_path / "corpus" / "doc000.txt").write_bytes(b"")
    (tmp_path / "corpus" / "bad.jsonl").write_text("not json\n")
    cfg.data.paths = [str(tmp_path / "corpus" / "*")]
    with pytest.raises(UserError, match="bad.jsonl:1 is not JSON"):
        prepare(cfg)
    assert Shards.open(tmp_path / "out").manifest == manifest
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corpus", "out"]


def test_shards_open_refuses_a_missing_or_broken_out_dir(tmp_path):
    rerun = "run python -m jaxformer.prepare data.out_dir="
    with pytest.raises(UserError, match=f"no such folder.*{rerun}"):
        Shards.open(tmp_path / "out")
    (tmp_path / "out").mkdir()
    with pytest.raises(UserError, match=f"has no manifest.json .*{rerun}"):
        Shards.open(tmp_path / "out")
    write_texts(tmp_path / "corpus", texts(20))
    prepare(config(tmp_path))  # an empty out_dir is replaced
    tokens = tmp_path / "out" / "train.tokens.npy"
    tokens.write_bytes(tokens.read_bytes()[:-8])
    with pytest.raises(UserError, match=f"train.tokens.npy is missing or unreadable.*{rerun}"):
        Shards.open(tmp_path / "out")
    (tmp_path / "out" / "manifest.json").write_text("{")
    with pytest.raises(UserError, match=f"manifest.json is unreadable.*{rerun}"):
        Shards.open(tmp_path / "out")


# -- the app ---------------------------------------------------------------------------------------
def test_the_default_config_prepares_the_stdlib():
    from hydra import compose, initialize_config_dir

    from jaxformer.cli.prepare import to_prepare_config  # registers the app's schema

    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = to_prepare_config(compose(config_name="prepare"))
    stdlib = sysconfig.get_paths()["stdlib"]
    assert cfg.data.paths == [f"{stdlib}/**/*.py"] and cfg.data.out_dir == "data/python_stdlib"
    assert "**/site-packages/**" in cfg.data.exclude and cfg.tokenizer.vocab_size == 8192


def test_cli_end_to_end(tmp_path):
    write_texts(tmp_path / "corpus", texts(20))
    args = [f"data.paths=[{tmp_path}/corpus/*.txt]", f"data.out_dir={tmp_path}/out",
            "tokenizer.vocab_size=300", "tokenizer.sentinels=4", "data.validation_fraction=0.3",
            f"hydra.run.dir={tmp_path}/hydra"]
    done = run_module("jaxformer.prepare", *args)
    assert done.returncode == 0, done.stderr
    assert f"prepared {tmp_path}/out" in done.stdout and "validation" in done.stdout
    assert Shards.open(tmp_path / "out").manifest["splits"]["train"]["documents"] > 0
    again = run_module("jaxformer.prepare", *args)
    assert again.returncode == 0 and "is up to date" in again.stdout


@pytest.mark.parametrize("override, message", [
    ("data.paths=[/nowhere/*.txt]", "error: data.paths glob '/nowhere/*.txt' matches no file"),
    ("tokenizer.vocab_size=300", "error: tokenizer.vocab_size=300 is smaller than the 256 bytes"),
])
def test_cli_bad_input_is_one_line_exit_2(tmp_path, override, message):
    done = run_module("jaxformer.prepare", override, f"data.out_dir={tmp_path}/out",
                      f"hydra.run.dir={tmp_path}/hydra")
    assert done.returncode == 2 and done.stderr.startswith(message), done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and not (tmp_path / "out").exists()
