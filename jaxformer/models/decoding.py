"""Autoregressive decoding with a KV cache for the generative families (decoder, encoder-decoder):
sampling (greedy, temperature, top-k, top-p; N samples per prompt) and beam search.

How a batch is decoded (one jitted call, the loop a `lax.while_loop`):
- Prefill: the right-padded prompts (B, P) go through the model in one call that writes the cache
  for positions 0..P-1; row b's first new token comes from the logits at its last prompt position.
  An encoder-decoder first encodes its source once (cross-attention keys/values per layer); its
  decoder prompt is `<bos>`.
- Decode: every row takes one token per step, written at its own next position (prompt_len_b + i at
  step i). A key/value sits in the cache slot of its position and a query sees slots <= its own, so
  the slots a shorter prompt's padding filled are overwritten before any query can see them: right
  padding needs no shifting, and learned / sinusoidal / rope positions are those of the full forward.
- N samples per prompt repeat the prefilled cache N times (the prompt is computed once). Row j of
  prompt b draws step i with key fold_in(fold_in(key_b, j), i): a sample depends on its prompt's
  key only, never on the rest of the batch.
- A row stops after `max_new_tokens`, at a stop token (kept, counted in its length and log-prob),
  or at `max_total_len` tokens with the prompt; the loop exits once every row has stopped.

Every completion carries its total log-probability under the model, unwarped (log_softmax of the
raw logits, whatever temperature / top-k / top-p drew it), summed over its tokens up to and
including the stop token. The model interface decoding needs is `init_cache(batch, width, *source)`,
`decode_fn() -> step(tokens_bt, positions_bt, cache) -> (hidden_btd, cache)`, `logits(hidden)`,
`max_len`.
"""

from __future__ import annotations

from functools import partial
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxformer.config import check_sampling
from jaxformer.data.tokenizers import BOS_ID, EOS_ID, PAD_ID
from jaxformer.errors import UserError
from jaxformer.parallel import to_host


class Completions(NamedTuple):
    """Decoded continuations of B prompts, N per prompt (samples, or beams best first)."""

    tokens: jax.Array  # (B, N, T) int32 new tokens; <pad> after a row's last token
    lengths: jax.Array  # (B, N) int32 tokens generated, the stop token included
    logprobs: jax.Array  # (B, N) float32 sum of the unwarped log-probabilities of those tokens
    scores: jax.Array  # (B, N) float32 what decoding ranked by: beam search's length-normalised
    # log-prob (logprob / length ** length_penalty); for sampling, the log-prob


# -- one step's choice ----------------------------------------------------------------------------
def _nucleus(sorted_logits: jax.Array, top_p: float) -> jax.Array:
    """Logits sorted in descending order, with the tokens outside the top-p nucleus at -inf: the
    smallest prefix whose probability reaches top_p (a token stays while the mass ranked above
    it is still below top_p, so the first token always stays)."""
    if top_p >= 1.0:
        return sorted_logits
    probs = jax.nn.softmax(sorted_logits, axis=-1)
    mass_above = jnp.cumsum(probs, axis=-1) - probs
    return jnp.where(mass_above < top_p, sorted_logits, -jnp.inf)


def sample_logits(key: jax.Array, logits: jax.Array, temperature: float = 1.0, top_k: int = 0,
                  top_p: float = 1.0) -> jax.Array:
    """Token ids (int32, shape logits.shape[:-1]) drawn from `logits` (..., vocab) warped in Hugging
    Face's order: temperature, then top-k, then top-p. temperature=0 is argmax; top_k=0 and
    top_p=1 disable those filters. With top-k, top-p works inside the k largest (no full sort)."""
    check_sampling(temperature, top_k, top_p)
    if temperature == 0.0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    scaled = logits.astype(jnp.float32) / temperature
    vocab = scaled.shape[-1]
    if 0 < top_k < vocab or top_p < 1.0:
        sorted_logits, sorted_ids = jax.lax.top_k(scaled, top_k if 0 < top_k < vocab else vocab)
        choice = jax.random.categorical(key, _nucleus(sorted_logits, top_p), axis=-1)
        return jnp.take_along_axis(sorted_ids, choice[..., None], axis=-1)[..., 0].astype(jnp.int32)
    return jax.random.categorical(key, scaled, axis=-1).astype(jnp.int32)


