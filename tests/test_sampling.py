"""KV-cache decoding: cached == full-forward greedy for both generative families (every position
kind, ragged prompts), log-probs == teacher forcing, the warped sampling distribution, top-k /
top-p edge cases, beam search, per-prompt keys, and clear errors."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxformer.config import ModelConfig, TaskConfig
from jaxformer.data.tasks import build_task
from jaxformer.data.tokenizers import BOS_ID, EOS_ID, PAD_ID
from jaxformer.models import build_model
from jaxformer.models.attention import KVCache
from jaxformer.models.blocks import DecodeCache, LayerCache
from jaxformer.models.decoding import generate, generate_seq2seq, sample_logits, until_eos
from jaxformer.objectives import OBJECTIVES

VOCAB, MAX_LEN = 17, 16


@functools.cache
def model(kind: str, positions: str = "learned", scan_layers: bool = True) -> nnx.Module:
    return build_model(ModelConfig(kind=kind, vocab_size=VOCAB, d_model=32, n_heads=4, n_layers=2,
                                   d_ff=64, max_len=MAX_LEN, positions=positions,
                                   scan_layers=scan_layers), seed=0)


def ragged_prompts(seed: int, lens: list[int], width: int) -> tuple[np.ndarray, np.ndarray]:
    """Right-padded <bos> prompts of the given lengths."""
    tokens = np.random.default_rng(seed).integers(5, VOCAB, (len(lens), width)).astype(np.int32)
    tokens[:, 0] = BOS_ID
    lens = np.asarray(lens, np.int32)
    return np.where(np.arange(width) < lens[:, None], tokens, PAD_ID), lens


@functools.partial(jax.jit, static_argnums=0)
def full_forward(graphdef, state, args):
    return nnx.merge(graphdef, state)(*args)


def uncached_greedy(model, buffer_bt: np.ndarray, starts_b: np.ndarray, source: tuple = ()):
    """Reference decoding without a cache: the whole buffer through the model for every position,
    position t + 1 set to the argmax at t once t + 1 is past the row's prompt."""
    buffer_bt = buffer_bt.copy()
    graphdef, state = nnx.split(model)
    for t in range(int(starts_b.min()) - 1, buffer_bt.shape[1] - 1):
        logits = np.asarray(full_forward(graphdef, state, (*source, jnp.asarray(buffer_bt))))
        write = t + 1 >= starts_b
        buffer_bt[write, t + 1] = logits[write, t].argmax(-1)
    return buffer_bt


def teacher_forced_logprobs(model, prompts: list[list[int]], completions: list[list[int]],
                            source: tuple = ()) -> np.ndarray:
    """sum log p(completion | prompt) per row, from one full forward of the padded batch."""
    tokens = np.full((len(prompts), MAX_LEN), PAD_ID, np.int32)
    for row, sequence in enumerate(p + c for p, c in zip(prompts, completions)):
        tokens[row, : len(sequence)] = sequence
    logits = full_forward(*nnx.split(model), (*source, jnp.asarray(tokens)))
    logp = np.asarray(jax.nn.log_softmax(logits, axis=-1))
    return np.asarray([sum(logp[row, len(p) - 1 + t, token] for t, token in enumerate(c))
                       for row, (p, c) in enumerate(zip(prompts, completions))])


# -- cached == uncached ----------------------------------------------------------------------------
@pytest.mark.parametrize("positions, scan_layers", [
    ("learned", True), ("sinusoidal", True), ("rope", True), ("learned", False)])
def test_cached_greedy_decoder_matches_full_forward(positions, scan_layers):
    decoder = model("decoder", positions, scan_layers)
    prompts, lens = ragged_prompts(0, [6, 2, 4, 1], 6)
    total = 14
    done = generate(decoder, prompts, lens, max_new_tokens=total - 1, max_total_len=total,
                    stop_tokens=())
    buffer = np.zeros((4, total), np.int32)
    buffer[:, :6] = prompts
    reference = uncached_greedy(decoder, buffer, lens)
    tokens, lengths = np.asarray(done.tokens[:, 0]), np.asarray(done.lengths[:, 0])
    np.testing.assert_array_equal(lengths, total - lens)  # each row fills the buffer
    for b, n in enumerate(lens):
        np.testing.assert_array_equal(tokens[b, : total - n], reference[b, n:])
        assert np.all(tokens[b, total - n:] == PAD_ID)


