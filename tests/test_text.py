"""Language modelling on a prepared corpus (task=text): packed rows, document masking, positions
per document, bits per byte, training, resume and bad inputs."""

from __future__ import annotations

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import replace, tiny_config, write_corpus
from jaxformer.config import ModelConfig, TaskConfig
from jaxformer.data.pipeline import train_iterator
from jaxformer.data.tasks import build_task
from jaxformer.data.tokenizers import EOS_ID
from jaxformer.errors import UserError
from jaxformer.models import build_model
from jaxformer.objectives import OBJECTIVES
from jaxformer.runs import TIMING_KEYS, RunDir
from jaxformer.training.loop import train

WORDS = "the quick brown fox jumps over a lazy dog and runs far away".split()


def documents(n: int, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=rng.integers(3, 30))) + "." for _ in range(n)]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"), documents(120, 0), documents(20, 1))


def text_task(corpus, **fields):
    return build_task(TaskConfig(name="text", data_dir=str(corpus), seq_len=32, eval_size=8,
                                 **fields))


def text_config(corpus, **trainer):
    config = tiny_config(**{"steps": 6, "eval_every": 3, "checkpoint_every": 3, **trainer})
    return replace(config, model={"max_len": 32},
                   task={"name": "text", "data_dir": str(corpus), "seq_len": 32, "eval_size": 8})


# -- rows -------------------------------------------------------------------------------------------
def test_rows_are_windows_of_the_stream_with_segments_and_positions_per_document(corpus):
    task = text_task(corpus)
    split = task.splits["train"]
    tokens, segments, positions = task.rows("train", np.array([0, 3]))
    assert tokens.shape == segments.shape == positions.shape == (2, 33)
    np.testing.assert_array_equal(tokens[1], split.tokens[96:129])  # row r starts at r * seq_len
    np.testing.assert_array_equal(tokens[0, -1], tokens.reshape(-1)[0 + 32])  # rows share a token
    for row in range(2):
        starts = np.flatnonzero(np.diff(segments[row]) != 0) + 1  # a new document begins
        assert (tokens[row, starts - 1] == EOS_ID).all()  # ... right after an <eos>
        assert (positions[row, starts] == 0).all() and positions[row, 0] == 0
        assert (np.diff(positions[row])[np.diff(segments[row]) == 0] == 1).all()
    plain = text_task(corpus, document_masking=False).rows("train", np.array([3]))
    np.testing.assert_array_equal(plain[0][0], tokens[1])
    assert (plain[1] == 0).all() and (plain[2] == np.arange(33)).all()


def test_document_masking_keeps_each_document_to_itself():
    """Changing document A never changes document B's logits in the same packed row."""
    model = build_model(ModelConfig(vocab_size=40, d_model=32, n_heads=2, n_layers=2, d_ff=64,
                                    max_len=16, positions="learned"), seed=0)
    rng = np.random.default_rng(0)
    tokens = rng.integers(5, 40, (1, 16)).astype(np.int32)
    segments = np.array([[0] * 6 + [1] * 10], np.int32)
    positions = np.array([list(range(6)) + list(range(10))], np.int32)
    other = tokens.copy()
    other[0, :6] = rng.integers(5, 40, 6)  # document A rewritten
    logits = [model(jnp.asarray(t), segment_ids_bt=jnp.asarray(segments),
                    positions_bt=jnp.asarray(positions)) for t in (tokens, other)]
    np.testing.assert_array_equal(logits[0][0, 6:], logits[1][0, 6:])  # B: bit for bit
    assert not np.allclose(logits[0][0, :6], logits[1][0, :6])
    # document B alone, at positions 0..9, gives the same logits as inside the packed row
    alone = model(jnp.asarray(tokens[:, 6:]))
    np.testing.assert_allclose(alone[0], logits[0][0, 6:], atol=1e-5)
    unmasked = model(jnp.asarray(other))  # without masking, A leaks into B
    assert not np.allclose(unmasked[0, 6:], logits[1][0, 6:])


