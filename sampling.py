"""Text generation with GPT-2: prefill the prompt, then decode token by token from a KV cache, all jitted.

    new_ids = generate(params, hparams, [ids1, ids2], 40, top_k=40, seed=1)    # [[40 ids], [40 ids]]
    for chunk in generate_stream(params, hparams, [ids], 40, greedy=True):     # [[<= 16 ids]] at a time
        ...

How it runs:
  - Prompts of different lengths form one batch: right-padded to a bucket length (a power of two, >= 16), run through
    the model together (`jax.vmap` over rows), each row then decoding at its own position. Padding never reaches a
    row's result: the cache slots it fills lie after the row's position and are masked, then overwritten.
  - Prefill computes hidden states for the whole padded prompt but unembeds only each row's last real position.
  - Decoding runs in chunks of up to CHUNK tokens, each one jitted `lax.while_loop` with the KV cache in its carry
    (updated in place) and donated from chunk to chunk; the host only collects each chunk's tokens. generate() is
    generate_stream() with its chunks joined, so the two cannot disagree.
  - Shapes are bucketed (prompt length, cache length) and the number of steps in a chunk is a traced value, so one
    compiled prefill and one compiled decode serve every prompt and length in a bucket; jax.jit keeps them per
    (shapes, batch, sampling options) for the life of the process, and enable_compilation_cache() keeps them on disk.
  - Sampling: greedy (argmax), or temperature, then top-k, then top-p (nucleus), drawn with a key derived from
    (seed, row, token index): the same seed gives the same tokens whatever the chunking, and row 0 of a batch draws
    exactly what the same prompt draws alone.
"""
import os
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

import gpt

CHUNK = 16  # tokens per jitted decode call: the granularity of streaming (a host round trip costs ~0.1 ms)
MIN_BUCKET = 16


def enable_compilation_cache(path=None):
    """Keep compiled programs on disk, so a new process skips most of the compile time of generation and training.
    path defaults to $GPTJAX_COMPILATION_CACHE, else ~/.cache/gptjax/jax."""
    path = path or os.environ.get("GPTJAX_COMPILATION_CACHE") or os.path.expanduser("~/.cache/gptjax/jax")
    jax.config.update("jax_compilation_cache_dir", path)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


def bucket(n, n_ctx):  # the padded length for n tokens: the next power of two, at least MIN_BUCKET, at most n_ctx
    return min(max(MIN_BUCKET, 1 << (n - 1).bit_length()), n_ctx)


# ------------------------------------------------------------------------------------------------ choosing a token


def filter_logits(logits, top_k=None, top_p=None):  # [n_vocab] -> [n_vocab], -inf outside the kept tokens
    if top_k is not None:  # keep the k largest
        kth_largest = lax.top_k(logits, top_k)[0][-1]
        logits = jnp.where(logits < kth_largest, -jnp.inf, logits)
    if top_p is not None:  # keep the smallest set of most likely tokens whose probability adds up to >= top_p
        sorted_logits = -jnp.sort(-logits)
        probs = jax.nn.softmax(sorted_logits)
        mass_before = jnp.cumsum(probs) - probs  # a token is kept while the mass of the likelier ones is < top_p,
        n_keep = jnp.sum(mass_before < top_p)  # so the top token always is
        logits = jnp.where(logits < sorted_logits[n_keep - 1], -jnp.inf, logits)
    return logits


def next_tokens(logits, key, step, temperature, top_p, *, greedy, top_k):  # [batch, n_vocab] -> [batch]
    if greedy:
        return jnp.argmax(logits, axis=-1)
    rows = jnp.arange(logits.shape[0])
    keys = jax.vmap(lambda row: jax.random.fold_in(jax.random.fold_in(key, row), step))(rows)
    draw = lambda logits, key: jax.random.categorical(key, filter_logits(logits / temperature, top_k, top_p))
    return jax.vmap(draw)(logits, keys)


# ------------------------------------------------------------------------------------------------ the jitted parts