# step 12's switches: grouped-query self- and cross-attention (2 kv heads), qk norm, rmsnorm, glu
MODERN = dict(norm_type="rmsnorm", qk_norm=True, mlp="glu", activation="silu", n_kv_heads=2,
              bias=False, tie_embeddings=False)


@pytest.mark.parametrize("positions, switches", [
    ("learned", {}), ("rope", {}), ("rope", MODERN)], ids=["learned", "rope", "rope-gqa"])
def test_cached_greedy_encoder_decoder_matches_full_forward(positions, switches):
    seq2seq = (build_model(ModelConfig(kind="encoder_decoder", vocab_size=VOCAB, d_model=32,
                                       n_heads=4, n_layers=2, d_ff=64, max_len=MAX_LEN,
                                       positions=positions, **switches), seed=0)
               if switches else model("encoder_decoder", positions))
    src = np.random.default_rng(1).integers(5, VOCAB, (3, 7)).astype(np.int32)
    src_valid = (np.arange(7) < np.asarray([7, 3, 5])[:, None]).astype(np.int32)
    done = generate_seq2seq(seq2seq, src, src_valid, max_new_tokens=11, stop_tokens=())
    buffer = np.full((3, 12), PAD_ID, np.int32)
    buffer[:, 0] = BOS_ID
    reference = uncached_greedy(seq2seq, buffer, np.ones(3, np.int32),
                                source=(jnp.asarray(src), jnp.asarray(src_valid)))
    np.testing.assert_array_equal(np.asarray(done.tokens[:, 0]), reference[:, 1:])


@pytest.mark.parametrize("kind", ["decoder", "encoder_decoder"])
def test_decoding_a_model_with_dropout_runs_without_it(kind):
    """Dropout is for training: decoding, like the full forward by default, leaves it off."""
    dropped = build_model(ModelConfig(kind=kind, vocab_size=VOCAB, d_model=32, n_heads=4,
                                      n_layers=2, d_ff=64, max_len=MAX_LEN, dropout=0.5), seed=0)
    prompts, lens = ragged_prompts(2, [3, 1], 3)
    source = () if kind == "decoder" else (jnp.asarray(prompts), jnp.ones(prompts.shape, jnp.int32))
    done = generate(dropped, prompts, lens, max_new_tokens=5, stop_tokens=(), source=source)
    buffer = np.concatenate([prompts, np.full((2, 5), PAD_ID, np.int32)], axis=1)
    reference = uncached_greedy(dropped, buffer, lens, source=source)
    for b, n in enumerate(lens):
        np.testing.assert_array_equal(np.asarray(done.tokens[b, 0, :5]), reference[b, n:n + 5])


def test_training_eval_greedy_is_the_full_forward_greedy():
    """The clm objective's greedy answers (the training loop's eval) on the cached sampler answers as the
    full-forward decoding of the whole training sequence length does."""
    task = build_task(TaskConfig(name="sort", max_length=5, eval_size=12))
    data = OBJECTIVES["clm"].eval_set(task)
    prompts, prompt_lens = data.decode_inputs["prompts"], data.decode_inputs["prompt_lens"]
    decoder = model("decoder")
    texts = OBJECTIVES["clm"].greedy_answers(decoder, data, task, batch_size=8)
    total = data.examples["tokens"].shape[1]
    buffer = np.zeros((len(texts), total), np.int32)
    buffer[:, : prompts.shape[1]] = prompts
    reference = uncached_greedy(decoder, buffer, prompt_lens)
    assert texts == [task.tokenizer.decode(until_eos(row[n:].tolist()))
                     for row, n in zip(reference, prompt_lens)]


