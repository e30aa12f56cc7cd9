"""Text generation with GPT-2: prefill the prompt, then decode token by token from a KV cache, all jitted.

    new_ids = generate(params, hparams, [ids1, ids2], 40, top_k=40, seed=1)    # [[40 ids], [40 ids]]
    for chunk in generate_stream(params, hparams, [ids], 40, greedy=True):     # [[<= 16 ids]] at a time
        ...

How it runs:
  - Prompts of different lengths form one batch: right-padded to a bucket length (a power of two, >= 16) and run
    through the model together, each row then decoding at its own position. The rows write each new token's keys and
    values into one shared cache slot (the longest prompt's length, then on): one in-place write for the batch. Padding
    never reaches a row's result: each row's mask (past) leaves out the slots between its prompt and that slot, and
    the padded slots after it are overwritten before they are attended to.
  - Prefill computes hidden states for the whole padded prompt but unembeds only each row's last real position.
  - Decoding runs in chunks of up to CHUNK tokens, each one jitted `lax.while_loop` with the KV cache in its carry
    (updated in place) and donated from chunk to chunk; the host only collects each chunk's tokens. generate() is
    generate_stream() with its chunks joined, so the two cannot disagree. The write slot wraps round the cache, a ring
    that serve.py's rows join at any point of.
  - Shapes are bucketed (prompt length: bucket, cache length: cache_length), and the number of steps in a chunk and
    every sampling control but `greedy` are traced values, so one compiled prefill and one compiled decode serve
    every prompt, length and setting in a bucket; jax.jit keeps them for the life of the process,
    cli.enable_compilation_cache() on disk. (A cache that grew with decoding read fewer slots but cost main.py a
    compiled program per size, loaded from the disk cache in every process: 124M int8 at batch 1, 8.7 -> 17.9
    ms/token measured as bench.py llamacpp does.)
  - Sampling: the penalties and logit_bias (adjusted_logits; present only when asked for), then greedy (argmax), or
    temperature, then top-k, then top-p (nucleus), drawn with a key derived from (seed, row, token index): the same
    seed gives the same tokens whatever the chunking, and row 0 of a batch uses the random numbers that the same
    prompt uses alone. Every control is per row (request_controls), so that serve.py batches different requests.
    Stop strings act on text (text_stream), which ends a row by sending it to generate_stream. generate() runs a
    request of many rows (num_samples 10,000) as batches that fit in memory, each row keeping its index and padded
    shapes: the tokens are those of one batch.
  - The layers' weights are separate arrays here (gpt.unstack_layers), not gpt.py's stack: see gpt.transformer.
  - The KV cache is in the compute dtype, or in kv_dtype="bfloat16": half the memory (a batch holds twice the rows),
    faster where the hardware reads bfloat16 natively; on XLA:CPU slower at long contexts, since it widens the cache
    in a slow loop inside attention (bench.py generate --kv_cache bfloat16: 124M int8 after 880 cached positions,
    batch 8, 46 -> 109 ms a step).
"""
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int, UInt32

import gpt
import quant

CHUNK = 16  # tokens per jitted decode call: the granularity of streaming (a host round trip costs ~0.1 ms)
MIN_BUCKET = 16
CACHE_STEP = 32  # KV cache lengths are multiples of it (see cache_length)
MIN_TEMPERATURE = 1e-6  # below it, logits / temperature can overflow float32 (then inf - inf: NaN)
BATCH_BYTES = 2 << 30  # the memory one batch of generate() may take (rows_that_fit)


def bucket(n: int, n_ctx: int) -> int:
    # the padded length for n tokens: the next power of two, at least MIN_BUCKET, at most n_ctx
    return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), n_ctx)