def unstack_layers(params):
    """params with "h" as a list of per-layer dicts instead of arrays stacked over the layers: the layout generation
    runs on (see transformer below). Generating from the same params many times? Convert them once with this."""
    if isinstance(params["h"], list):
        return params
    return {**params, "h": split_layers(params["h"])}


@jax.jit
def split_layers(h):  # {name: [n_layer, ...]} -> [{name: [...]}] * n_layer, as one compiled copy
    return [jax.tree.map(lambda w: w[layer], h) for layer in range(h["ln_1"]["g"].shape[0])]


def transformer(params, ids, n_head, cache, pos):  # gpt.transformer over per-layer weights  # [n_seq] -> [n_seq, n_embd]
    # Why not gpt.transformer's lax.scan over the stacked layers: on a CPU, XLA copies each layer's slice of the
    # stacked weights before its matmuls, which doubles the memory traffic of decoding (a matrix-vector product per
    # weight), and decoding is bound by that traffic. Separate buffers per layer are read in place.
    x = params["wte"][ids] + lax.dynamic_slice_in_dim(params["wpe"], pos, ids.shape[0]).astype(params["wte"].dtype)
    for layer, p in enumerate(params["h"]):
        x, cache = gpt.block(x, p, n_head, cache, layer, pos)
    return gpt.layer_norm(x, **params["ln_f"]), cache


def forward_rows(params, ids, n_head, cache, pos):
    # [batch, n_seq] ids, per-row caches and start positions (pos: [batch], or one int for all rows)
    # -> [batch, n_seq, n_embd] hidden states, updated caches
    pos_axis = None if isinstance(pos, int) else 0
    return jax.vmap(transformer, in_axes=(None, 0, None, 0, pos_axis))(params, ids, n_head, cache, pos)


def advance(state, logits, key, temperature, top_p, *, greedy, top_k, eot_token):
    # sample each row's next token from logits [batch, n_vocab]; a row that has emitted eot_token keeps emitting it
    token = next_tokens(logits, key, state["step"], temperature, top_p, greedy=greedy, top_k=top_k)
    done = state["done"]
    if eot_token is not None:
        token = jnp.where(done, eot_token, token)
        done = done | (token == eot_token)
    return {**state, "token": token.astype(jnp.int32), "done": done, "step": state["step"] + 1}


@partial(jax.jit, static_argnames=("n_head", "cache_len", "greedy", "top_k", "eot_token"))
def prefill(params, ids, lengths, key, temperature, top_p, *, n_head, cache_len, greedy, top_k, eot_token):
    # [batch, prompt_bucket] right-padded prompts, [batch] their lengths -> the decoding state, holding the first
    # new token of each row
    batch, n_layer, n_embd = ids.shape[0], len(params["h"]), params["wte"].shape[1]
    cache = gpt.init_cache({"n_layer": n_layer, "n_head": n_head, "n_embd": n_embd}, cache_len, params["wte"].dtype)
    cache = jax.tree.map(lambda c: jnp.broadcast_to(c, (batch, *c.shape)), cache)
    x, cache = forward_rows(params, ids, n_head, cache, 0)  # [batch, prompt_bucket, n_embd]
    logits = gpt.unembed(params, x[jnp.arange(batch), lengths - 1])  # [batch, n_vocab]: last real positions only
    state = {"cache": cache, "pos": lengths, "done": jnp.zeros(batch, bool), "step": jnp.int32(0)}
    return advance(state, logits, key, temperature, top_p, greedy=greedy, top_k=top_k, eot_token=eot_token)


@partial(jax.jit, static_argnames=("n_head", "chunk", "greedy", "top_k", "eot_token"), donate_argnames=("state",))
def decode(params, state, n_steps, key, temperature, top_p, *, n_head, chunk, greedy, top_k, eot_token):
    # feed each row's last token and sample the next, n_steps (<= chunk, traced) times -> [batch, chunk] new tokens
    # (columns from n_steps on are padding), and the state to continue from
    def not_finished(carry):
        i, state, _ = carry
        return (i < n_steps) & ~jnp.all(state["done"])  # stop early once every row has emitted eot_token

    def step(carry):
        i, state, out = carry
        x, cache = forward_rows(params, state["token"][:, None], n_head, state["cache"], state["pos"])
        logits = gpt.unembed(params, x[:, 0])  # [batch, n_vocab]
        state = advance({**state, "cache": cache, "pos": state["pos"] + 1}, logits, key, temperature, top_p,
                        greedy=greedy, top_k=top_k, eot_token=eot_token)
        return i + 1, state, out.at[:, i].set(state["token"])

    pad = 0 if eot_token is None else eot_token
    out = jnp.full((state["token"].shape[0], chunk), pad, jnp.int32)
    _, state, out = lax.while_loop(not_finished, step, (jnp.int32(0), state, out))
    return out, state