# -- bits per byte ------------------------------------------------------------------------------------
def test_bits_per_byte_is_total_nats_over_ln2_bytes(corpus):
    task = text_task(corpus)
    objective = OBJECTIVES["text_clm"]
    data = objective.eval_set(task)
    model = build_model(objective.model_config(ModelConfig(d_model=32, n_heads=2, n_layers=1,
                                                           d_ff=64, max_len=32), task), seed=0)
    from flax import nnx

    from jaxformer.training.evaluation import eval_loss
    from jaxformer.training.step import make_eval_step

    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    metrics = eval_loss(make_eval_step(graphdef, rest, objective), params, data, 3, objective)
    tokens = data.examples["tokens"]
    logits = model(jnp.asarray(tokens[:, :-1]), segment_ids_bt=jnp.asarray(
        data.examples["segment_ids"][:, :-1]), positions_bt=jnp.asarray(
            data.examples["positions"][:, :-1]))
    nats = -np.take_along_axis(np.asarray(jax.nn.log_softmax(logits)), tokens[:, 1:, None],
                               axis=-1).sum()
    decoded_bytes = sum(len(task.tokenizer.decode(row.tolist()).encode()) for row in tokens[:, 1:])
    assert decoded_bytes == data.examples["target_bytes"].sum()  # <eos> decodes to nothing
    assert metrics["bpb"] == pytest.approx(nats / (math.log(2) * decoded_bytes), rel=1e-5)
    assert metrics["perplexity"] == pytest.approx(math.exp(metrics["loss"]), rel=1e-6)


# -- training -------------------------------------------------------------------------------------
def test_decoder_trains_on_text_and_reports_bits_per_byte(corpus, tmp_path):
    result = train(text_config(corpus, steps=12, eval_every=12, checkpoint_every=12), tmp_path)
    assert result.objective == "text_clm"
    losses = [r["loss"] for r in RunDir(tmp_path).metrics("train")]
    assert losses[-1] < losses[0]
    assert RunDir(tmp_path).metrics("train")[-1]["epoch"] == pytest.approx(
        12 * 16 / text_task(corpus).train_rows)
    evals = RunDir(tmp_path).metrics("eval")
    assert {"loss", "accuracy", "bpb", "perplexity"} <= set(evals[-1])
    assert 0 < result.eval_metrics["bpb"] < 8


def test_resume_mid_epoch_on_text_is_bit_identical(corpus, tmp_path):
    # a constant learning rate: a 3-step run is then the first 3 steps of a 6-step run
    config = replace(text_config(corpus, steps=6, checkpoint_every=3, eval_every=3),
                     optim={"schedule": "constant", "warmup_steps": 0})
    straight = train(config, tmp_path / "straight")
    assert train(replace(config, trainer={"steps": 3}), tmp_path / "resumed").step == 3
    resumed = train(config, tmp_path / "resumed")
    assert resumed.eval_metrics == straight.eval_metrics

    def records(run):
        return [{k: v for k, v in r.items() if k not in TIMING_KEYS}
                for r in RunDir(tmp_path / run).metrics() if r["split"] != "summary"]
    assert records("resumed") == records("straight")