# -- what every completion carries -----------------------------------------------------------------
def test_sampled_logprobs_equal_teacher_forcing_and_stop_tokens_end_rows():
    decoder = model("decoder")
    prompts, lens = ragged_prompts(2, [5, 2, 3], 5)
    first = int(generate(decoder, prompts, lens, max_new_tokens=1).tokens[0, 0, 0])
    # a frequent stop token, so some samples end early
    done = generate(decoder, prompts, lens, max_new_tokens=9, key=jax.random.key(3),
                    temperature=1.3, top_k=6, top_p=0.95, num_samples=4, stop_tokens=(first,))
    tokens, lengths = np.asarray(done.tokens), np.asarray(done.lengths)
    assert tokens.shape == (3, 4, 9) and 0 < lengths.min() and lengths.min() < 9
    rows = [(b, j) for b in range(3) for j in range(4)]
    completions = [tokens[b, j, : lengths[b, j]].tolist() for b, j in rows]
    for (b, j), completion in zip(rows, completions):
        assert first not in completion[:-1] and np.all(tokens[b, j, lengths[b, j]:] == PAD_ID)
        assert completion[-1] == first or lengths[b, j] == 9
    expected = teacher_forced_logprobs(decoder, [prompts[b, : lens[b]].tolist() for b, _ in rows],
                                       completions)
    np.testing.assert_allclose(np.asarray(done.logprobs).reshape(-1), expected, atol=1e-4)


def test_seq2seq_logprobs_equal_teacher_forcing():
    seq2seq = model("encoder_decoder")
    src = np.random.default_rng(4).integers(5, VOCAB, (2, 6)).astype(np.int32)
    valid = (np.arange(6) < np.asarray([6, 4])[:, None]).astype(np.int32)
    done = generate_seq2seq(seq2seq, src, valid, max_new_tokens=6, key=jax.random.key(0),
                            temperature=0.7, num_samples=2)
    completions = [np.asarray(done.tokens[b, j, : done.lengths[b, j]]).tolist()
                   for b in range(2) for j in range(2)]
    source = tuple(jnp.asarray(np.repeat(a, 2, axis=0)) for a in (src, valid))
    expected = teacher_forced_logprobs(seq2seq, [[BOS_ID]] * 4, completions, source)
    np.testing.assert_allclose(np.asarray(done.logprobs).reshape(-1), expected, atol=1e-4)


def test_a_sample_depends_on_its_prompt_key_only():
    decoder = model("decoder")
    prompts, lens = ragged_prompts(5, [4, 3, 5], 5)
    keys = jax.random.split(jax.random.key(7), 3)
    kwargs = dict(max_new_tokens=8, temperature=1.0, num_samples=3, stop_tokens=())
    together = generate(decoder, prompts, lens, key=keys, **kwargs)
    alone = generate(decoder, prompts[1:2], lens[1:2], key=keys[1:2], **kwargs)
    np.testing.assert_array_equal(together.tokens[1], alone.tokens[0])
    again = generate(decoder, prompts, lens, key=keys, **kwargs)
    np.testing.assert_array_equal(together.tokens, again.tokens)
    assert len({tuple(row) for row in np.asarray(together.tokens[0]).tolist()}) == 3


# -- the sampling distribution ---------------------------------------------------------------------
LOGITS = np.asarray([2.0, 1.5, 1.4, 0.3, 0.0, -0.5, -1.0, -3.0], np.float32)


def warped_reference(logits: np.ndarray, temperature: float, top_k: int, top_p: float):
    """Hugging Face's warpers spelled out: temperature, top-k, then top-p on what is left."""
    scaled = logits.astype(np.float64) / temperature
    order = np.argsort(-scaled, kind="stable")
    keep = np.zeros(len(logits), bool)
    keep[order[: top_k or len(logits)]] = True
    probs = np.where(keep, np.exp(scaled - scaled.max()), 0.0)
    probs /= probs.sum()
    mass_above = np.cumsum(probs[order]) - probs[order]
    keep[order[mass_above >= top_p]] = False
    probs = np.where(keep, probs, 0.0)
    return probs / probs.sum()


@pytest.mark.parametrize("temperature, top_k, top_p", [
    (1.0, 0, 1.0), (0.7, 3, 1.0), (1.0, 0, 0.8), (1.5, 5, 0.6), (0.5, 0, 0.95), (2.0, 8, 0.99)])