def cache_length(n: int, n_ctx: int) -> int:
    # the KV cache length for n tokens: the next multiple of CACHE_STEP, at most n_ctx. Finer than bucket's powers of
    # two because every decoding step reads the whole cache, and at batch 8 that read is a large part of the step
    # (124M int8, 8 rows of 10 + 144 tokens: 256 slots 28.4 ms/step, 160 slots 22.8); the price is more programs
    # (up to n_ctx / CACHE_STEP decode programs, each compiled once and then kept in the disk cache)
    return min(-(-n // CACHE_STEP) * CACHE_STEP, n_ctx)


# ------------------------------------------------------------------------------------------------ choosing a token


def filter_logits(logits: Float[Array, " n_vocab"], top_k: Int[Array, ""],
                  top_p: Float[Array, ""]) -> Float[Array, " n_vocab"]:  # -inf outside the kept tokens
    # top_k: keep the k most likely tokens (and any tied with the k-th); top_p: of those, keep the smallest set of
    # most likely tokens whose probability adds up to >= top_p. Both are traced: k = n_vocab, p = 1 keep everything.
    # Each cut is a threshold found by bisection over the 2**32 float32 bit patterns (32 masked sums over the
    # vocabulary): sorting the vocabulary instead costs ~15 ms per row on a CPU, more than decoding a token.
    keys = sortable_bits(logits)
    kth = largest_key_where(keys, lambda t: jnp.sum(keys >= t) >= top_k)
    logits = jnp.where(keys >= kth, logits, -jnp.inf)
    probs = jax.nn.softmax(logits)
    cut = largest_key_where(keys, lambda t: jnp.sum(jnp.where(keys >= t, probs, 0.0)) >= top_p)
    return jnp.where(keys >= cut, logits, -jnp.inf)  # the top token always stays: cut <= its key


def largest_key_where(keys: UInt32[Array, " n"], holds) -> UInt32[Array, ""]:
    # the largest t at which holds(t), a test that holds for keys.min() and turns false at most once
    def halve(_, bounds):  # invariant: holds(lo); the answer is <= hi
        lo, hi = bounds
        mid = lo + (hi - lo + 1) // 2
        ok = holds(mid)
        return jnp.where(ok, mid, lo), jnp.where(ok, hi, mid - 1)

    return lax.fori_loop(0, 32, halve, (keys.min(), keys.max()))[0]


def sortable_bits(x: Float[Array, "*shape"]) -> UInt32[Array, "*shape"]:
    # float32 -> uint32 in the same order (negative floats' bits count down); -0.0 as 0.0, which it equals (a
    # property test found a -0.0 logit dropped from a tie with 0.0)
    x = x.astype(jnp.float32)
    bits = lax.bitcast_convert_type(jnp.where(x == 0, jnp.float32(0), x), jnp.uint32)
    return jnp.where(bits >> 31 == 1, ~bits, bits | jnp.uint32(1 << 31))


def adjusted_logits(logits: Float[Array, "batch n_vocab"], controls: dict,
                    state: dict) -> Float[Array, "batch n_vocab"]:
    # the penalties, then logit_bias (each present only when the request sets it), as the field defines them:
    # repetition_penalty r (HF, CTRL): a token of the prompt or already generated gets logit / r if positive, logit * r
    # if not; frequency_penalty f and presence_penalty p (OpenAI): a token generated c times so far gets logit - c f -
    # (c > 0) p; logit_bias: added (OpenAI: -100 bans a token, 100 all but forces it)
    if "repetition_penalty" in controls:
        counts, r = state["counts"], controls["repetition_penalty"][:, None]
        seen = state["in_prompt"] | (counts > 0)
        logits = jnp.where(seen, jnp.where(logits > 0, logits / r, logits * r), logits)
        logits = (logits - controls["frequency_penalty"][:, None] * counts
                  - controls["presence_penalty"][:, None] * (counts > 0))
    if "logit_bias" in controls:
        logits = logits + controls["logit_bias"]
    return logits


def next_tokens(logits: Float[Array, "batch n_vocab"], controls: dict, steps: Int[Array, " batch"], *,
                greedy: bool) -> Int[Array, " batch"]:
    # each row's token: greedy (all rows), or drawn with the row's own settings, a row of temperature 0 taking the
    # most likely token. The draw's key: the row's key with its token index folded in.
    most_likely = jnp.argmax(logits, axis=-1)
    if greedy:
        return most_likely
    temperature = controls["temperature"]
    logits = logits / jnp.maximum(temperature, MIN_TEMPERATURE)[:, None]
    n_vocab = logits.shape[-1]
    filtering = jnp.any((controls["top_k"] < n_vocab) | (controls["top_p"] < 1))  # skip the bisections if none cut
    logits = lax.cond(filtering, jax.vmap(filter_logits), lambda logits, k, p: logits,
                      logits, controls["top_k"], controls["top_p"])
    keys = jax.vmap(jax.random.fold_in)(controls["key"], steps)
    return jnp.where(temperature == 0, most_likely, jax.vmap(jax.random.categorical)(keys, logits))


# ------------------------------------------------------------------------------------------------ the model


def unembed_rows(params: dict, x: Float[Array, "batch n_embd"]) -> Float[Array, "batch n_vocab"]:
    # gpt.unembed for a few rows. On a CPU, XLA computes the product faster as wte @ x.T than as x @ wte.T for 1 to 16
    # rows (124M, 8 rows: 11 vs 18 ms, the largest part of a decoding step; 64 rows: no gain); the barrier keeps XLA
    # from rewriting it back.
    if jax.default_backend() == "cpu" and x.shape[0] <= 16 and not quant.is_quantized(params["wte"]):
        logits = lax.optimization_barrier(jnp.einsum("ve,ne->vn", params["wte"], x)).T
        return logits.astype(gpt.wide(x.dtype))
    return gpt.unembed(params, x)


# ------------------------------------------------------------------------------------------------ the jitted loop


def sample(state: dict, logits: Float[Array, "batch n_vocab"], controls: dict, greedy: bool,
           n_logprobs: int = 0) -> dict:
    # each row's next token; a row that has emitted the eot token (or was ended, see end_rows) keeps emitting it
    # (eot_token -1: no stop). n_logprobs > 0: also the token's log probability under the model (its own logits,
    # before the controls adjust them: what scoring the text gives) and the n_logprobs most likely tokens'
    token = next_tokens(adjusted_logits(logits, controls, state), controls, state["step"], greedy=greedy)
    token = jnp.where(state["done"], controls["eot_token"], token.astype(jnp.int32))
    state = {**state, "token": token, "done": state["done"] | (token == controls["eot_token"]),
             "step": state["step"] + 1}
    rows = jnp.arange(token.shape[0])
    if "repetition_penalty" in controls:  # how often each row has drawn each token: the penalties' c
        drawn = (jnp.arange(state["counts"].shape[-1]) == token[:, None]) & ~state["done"][:, None]
        state["counts"] = state["counts"] + drawn  # not a scatter: XLA:CPU copied the whole array for one
    if n_logprobs:
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        state["logprob"] = logp[rows, token]
        state["top_logprobs"], state["top_ids"] = lax.top_k(logp, n_logprobs)
    return state


@partial(jax.jit, static_argnames=("n_head", "cache_len", "greedy", "kv_dtype"))
def prefill(params: dict, ids: Int[Array, "batch prompt_bucket"], lengths: Int[Array, " batch"], controls: dict, *,
            n_head: int, cache_len: int, greedy: bool, kv_dtype: str | None = None) -> dict:
    # right-padded prompts and their lengths -> the decoding state, holding the KV cache (in kv_dtype; None: the
    # compute dtype) and each row's first new token
    batch = ids.shape[0]
    x, caches = gpt.transformer(params, ids, n_head, gpt.empty_caches(params, batch, n_head, cache_len, kv_dtype), 0)
    logits = unembed_rows(params, x[jnp.arange(batch), lengths - 1])  # [batch, n_vocab]: last real positions only
    # each row's next token goes at its own position (pos) but, for all rows, into slot max(lengths), then the next
    # slots: a row's past skips the slots between its prompt and the longest one (padding)
    past = jnp.arange(cache_len) < lengths[:, None]
    state = {"caches": caches, "pos": lengths, "past": past, "slot": jnp.max(lengths), "done": jnp.zeros(batch, bool),
             "step": jnp.zeros(batch, jnp.int32)}
    if "repetition_penalty" in controls:
        state["in_prompt"] = tokens_in(ids, lengths, logits.shape[-1])
        state["counts"] = jnp.zeros((batch, logits.shape[-1]), jnp.int32)
    return sample(state, logits, controls, greedy)


def tokens_in(ids: Int[Array, "batch n_seq"], lengths: Int[Array, " batch"],
              n_vocab: int) -> Bool[Array, "batch n_vocab"]:
    # which tokens each right-padded prompt holds: the repetition penalty's prompt tokens
    real = jnp.arange(ids.shape[1]) < lengths[:, None]
    rows = jnp.arange(ids.shape[0])[:, None]
    return jnp.zeros((ids.shape[0], n_vocab), bool).at[rows, jnp.where(real, ids, n_vocab)].set(
        True, mode="drop")  # padding: out of bounds, dropped


@partial(jax.jit, static_argnames=("n_head", "chunk", "greedy", "n_logprobs"), donate_argnames=("state",))
def decode(params: dict, state: dict, n_steps: Int[Array, ""], controls: dict, *, n_head: int, chunk: int,
           greedy: bool, n_logprobs: int = 0) -> tuple[dict, dict]:
    # feed each row's last token to the model and sample the next, n_steps (<= chunk, traced) times -> each step's
    # tokens ({"token": [batch, chunk]}, columns from n_steps on padding; with n_logprobs, sample's log probabilities
    # too), and the state to continue from. The write slot wraps around the cache (a ring: serve.py's rows join at
    # any slot; generate's requests fit before the end).
    def not_finished(carry):
        i, state, _ = carry
        return (i < n_steps) & ~jnp.all(state["done"])  # stop early once every row has emitted the eot token

    def step(carry):
        i, state, out = carry
        x, caches = gpt.transformer(params, state["token"][:, None], n_head, state["caches"], state["pos"],
                                    state["past"], state["slot"])
        n_cache = state["past"].shape[-1]
        past = state["past"] | (jnp.arange(n_cache) == state["slot"])
        state = {**state, "caches": caches, "pos": state["pos"] + 1, "past": past,
                 "slot": (state["slot"] + 1) % n_cache}
        state = sample(state, unembed_rows(params, x[:, 0]), controls, greedy, n_logprobs)
        return i + 1, state, {name: column.at[:, i].set(state[name]) for name, column in out.items()}

    batch = state["token"].shape[0]
    out = {"token": jnp.zeros((batch, chunk), jnp.int32)}
    if n_logprobs:
        out.update(logprob=jnp.zeros((batch, chunk)), top_ids=jnp.zeros((batch, chunk, n_logprobs), jnp.int32),
                   top_logprobs=jnp.zeros((batch, chunk, n_logprobs)))
    _, state, out = lax.while_loop(not_finished, step, (jnp.int32(0), state, out))
    return out, state


# ------------------------------------------------------------------------------------------------ the public API


def check_request(hparams, prompts, n_tokens, **options):
    """A one-line ValueError for a request that cannot be served: no prompts, a prompt that is empty, holds a token
    outside the vocabulary or leaves no room for n_tokens in the context, or sampling options out of range."""
    if not prompts:
        raise ValueError("no prompts given")
    if n_tokens < 1:
        raise ValueError(f"the number of tokens to generate must be at least 1, got {n_tokens}")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i + 1} is empty: give at least one token")
        if len(prompt) + n_tokens > hparams["n_ctx"]:
            raise ValueError(f"a prompt of {len(prompt)} tokens plus {n_tokens} new tokens is "
                             f"{len(prompt) + n_tokens}, "
                             f"more than the model's context of n_ctx={hparams['n_ctx']} tokens: shorten the prompt "
                             f"or generate fewer tokens")
        check_token_ids(prompt, hparams["n_vocab"], f"prompt {i + 1}")
    check_options(hparams, **options)


def check_token_ids(ids, n_vocab, where):
    bad = [t for t in ids if not 0 <= t < n_vocab]
    if bad:
        raise ValueError(f"token id {bad[0]} in {where} is not in the vocabulary (ids 0..{n_vocab - 1})")


def check_options(hparams, *, greedy=False, temperature=1.0, top_k=None, top_p=None, seed=0,
                  repetition_penalty=None, presence_penalty=None, frequency_penalty=None, logit_bias=None):
    # request_controls's options, in their ranges (NaN is in none)
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not greedy and not temperature >= MIN_TEMPERATURE:
        raise ValueError(f"temperature must be at least {MIN_TEMPERATURE}, got {temperature} (for the most likely "
                         f"tokens, use greedy decoding)")
    if repetition_penalty is not None and not 0 < repetition_penalty < math.inf:
        raise ValueError(f"repetition_penalty must be a positive number (1: none), got {repetition_penalty}")
    for name, value in (("presence_penalty", presence_penalty), ("frequency_penalty", frequency_penalty)):
        if value is not None and not -2 <= value <= 2:
            raise ValueError(f"{name} must be from -2 to 2 (0: none), got {value}")
    for token, bias in (logit_bias or {}).items():
        check_token_ids([token], hparams["n_vocab"], "logit_bias")
        if not -100 <= bias <= 100:
            raise ValueError(f"logit_bias of token {token} must be from -100 to 100, got {bias}")
    check_seed(seed)


def request_controls(hparams, n_rows, *, greedy=False, temperature=1.0, top_k=None, top_p=None, seed=0,
                     repetition_penalty=None, presence_penalty=None, frequency_penalty=None, logit_bias=None,
                     eot_token=None, first_row=0) -> dict:
    """The sampling controls of n_rows rows of one request, as the jitted functions take them: per row (a server
    batches requests with different settings), traced (no compile per setting). greedy, or temperature, top_k,
    top_p and the random stream of seed (row i of a request draws as row first_row + i); the penalties and
    logit_bias as adjusted_logits defines them (left out when not asked for: no cost); eot_token ends a row."""
    n_vocab, rows = hparams["n_vocab"], lambda value, dtype: np.full(n_rows, value, dtype)
    seeds = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(seed), first_row + np.arange(n_rows))
    controls = {"key": seeds, "temperature": rows(0 if greedy else temperature, np.float32),
                "top_k": rows(min(top_k or n_vocab, n_vocab), np.int32), "top_p": rows(top_p or 1, np.float32),
                "eot_token": np.int32(-1 if eot_token is None else eot_token)}
    if (repetition_penalty, presence_penalty, frequency_penalty) != (None, None, None):
        controls.update(repetition_penalty=rows(repetition_penalty or 1, np.float32),
                        presence_penalty=rows(presence_penalty or 0, np.float32),
                        frequency_penalty=rows(frequency_penalty or 0, np.float32))
    if logit_bias:
        controls["logit_bias"] = np.zeros((n_rows, n_vocab), np.float32)
        for token, bias in logit_bias.items():
            controls["logit_bias"][:, token] = bias
    return controls