# ------------------------------------------------------------------------------------------------ the public API


def check_request(hparams, prompts, n_tokens, greedy, temperature, top_k, top_p):
    if not prompts:
        raise ValueError("no prompts given")
    if n_tokens < 1:
        raise ValueError(f"the number of tokens to generate must be at least 1, got {n_tokens}")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i + 1} is empty: give at least one token")
        if len(prompt) + n_tokens > hparams["n_ctx"]:
            raise ValueError(f"a prompt of {len(prompt)} tokens plus {n_tokens} new tokens is {len(prompt) + n_tokens}, "
                             f"more than the model's context of n_ctx={hparams['n_ctx']} tokens: shorten the prompt "
                             f"or generate fewer tokens")
        if not all(0 <= t < hparams["n_vocab"] for t in prompt):
            bad = next(t for t in prompt if not 0 <= t < hparams["n_vocab"])
            raise ValueError(f"token id {bad} in prompt {i + 1} is not in the vocabulary (ids 0..{hparams['n_vocab'] - 1})")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if not greedy and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature} (for the most likely tokens, use greedy decoding)")


def generate_stream(params, hparams, prompts, n_tokens, *, greedy=False, temperature=1.0, top_k=None, top_p=None,
                    seed=0, eot_token=None):
    """Generate n_tokens new tokens after each prompt (a list of token id lists), yielding them as they come: per
    chunk, one list of new ids per prompt. With eot_token, a row stops at that token (which is not yielded)."""
    check_request(hparams, prompts, n_tokens, greedy, temperature, top_k, top_p)
    params = unstack_layers(params)
    n_ctx, lengths = hparams["n_ctx"], [len(p) for p in prompts]
    ids = np.zeros((len(prompts), bucket(max(lengths), n_ctx)), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = prompt
    options = {"n_head": hparams["n_head"], "greedy": greedy, "eot_token": eot_token,
               "top_k": None if greedy or top_k is None else min(top_k, hparams["n_vocab"])}
    sampling = (jax.random.key(seed), jnp.float32(temperature),
                None if greedy or top_p is None or top_p == 1 else jnp.float32(top_p))  # None: that part is not built

    state = prefill(params, ids, np.array(lengths, np.int32), *sampling,
                    cache_len=bucket(max(lengths) + n_tokens, n_ctx), **options)
    finished = [False] * len(prompts)
    chunk, remaining = state["token"][:, None], n_tokens - 1
    while True:
        yield cut_finished_rows(np.asarray(chunk).tolist(), finished, eot_token)
        if remaining == 0 or all(finished):
            return
        n = min(CHUNK, remaining)
        chunk, state = decode(params, state, np.int32(n), *sampling, chunk=CHUNK, **options)
        chunk, remaining = chunk[:, :n], remaining - n


def cut_finished_rows(rows, finished, eot_token):  # each row's tokens before its first eot_token; updates finished
    out = []
    for row, tokens in enumerate(rows):
        if finished[row]:
            tokens = []
        elif eot_token in tokens:
            tokens, finished[row] = tokens[:tokens.index(eot_token)], True
        out.append(tokens)
    return out


def generate(params, hparams, prompts, n_tokens, **options):
    """generate_stream's chunks joined: a list with the list of new token ids of each prompt."""
    rows = [[] for _ in prompts]
    for chunk in generate_stream(params, hparams, prompts, n_tokens, **options):
        for row, tokens in zip(rows, chunk):
            row.extend(tokens)
    return rows