def test_sampler_matches_the_exact_warped_distribution(temperature, top_k, top_p):
    draws = 40_000
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (draws, LOGITS.size))
    ids = np.asarray(sample_logits(jax.random.key(0), logits, temperature, top_k, top_p))
    empirical = np.bincount(ids, minlength=LOGITS.size) / draws
    exact = warped_reference(LOGITS, temperature, top_k, top_p)
    assert np.all(empirical[exact == 0] == 0)  # filtered tokens are never drawn
    assert 0.5 * np.abs(empirical - exact).sum() < 0.015  # TV distance (E ~ 0.005 at 40k draws)


def test_top_k_and_top_p_edge_cases():
    key = jax.random.key(1)
    logits = jnp.broadcast_to(jnp.asarray(LOGITS), (2000, LOGITS.size))
    argmax = int(np.argmax(LOGITS))
    for kwargs in ({"top_k": 1}, {"top_p": 1e-6}, {"temperature": 0.0, "top_k": 3, "top_p": 0.5},
                   {"top_p": 0.2}):  # the first token alone holds more than 0.2
        assert np.all(np.asarray(sample_logits(key, logits, **kwargs)) == argmax), kwargs
    # top_k at (or past) the vocabulary and top_p = 1 filter nothing: every token turns up
    every = np.asarray(sample_logits(key, jnp.zeros((4000, 8)), top_k=8, top_p=1.0))
    assert set(every.tolist()) == set(range(8))
    # ties at the top-k boundary keep the lower ids, as Hugging Face's topk does
    tied = np.asarray(sample_logits(key, jnp.zeros((2000, 8)), top_k=2))
    assert set(tied.tolist()) == {0, 1}
    # top-p keeps the smallest set reaching p: with p = 0.5 and masses 0.4, 0.3, ... two tokens
    masses = jnp.log(jnp.asarray([0.4, 0.3, 0.2, 0.1]))
    kept = np.asarray(sample_logits(key, jnp.broadcast_to(masses, (2000, 4)), top_p=0.5))
    assert set(kept.tolist()) == {0, 1}
    assert sample_logits(key, jnp.asarray([[0.0, 5.0, 1.0]]), temperature=0.0).shape == (1,)


@pytest.mark.parametrize("kwargs, message", [
    ({"temperature": -0.5}, "temperature=-0.5 must be >= 0"),
    ({"top_p": 0.0}, r"top_p=0.0 must be in \(0, 1\]"),
    ({"top_p": 1.5}, r"top_p=1.5 must be in \(0, 1\]"),
    ({"top_k": -1}, "top_k=-1 must be >= 0"),
])
def test_bad_controls_are_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        sample_logits(jax.random.key(0), jnp.zeros((1, 4)), **kwargs)
    prompts, lens = ragged_prompts(0, [2], 2)
    with pytest.raises(ValueError, match=message):
        generate(model("decoder"), prompts, lens, max_new_tokens=2, **kwargs)


def test_bad_decoding_requests_are_clear_errors():
    decoder = model("decoder")
    prompts, lens = ragged_prompts(0, [5, 3], 5)
    with pytest.raises(ValueError, match=r"prompt \(5 tokens\) \+ max_new_tokens \(12\) = 17 "
                                         "exceeds model.max_len=16"):
        generate(decoder, prompts, lens, max_new_tokens=12)
    with pytest.raises(ValueError, match="num_samples=0 must be >= 1"):
        generate(decoder, prompts, lens, max_new_tokens=2, num_samples=0)
    with pytest.raises(ValueError, match="max_new_tokens=0 must be >= 1"):
        generate(decoder, prompts, lens, max_new_tokens=0)
    with pytest.raises(ValueError, match=r"prompt lengths must be in \[1, 5\]"):
        generate(decoder, prompts, np.asarray([5, 0]), max_new_tokens=2)