def test_the_pipeline_reads_every_training_row_once_per_epoch(corpus):
    task = text_task(corpus)
    batch_size = 2
    iterator = train_iterator(task, OBJECTIVES["text_clm"], batch_size, seed=0)
    epoch = np.concatenate([next(iterator)["tokens"] for _ in range(task.train_rows // batch_size)])
    every_row, _, _ = task.rows("train", np.arange(task.train_rows))
    seen = [row.tobytes() for row in epoch]
    assert len(set(seen)) == len(seen)  # no row twice in an epoch
    assert set(seen) <= {row.tobytes() for row in every_row}  # ... and only rows of the corpus
    assert len(seen) >= len(every_row) - 1  # all of them (the last odd one waits for the next)
    assert not np.array_equal(epoch, every_row[: len(epoch)])  # shuffled


# -- bad inputs -----------------------------------------------------------------------------------
def test_text_bad_inputs_are_one_line(corpus, tmp_path):
    with pytest.raises(UserError, match="holds no prepared corpus .* python -m jaxformer.prepare"):
        text_task(tmp_path)
    with pytest.raises(UserError, match="needs 32 positions for the text_clm objective but "
                                        "model.max_len=16"):
        train(replace(text_config(corpus), model={"max_len": 16}), tmp_path / "run")
    small = write_corpus(tmp_path / "small", documents(30, 2), ["a b."])
    with pytest.raises(UserError, match="fewer than one row of task.seq_len=32"):
        text_task(small)
    with pytest.raises(UserError, match="span corruption needs 2 sentinel tokens"):
        train(replace(text_config(corpus), model={"kind": "encoder_decoder"}), tmp_path / "ed")


# -- text in, text out ----------------------------------------------------------------------------
def test_sample_continues_text_with_the_runs_tokenizer(corpus, tmp_path, caplog):
    from jaxformer.config import SamplingConfig
    from jaxformer.inference.sampling import SampleConfig, sample_run

    train(text_config(corpus, steps=3, eval_every=3, checkpoint_every=3), tmp_path)
    config = SampleConfig(checkpoint=str(tmp_path), prompt="the quick",
                          sampling=SamplingConfig(num_samples=3, max_new_tokens=8, seed=1))
    sampled = sample_run(config)
    assert sampled.kind == "decoder" and len(sampled.texts) == 3
    assert all(0 < n <= 8 for n in sampled.lengths)
    long_prompt = SampleConfig(checkpoint=str(tmp_path), prompt="a " * 40,
                               sampling=SamplingConfig(num_samples=1, max_new_tokens=1))
    assert len(sample_run(long_prompt).texts) == 1  # cut from the left to fit the context
    assert "keeping its last 31 tokens" in caplog.text


def test_encoder_masked_lm_on_text_masks_text_tokens_within_documents(corpus, tmp_path):
    task = text_task(corpus, mask_prob=0.3)
    objective = OBJECTIVES["text_mlm"]
    batch = objective.randomize(task, objective.encode(task, np.arange(20)),
                                np.random.default_rng(0))
    selected = batch["loss_mask"] > 0
    assert not (selected & (batch["targets"] == EOS_ID)).any()  # never a special token
    assert abs(selected.mean() - 0.3 * (batch["targets"] != EOS_ID).mean()) < 0.03
    assert (batch["inputs"][~selected] == batch["targets"][~selected]).all()
    result = train(replace(text_config(corpus, steps=6, eval_every=6, checkpoint_every=6),
                           model={"kind": "encoder"}), tmp_path)
    assert result.objective == "text_mlm" and {"loss", "accuracy", "perplexity"} <= set(
        result.eval_metrics)


def test_reference_bits_per_byte_are_computed_on_the_same_bytes(corpus):
    task = text_task(corpus)
    data = OBJECTIVES["text_clm"].eval_set(task)
    targets = data.examples["tokens"][:, 1:]
    counts = np.bincount(np.asarray(task.splits["train"].tokens), minlength=len(task.token_bytes))
    probs = (counts + 1) / (counts.sum() + len(counts))
    expected = -np.log2(probs[targets]).sum() / data.examples["target_bytes"].sum()
    assert data.references["unigram_bpb"] == pytest.approx(expected)
    assert 0 < data.references["zlib_bpb"] < 8  # repetitive text compresses


# -- span corruption (the encoder-decoder) ----------------------------------------------------------
def test_span_corruption_targets_reconstruct_the_input(tmp_path):
    from jaxformer.objectives.span_corruption import span_counts

    corpus = write_corpus(tmp_path / "c", documents(80, 3), documents(20, 4), sentinels=8)
    task = text_task(corpus)
    objective = OBJECTIVES["span_corruption"]
    noise, spans = span_counts(32, 0.15, 3.0)
    assert (noise, spans) == (5, 2)
    rows = objective.encode(task, np.arange(12))
    batch = objective.randomize(task, rows, np.random.default_rng(0))
    assert batch["src"].shape == (12, 32 - noise + spans + 1) and batch["tgt"].shape == (
        12, 1 + noise + spans + 1)
    sentinels = objective.sentinel_ids(task.tokenizer, spans)
    for tokens, src, tgt in zip(rows["tokens"], batch["src"], batch["tgt"]):
        hidden = {}  # sentinel -> the tokens it stands for, read off the target
        body = tgt[1:-1]
        marks = np.flatnonzero(np.isin(body, sentinels))
        for start, end in zip(marks, [*marks[1:], len(body)]):
            hidden[body[start]] = body[start + 1:end].tolist()
        assert all(len(span) >= 1 for span in hidden.values()) and len(hidden) == spans
        rebuilt = [t for s in src[:-1] for t in (hidden[s] if s in hidden else [s])]
        assert rebuilt == tokens.tolist() and src[-1] == tgt[-1] == EOS_ID
    again = objective.randomize(task, rows, np.random.default_rng(1))
    assert not np.array_equal(again["src"], batch["src"])  # spans drawn per batch
    result = train(replace(text_config(corpus, steps=4, eval_every=4, checkpoint_every=4),
                           model={"kind": "encoder_decoder"}), tmp_path / "run")
    assert result.objective == "span_corruption" and result.eval_metrics["loss"] > 0


def test_load_run_generates_and_scores_text(corpus, tmp_path):
    import jaxformer

    train(text_config(corpus, steps=3, eval_every=3, checkpoint_every=3), tmp_path)
    run = jaxformer.load_run(tmp_path)
    assert run.step == 3 and run.objective == "text_clm"  # (config: .hydra/ of CLI runs)
    assert len(run.generate("the quick", max_new_tokens=5)) == 1  # greedy by default
    text = "the lazy dog runs far. a quick fox jumps over the dog and runs away, far away."
    scored = run.score(text)
    assert scored["bytes"] == len(text.encode()) and scored["tokens"] == len(text)
    ids = [EOS_ID, *run.tokenizer.encode(text).ids]
    nats = 0.0
    for start in range(0, len(ids) - 1, 32):  # windows of the context, overlapping by one
        window = ids[start:start + 33]
        logits = run.model(jnp.asarray([window[:-1]]))
        nats -= np.take_along_axis(np.asarray(jax.nn.log_softmax(logits[0])),
                                   np.asarray(window[1:])[:, None], axis=-1).sum()
    assert scored["nats"] == pytest.approx(nats, rel=1e-5)
    assert scored["bpb"] == pytest.approx(nats / (math.log(2) * len(text.encode())), rel=1e-5)


def test_resuming_on_shards_of_another_tokenizer_is_refused(tmp_path):
    corpus = write_corpus(tmp_path / "c", documents(120, 0), documents(20, 1))
    # a fixed embedding table, so only the tokenizer differs, not the model's shape
    config = replace(text_config(corpus, steps=3, eval_every=3, checkpoint_every=3),
                     model={"vocab_size": 40})
    train(config, tmp_path / "run")
    (tmp_path / "run" / "finished.json").unlink()
    write_corpus(corpus, documents(120, 0), documents(20, 1), sentinels=2)  # prepared again
    with pytest.raises(UserError, match="were made with another tokenizer than the checkpoints"):
        train(replace(config, trainer={"steps": 6}), tmp_path / "run")


def test_evaluate_scores_text_files_per_document(corpus, tmp_path):
    from helpers import run_module

    train(text_config(corpus, steps=3, eval_every=3, checkpoint_every=3), tmp_path / "run")
    (tmp_path / "docs").mkdir()
    for i, doc in enumerate(documents(3, 7)):
        (tmp_path / "docs" / f"{i}.txt").write_text(doc)
    done = run_module("jaxformer.evaluate", f"checkpoint={tmp_path / 'run'}",
                      f"text={tmp_path / 'docs'}/*.txt", f"out_dir={tmp_path / 'out'}")
    assert done.returncode == 0, done.stderr[-2000:]
    scores = json.loads((tmp_path / "out" / "text_scores.json").read_text())
    assert len(scores["documents"]) == 3 and "bits per byte" in done.stdout
    total = sum(d["nats"] for d in scores["documents"]) / (math.log(2) * scores["bytes"])
    assert scores["bpb"] == pytest.approx(total)
    missing = run_module("jaxformer.evaluate", f"checkpoint={tmp_path / 'run'}",
                         f"text={tmp_path}/nothing*.txt")
    assert missing.returncode == 2 and "matches no file" in missing.stderr


def test_embed_reads_a_text_trained_encoder(corpus, tmp_path):
    from jaxformer.inference.embeddings import EmbedConfig, run_embed

    train(replace(text_config(corpus, steps=3, eval_every=3, checkpoint_every=3),
                  model={"kind": "encoder"}), tmp_path / "run")
    lines = tmp_path / "lines.txt"
    lines.write_text("the quick brown fox.\na lazy dog runs away.\n")
    out, embeddings, texts = run_embed(EmbedConfig(model_dir=str(tmp_path / "run"),
                                                   input=str(lines)))
    assert embeddings.shape == (2, 32) and np.allclose(np.linalg.norm(embeddings, axis=1), 1.0)