def token_logprobs(logits_bv: jax.Array, tokens_b: jax.Array) -> jax.Array:
    """log p(token) under the unwarped model distribution, per row."""
    logp_bv = jax.nn.log_softmax(logits_bv.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp_bv, tokens_b[:, None], axis=-1)[:, 0]


# -- prefill and the step -------------------------------------------------------------------------
def _prefill(model, step, prompts_bp, prompt_lens_b, source: tuple, width: int):
    """(next-token logits (B, vocab) after each prompt, the cache written for positions < P);
    `step` is the model's `decode_fn()`."""
    cache = model.init_cache(prompts_bp.shape[0], width, *source)
    positions_bp = jnp.broadcast_to(jnp.arange(prompts_bp.shape[1]), prompts_bp.shape)
    hidden_bpd, cache = step(prompts_bp, positions_bp, cache)
    last_bd = jnp.take_along_axis(hidden_bpd, (prompt_lens_b - 1)[:, None, None], axis=1)[:, 0]
    return model.logits(last_bd), cache


def _next_logits(model, step, tokens_b, positions_b, cache):
    """Feed one token per row at its position: (next-token logits (B, vocab), cache)."""
    # a stopped row may point one past the cache: clamp, its outputs are never read
    positions_b = jnp.minimum(positions_b, cache.width - 1)
    hidden_b1d, cache = step(tokens_b[:, None], positions_b[:, None], cache)
    return model.logits(hidden_b1d[:, 0]), cache


def _is_stop(tokens, stop_tokens: tuple[int, ...]):
    return jnp.isin(tokens, jnp.asarray(stop_tokens, jnp.int32)) if stop_tokens else \
        jnp.zeros(tokens.shape, bool)


# -- sampling ---------------------------------------------------------------------------------------
class _Rows(NamedTuple):
    """Per-row decoding state of the sampling loop (r = b * N + j: sample j of prompt b)."""

    logits_rv: jax.Array  # next-token logits
    cache: object  # the model's DecodeCache
    pos_r: jax.Array  # where the next token goes
    done_r: jax.Array
    tokens_rt: jax.Array
    logprob_r: jax.Array


@partial(jax.jit, static_argnames=(
    "graphdef", "width", "max_new_tokens", "num_samples", "temperature", "top_k", "top_p",
    "stop_tokens"))
def _sample(graphdef, state, prompts_bp, prompt_lens_b, source, keys_b, stop_pos_b, *, width,
            max_new_tokens, num_samples, temperature, top_k, top_p, stop_tokens) -> Completions:
    model = nnx.merge(graphdef, state)
    step = model.decode_fn()  # outside the loop: per-layer weights are sliced once
    batch = prompts_bp.shape[0]
    logits_bv, cache = _prefill(model, step, prompts_bp, prompt_lens_b, source, width)
    prompt_r = jnp.repeat(jnp.arange(batch), num_samples)  # N rows share prompt b's prefill
    keys_r = jax.vmap(jax.random.fold_in)(keys_b[prompt_r],
                                          jnp.tile(jnp.arange(num_samples), batch))
    stop_pos_r = stop_pos_b[prompt_r]
    draw = jax.vmap(partial(sample_logits, temperature=temperature, top_k=top_k, top_p=top_p))

    def choose(i, rows: _Rows) -> _Rows:
        """Token i of every row that has not stopped, recorded; no forward yet."""
        token_r = draw(jax.vmap(jax.random.fold_in, (0, None))(keys_r, i), rows.logits_rv)
        token_r = jnp.where(rows.done_r, PAD_ID, token_r)
        logp_r = jnp.where(rows.done_r, 0.0, token_logprobs(rows.logits_rv, token_r))
        next_pos_r = rows.pos_r + (~rows.done_r).astype(jnp.int32)
        return rows._replace(
            pos_r=next_pos_r, tokens_rt=rows.tokens_rt.at[:, i].set(token_r),
            done_r=rows.done_r | _is_stop(token_r, stop_tokens) | (next_pos_r >= stop_pos_r),
            logprob_r=rows.logprob_r + logp_r)

    def body(loop):
        i, rows = loop
        chosen = choose(i, rows)
        logits_rv, cache = _next_logits(model, step, chosen.tokens_rt[:, i], rows.pos_r, rows.cache)
        return i + 1, chosen._replace(logits_rv=logits_rv, cache=cache)

    def more(loop):  # the last token needs no forward: it is chosen after the loop
        i, rows = loop
        return (i < max_new_tokens - 1) & ~jnp.all(rows.done_r)

    start_r = prompt_lens_b[prompt_r]
    rows = _Rows(logits_bv[prompt_r], cache.select_rows(prompt_r), start_r, start_r >= stop_pos_r,
                 jnp.full((batch * num_samples, max_new_tokens), PAD_ID, jnp.int32),
                 jnp.zeros((batch * num_samples,), jnp.float32))
    i, rows = jax.lax.while_loop(more, body, (jnp.int32(0), rows))
    rows = choose(i, rows)
    shape = (batch, num_samples)
    logprob_bn = rows.logprob_r.reshape(shape)
    return Completions(rows.tokens_rt.reshape(*shape, max_new_tokens),
                       (rows.pos_r - start_r).reshape(shape), logprob_bn, logprob_bn)