# -- beam search -----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["decoder", "encoder_decoder"])
def test_beam_of_one_is_greedy(kind):
    if kind == "decoder":
        prompts, lens = ragged_prompts(6, [4, 2, 3], 4)
        run = functools.partial(generate, model(kind), prompts, lens)
    else:
        src = np.random.default_rng(6).integers(5, VOCAB, (3, 5)).astype(np.int32)
        run = functools.partial(generate_seq2seq, model(kind), src, np.ones_like(src))
    greedy, beam = run(max_new_tokens=8), run(max_new_tokens=8, beam_size=1)
    np.testing.assert_array_equal(beam.tokens, greedy.tokens)
    np.testing.assert_array_equal(beam.lengths, greedy.lengths)
    np.testing.assert_allclose(beam.logprobs, greedy.logprobs, atol=1e-5)


def test_beams_are_ranked_scored_and_teacher_forced():
    decoder = model("decoder")
    prompts, lens = ragged_prompts(8, [3, 5], 5)
    done = generate(decoder, prompts, lens, max_new_tokens=6, beam_size=4, length_penalty=0.7)
    scores, logprobs, lengths = (np.asarray(a) for a in (done.scores, done.logprobs, done.lengths))
    assert np.all(np.diff(scores, axis=1) <= 1e-6)  # best first
    np.testing.assert_allclose(scores, logprobs / lengths**0.7, rtol=1e-5)
    completions = [np.asarray(done.tokens[b, j, : lengths[b, j]]).tolist()
                   for b in range(2) for j in range(4)]
    assert len(set(map(tuple, completions[:4]))) == 4  # distinct hypotheses
    assert all(c[-1] == EOS_ID or len(c) == 6 for c in completions)
    expected = teacher_forced_logprobs(
        decoder, [prompts[b, : lens[b]].tolist() for b in range(2) for _ in range(4)], completions)
    np.testing.assert_allclose(logprobs.reshape(-1), expected, atol=1e-4)


class Bigram(nnx.Module):
    """A model whose next token depends on the last one only: log_probs_vv[last] -> next."""

    def __init__(self, log_probs_vv: np.ndarray):
        self.log_probs = nnx.Param(jnp.asarray(log_probs_vv, jnp.float32))
        self.max_len = 8

    def init_cache(self, batch: int, width: int) -> DecodeCache:
        empty = jnp.zeros((batch, 1, width, 1))
        return DecodeCache((LayerCache(KVCache(empty, empty)),))

    def decode_fn(self):
        return lambda tokens_bt, positions_bt, cache: (self.log_probs[...][tokens_bt], cache)

    def logits(self, hidden):
        return hidden


def test_beam_search_beats_greedy_on_a_constructed_case():
    # <bos> -> a (0.55) | b (0.45); a -> <eos> 0.4, b 0.3, c 0.3; b -> <eos> 0.9; c -> <eos> 1
    a, b, c = 3, 4, 5
    table = np.full((6, 6), 1e-9)
    table[BOS_ID, [a, b]] = [0.55, 0.45]
    table[a, [EOS_ID, b, c]] = [0.4, 0.3, 0.3]
    table[b, [EOS_ID, a]] = [0.9, 0.1]
    table[c, EOS_ID] = 1.0
    table[[PAD_ID, EOS_ID], EOS_ID] = 1.0
    bigram = Bigram(np.log(table / table.sum(1, keepdims=True)))
    prompts, lens = np.asarray([[BOS_ID]]), np.asarray([1])
    greedy = generate(bigram, prompts, lens, max_new_tokens=4)
    beam = generate(bigram, prompts, lens, max_new_tokens=4, beam_size=2)
    assert np.asarray(greedy.tokens[0, 0, :2]).tolist() == [a, EOS_ID]
    assert np.asarray(beam.tokens[0, 0, :2]).tolist() == [b, EOS_ID]
    assert float(beam.logprobs[0, 0]) == pytest.approx(np.log(0.45 * 0.9), abs=1e-5)
    assert float(greedy.logprobs[0, 0]) == pytest.approx(np.log(0.55 * 0.4), abs=1e-5)
    assert np.asarray(beam.tokens[0, 1, :2]).tolist() == [a, EOS_ID]  # the runner-up