def generate_stream(params, hparams, prompts, n_tokens, *, eot_token=None, first_row=0, shapes=None, kv_dtype=None,
                    **options):
    """Generate n_tokens new tokens after each prompt (a list of token id lists), yielding them as they come: per
    chunk, one list of new ids per prompt. options: request_controls's. With eot_token, a row stops at that token
    (which is not yielded). A caller may end rows early by sending their indices (`chunks.send([row, ...])`, as
    text_stream does at a stop string): they yield nothing more, and once all have ended the generation stops.
    kv_dtype: the KV cache's ("bfloat16" halves its memory; None: the compute dtype). batch_streams passes first_row
    (the index of prompts[0] in its whole request, which picks the random stream) and shapes (the padded prompt and
    cache lengths) when it splits a request into batches."""
    check_request(hparams, prompts, n_tokens, **options)
    params, lengths = gpt.unstack_layers(params), [len(p) for p in prompts]
    prompt_len, cache_len = shapes or padded_lengths(hparams, prompts, n_tokens)
    ids = np.zeros((len(prompts), prompt_len), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = prompt
    controls = request_controls(hparams, len(prompts), eot_token=eot_token, first_row=first_row, **options)
    static = {"n_head": hparams["n_head"], "greedy": options.get("greedy", False)}
    state = prefill(params, ids, np.array(lengths, np.int32), controls, cache_len=cache_len, kv_dtype=kv_dtype,
                    **static)
    finished = [False] * len(prompts)
    chunk, remaining = state["token"][:, None], n_tokens - 1  # the first token comes alone, as soon as it can
    while True:
        ended = yield cut_finished_rows(np.asarray(chunk).tolist(), finished, eot_token)
        for row in ended or ():
            finished[row] = True
        if remaining == 0 or all(finished):
            return
        if ended:
            state = end_rows(state, np.array(finished))
        n = min(CHUNK, remaining)
        out, state = decode(params, state, np.int32(n), controls, chunk=CHUNK, **static)
        chunk, remaining = out["token"][:, :n], remaining - n


@partial(jax.jit, donate_argnames=("state",))
def end_rows(state: dict, ended: Bool[Array, " batch"]) -> dict:  # the rows that ended emit the eot token from now on
    return {**state, "done": state["done"] | ended}


def cut_finished_rows(rows, finished, eot_token):  # each row's tokens before its first eot_token; updates finished
    out = []
    for row, tokens in enumerate(rows):
        if finished[row]:
            tokens = []
        elif eot_token in tokens:
            tokens, finished[row] = tokens[:tokens.index(eot_token)], True
        out.append(tokens)
    return out


def generate(params, hparams, prompts, n_tokens, *, max_rows=None, kv_dtype=None, **options):
    """generate_stream's chunks joined: a list with the list of new token ids of each prompt (batch_streams's
    batches, one after the other)."""
    out = []
    for _, stream in batch_streams(params, hparams, prompts, n_tokens, max_rows=max_rows, kv_dtype=kv_dtype,
                                   **options):
        rows = None
        for chunk in stream:
            rows = rows or [[] for _ in chunk]
            for row, tokens in zip(rows, chunk):
                row.extend(tokens)
        out += rows
    return out


def batch_streams(params, hparams, prompts, n_tokens, *, samples=1, max_rows=None, eot_token=None, kv_dtype=None,
                  **options):
    """-> (the rows it generates for, their generate_stream) per batch, to be run one after the other. The request's
    rows are each prompt `samples` times (row i: prompts[i // samples]), made batch by batch: 10^8 samples take the
    memory of one batch. A request of more rows than fit in memory at once (max_rows; by default what BATCH_BYTES
    allows) runs as several batches, each row with the random stream and padded shapes it has in the whole request,
    so that the batches give the tokens of one."""
    check_request(hparams, prompts, n_tokens, **options)
    shapes = padded_lengths(hparams, prompts, n_tokens)
    max_rows = max_rows or rows_that_fit(hparams, *shapes, jnp.dtype(kv_dtype or gpt.dtype(params)).itemsize)
    n_rows = len(prompts) * samples
    for first in range(0, n_rows, max_rows):
        rows = range(first, min(first + max_rows, n_rows))
        yield rows, generate_stream(params, hparams, [prompts[row // samples] for row in rows], n_tokens,
                                    eot_token=eot_token, first_row=first, shapes=shapes, kv_dtype=kv_dtype, **options)


# ------------------------------------------------------------------------------------------------ text


def text_stream(chunks, decode, stops):
    """generate_stream's chunks -> per chunk, each row's new text, then a last list with each row's tail. decode:
    token ids -> text; stops: each row's stop strings. A row's text ends before the first of its stop strings that
    it reaches, and the row is then ended (sent to chunks); see visible_text for what is held back. The pieces join
    into cut_at_stop(decode(all the row's ids), its stops)[0]: nothing given is taken back."""
    ids, shown, stopped = [[] for _ in stops], [""] * len(stops), [False] * len(stops)
    chunk = next(chunks)
    while True:
        pieces, ended = [], []
        for row, new in enumerate(chunk):
            ids[row] += new
            if stopped[row] or not new:
                pieces.append("")
                continue
            text, stopped[row] = visible_text(decode(ids[row]), stops[row])
            ended += [row] * stopped[row]
            pieces.append(text[len(shown[row]):])
            shown[row] = text
        yield pieces
        try:
            chunk = chunks.send(ended)
        except StopIteration:
            break
    yield ["" if stopped[row] else cut_at_stop(decode(ids[row]), stops[row])[0][len(shown[row]):]
           for row in range(len(ids))]


def visible_text(text: str, stop) -> tuple[str, bool]:
    """(the part of a continuation's text so far that can be shown, whether it reached a stop string): the text
    before the first stop string, or, while none has come, without a tail that could still change: the start of a
    stop string, or a character whose UTF-8 bytes span several tokens (U+FFFD until its last byte has come)."""
    text, stopped = cut_at_stop(text.rstrip("\ufffd"), stop)
    return (text, True) if stopped else (text[:len(text) - held_back(text, stop)], False)


def joined(pieces) -> list[str]:  # text_stream's pieces -> each row's whole text
    texts = None
    for row_pieces in pieces:
        texts = row_pieces if texts is None else [text + piece for text, piece in zip(texts, row_pieces)]
    return texts


def cut_at_stop(text: str, stop) -> tuple[str, bool]:  # (text before the earliest stop string, whether one was found)
    cut = min((text.find(s) for s in stop if s and s in text), default=None)
    return (text, False) if cut is None else (text[:cut], True)


def held_back(text: str, stop) -> int:  # the length of the longest tail of text that begins a stop string
    return max((n for s in stop for n in range(min(len(s) - 1, len(text)), 0, -1) if text.endswith(s[:n])),
               default=0)


def padded_lengths(hparams, prompts, n_tokens):  # -> (padded prompt length, KV cache length) of a request
    longest = max(len(p) for p in prompts)
    prompt_len = bucket(longest, hparams["n_ctx"])  # prefill writes all of it to the cache
    return prompt_len, max(prompt_len, cache_length(longest + n_tokens, hparams["n_ctx"]))


def rows_that_fit(hparams: dict, prompt_len: int, cache_len: int, itemsize: int) -> int:
    """How many rows one batch may hold: each holds a KV cache (K and V), its prefill's activations for one layer at
    a time (the attention scores of its prompt against the whole cache, their softmax and the weights, and a few
    [prompt_len, n_embd] arrays) and a few copies of its logits (the penalties' counts and logit_bias among them);
    BATCH_BYTES of these per batch. Checked against XLA's plan for the compiled prefill, which it bounds from above
    (by up to ~1.8x at long prompts)."""
    n_embd, n_layer, n_head = hparams["n_embd"], hparams["n_layer"], hparams["n_head"]
    per_row = (2 * n_layer * cache_len * n_embd * itemsize
               + prompt_len * (16 * n_embd + 3 * n_head * cache_len) * 4
               + 11 * hparams["n_vocab"] * 4)
    return max(1, BATCH_BYTES // per_row)


def check_seed(seed):
    if not isinstance(seed, (int, np.integer)) or not 0 <= seed < 2**63:
        raise ValueError(f"seed must be an integer from 0 to 2**63 - 1, got {seed!r}")