# -- beam search ------------------------------------------------------------------------------------
class _Beams(NamedTuple):
    """Beam search state per prompt b and beam k: the K live beams (all of length i after step i)
    and the K best finished hypotheses, best first."""

    logits_rv: jax.Array  # (B*K, V) next-token logits of the live beams
    cache: object
    alive_tokens: jax.Array  # (B, K, T)
    alive_logp: jax.Array  # (B, K); -inf for an empty slot
    done_tokens: jax.Array  # (B, K, T)
    done_logp: jax.Array  # (B, K)
    done_score: jax.Array  # (B, K) done_logp / length ** length_penalty; -inf for an empty slot
    done_len: jax.Array  # (B, K)
    finished: jax.Array  # (B,) no live beam can still beat the worst finished one


@partial(jax.jit, static_argnames=(
    "graphdef", "width", "max_new_tokens", "beam_size", "length_penalty", "stop_tokens"))
def _beam_search(graphdef, state, prompts_bp, prompt_lens_b, source, stop_pos_b, *, width,
                 max_new_tokens, beam_size, length_penalty, stop_tokens) -> Completions:
    model = nnx.merge(graphdef, state)
    step = model.decode_fn()
    batch, k = prompts_bp.shape[0], beam_size
    logits_bv, cache = _prefill(model, step, prompts_bp, prompt_lens_b, source, width)
    vocab = logits_bv.shape[-1]
    budget_b1 = (stop_pos_b - prompt_lens_b)[:, None]  # tokens each prompt may generate

    def penalty(length):
        return jnp.asarray(length, jnp.float32) ** length_penalty

    def body(loop):
        i, beams = loop
        logp_bkv = jax.nn.log_softmax(beams.logits_rv, axis=-1).reshape(batch, k, vocab)
        scores_bc = (beams.alive_logp[..., None] + logp_bkv).reshape(batch, k * vocab)
        # 2K candidates: at most K of them end here, so K can always go on
        cand_logp, cand = jax.lax.top_k(scores_bc, 2 * k)
        parent, token = cand // vocab, (cand % vocab).astype(jnp.int32)
        cand_tokens = jnp.take_along_axis(beams.alive_tokens, parent[..., None], axis=1)
        cand_tokens = cand_tokens.at[:, :, i].set(token)
        ends = _is_stop(token, stop_tokens) | (i + 1 >= budget_b1)
        # as Hugging Face: an ending candidate counts only if ranked within the first K
        counts = ends & (jnp.arange(2 * k) < k)
        cand_score = jnp.where(counts, cand_logp / penalty(i + 1), -jnp.inf)
        done_score, best = jax.lax.top_k(
            jnp.concatenate([beams.done_score, cand_score], axis=1), k)

        def pick(done, new):
            return jnp.take_along_axis(jnp.concatenate([done, new], axis=1),
                                       best.reshape(best.shape + (1,) * (done.ndim - 2)), axis=1)

        alive_logp, keep = jax.lax.top_k(jnp.where(ends, -jnp.inf, cand_logp), k)
        alive_tokens = jnp.take_along_axis(cand_tokens, keep[..., None], axis=1)
        rows = (jnp.arange(batch)[:, None] * k + jnp.take_along_axis(parent, keep, 1)).reshape(-1)
        positions = jnp.repeat(prompt_lens_b + i, k)
        logits_rv, cache = _next_logits(model, step, alive_tokens[:, :, i].reshape(-1),
                                        positions, beams.cache.select_rows(rows))
        # a live beam's final score is at most its log-prob now over the length penalty of some
        # length still to come (the extreme is at one end of that range)
        best_alive = alive_logp.max(axis=1)
        bound = jnp.maximum(best_alive / penalty(i + 2), best_alive / penalty(budget_b1[:, 0]))
        return i + 1, _Beams(
            logits_rv, cache, alive_tokens, alive_logp, pick(beams.done_tokens, cand_tokens),
            pick(beams.done_logp, cand_logp), done_score,
            pick(beams.done_len, jnp.full((batch, 2 * k), i + 1, jnp.int32)),
            (done_score[:, -1] >= bound) | (best_alive == -jnp.inf))

    def more(loop):
        i, beams = loop
        return (i < max_new_tokens) & ~jnp.all(beams.finished)

    rows = jnp.repeat(jnp.arange(batch), k)
    empty = jnp.full((batch, k), -jnp.inf)
    tokens = jnp.full((batch, k, max_new_tokens), PAD_ID, jnp.int32)
    beams = _Beams(logits_bv[rows], cache.select_rows(rows), tokens,
                   empty.at[:, 0].set(0.0),  # one live beam to start: the others are copies
                   tokens, empty, empty, jnp.zeros((batch, k), jnp.int32), jnp.zeros(batch, bool))
    _, beams = jax.lax.while_loop(more, body, (jnp.int32(0), beams))
    return Completions(beams.done_tokens, beams.done_len, beams.done_logp, beams.done_score)


def _row_keys(key: jax.Array | None, batch: int) -> jax.Array:
    """(B,) keys: a given batch of keys as is, else fold_in(key, row)."""
    key = jax.random.key(0) if key is None else key
    if key.ndim == 1:
        if key.shape[0] != batch:
            raise UserError(f"{key.shape[0]} keys for {batch} prompts: pass one key per prompt")
        return key
    return jax.vmap(partial(jax.random.fold_in, key))(jnp.arange(batch))


def _layout(model, prompts_bp, prompt_lens_b, max_new_tokens: int, max_total_len: int | None):
    """Host-side checks; returns (cache width, each row's stop position)."""
    prompts_bp, prompt_lens_b = np.asarray(prompts_bp), np.asarray(prompt_lens_b)
    if max_new_tokens < 1:
        raise UserError(f"max_new_tokens={max_new_tokens} must be >= 1")
    if prompts_bp.ndim != 2 or prompt_lens_b.shape != prompts_bp.shape[:1]:
        raise UserError(f"prompts must be (B, P) with B lengths, got {prompts_bp.shape} and "
                         f"{prompt_lens_b.shape}")
    if prompt_lens_b.min() < 1 or prompt_lens_b.max() > prompts_bp.shape[1]:
        raise UserError(f"prompt lengths must be in [1, {prompts_bp.shape[1]}] (a prompt holds at "
                         f"least <bos>), got {prompt_lens_b.min()}..{prompt_lens_b.max()}")
    width = prompts_bp.shape[1] + max_new_tokens
    stop_pos_b = prompt_lens_b + max_new_tokens
    if max_total_len is not None:
        if max_total_len <= prompts_bp.shape[1]:
            raise UserError(f"max_total_len={max_total_len} leaves no room after prompts of "
                             f"{prompts_bp.shape[1]} tokens: raise it or pass shorter prompts")
        width, stop_pos_b = min(width, max_total_len), np.minimum(stop_pos_b, max_total_len)
    if width > model.max_len:
        raise UserError(
            f"prompt ({prompts_bp.shape[1]} tokens) + max_new_tokens ({max_new_tokens}) = {width} "
            f"exceeds model.max_len={model.max_len}: generate fewer tokens or shorten the prompt")
    return width, jnp.asarray(stop_pos_b, jnp.int32)


def generate(
    model: nnx.Module, prompts_bp, prompt_lens_b, *, max_new_tokens: int, source: tuple = (),
    key: jax.Array | None = None, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0,
    num_samples: int = 1, beam_size: int = 0, length_penalty: float = 0.0,
    stop_tokens: tuple[int, ...] = (EOS_ID,), max_total_len: int | None = None,
) -> Completions:
    """Continue right-padded prompts (B, P) of lengths `prompt_lens_b`, one jitted call.

    Sampling (`beam_size=0`): `num_samples` completions per prompt drawn with temperature / top_k /
    top_p (temperature 0: greedy); `key` is one key (prompt b uses fold_in(key, b)) or one per
    prompt (B,). Beam search (`beam_size=K`): the K best finished hypotheses per prompt, best
    first, ranked by logprob / length ** length_penalty (0: plain log-prob, where K=1 is greedy).
    `source`: the encoder-decoder's (src_bs, src_valid_bs), see `generate_seq2seq`.
    `max_total_len` caps each row at that many tokens with its prompt (a fixed-size buffer).
    """
    check_sampling(temperature, top_k, top_p)
    if num_samples < 1:
        raise UserError(f"num_samples={num_samples} must be >= 1")
    if beam_size < 0:
        raise UserError(f"beam_size={beam_size} must be >= 0 (0 samples instead)")
    width, stop_pos_b = _layout(model, prompts_bp, prompt_lens_b, max_new_tokens, max_total_len)
    graphdef, state = nnx.split(model)
    inputs = (graphdef, state, jnp.asarray(prompts_bp, jnp.int32),
              jnp.asarray(prompt_lens_b, jnp.int32), jax.tree.map(jnp.asarray, source))
    if beam_size:
        return _beam_search(*inputs, stop_pos_b, width=width, max_new_tokens=max_new_tokens,
                            beam_size=beam_size, length_penalty=float(length_penalty),
                            stop_tokens=tuple(stop_tokens))
    return _sample(*inputs, _row_keys(key, len(prompt_lens_b)), stop_pos_b, width=width,
                   max_new_tokens=max_new_tokens, num_samples=num_samples,
                   temperature=float(temperature), top_k=int(top_k), top_p=float(top_p),
                   stop_tokens=tuple(stop_tokens))


def bos_prompts(batch: int) -> tuple[np.ndarray, np.ndarray]:
    """The encoder-decoder's decoder prompt: `<bos>` for every row, length 1."""
    return np.full((batch, 1), BOS_ID, np.int32), np.ones((batch,), np.int32)


def generate_seq2seq(model: nnx.Module, src_bs, src_valid_bs, **kwargs) -> Completions:
    """`generate` for an encoder-decoder: target completions of each source (B, S), after <bos>."""
    return generate(model, *bos_prompts(len(src_bs)), source=(src_bs, src_valid_bs), **kwargs)


# -- reading completions --------------------------------------------------------------------------
def until_eos(ids: list[int], eos: int = EOS_ID) -> list[int]:
    """Token ids up to (not including) the first `eos`."""
    return ids[: ids.index(eos)] if eos in ids else ids


def completion_texts(tokenizer, done: Completions, eos: int = EOS_ID) -> list[list[str]]:
    """The text of every completion (B prompts x N): its tokens up to `eos`, decoded."""
    tokens, lengths = to_host((done.tokens, done.lengths))
    return [[tokenizer.decode(until_eos(row[:n].tolist(), eos))
             for row, n in zip(rows, row_lengths)] for rows, row_lengths in zip(tokens, lengths)]


def ended_at_eos(done: Completions, eos: int = EOS_ID) -> np.ndarray:
    """(B, N) whether each completion stopped at `eos` (else it ran out of new tokens)."""
    tokens, lengths = to_host((done.tokens, done.lengths))
    last = np.take_along_axis(tokens, np.maximum(lengths - 1, 0)[..., None], axis=-1)[..., 0]
    return (lengths > 0) & (last == eos)
