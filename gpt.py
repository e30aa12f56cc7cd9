"""GPT-2 as pure JAX functions over a nested dict of parameters.

The params dict mirrors OpenAI's checkpoint names (wte, wpe, h/ln_1/g, h/attn/c_attn/w, ..., ln_f/b), except that
the per-layer blocks h0, h1, ... are stacked into one "h" subtree with a leading [n_layer] axis, so the layers run
under `lax.scan`: compile time stays flat with depth. Decoding runs on the other layout, "h" as a list of per-layer
dicts (unstack_layers), whose weights a CPU reads in place; transformer takes either. The functions take one sequence
([n_seq] ids) or a batch of equal-length ones ([batch, n_seq]): every position-wise step acts on the last axis,
attention on the last two. The KV caches (one per layer) hold the same leading axes; sampling.py decodes rows of
different lengths in one cache, each row at its own position with its own mask of cached slots
(causal_self_attention's past and slot). Any matrix may be int8 (quant.py).

    logits = gpt(params, ids, n_head)                            # [..., n_seq] -> [..., n_seq, n_vocab]
    layers = unstack_layers(params)                              # per-layer weights, for decoding
    x, caches = transformer(layers, ids, n_head, caches, pos)    # with KV caches (empty_caches)

Shapes and dtypes are declared with jaxtyping annotations (Float[Array, "*batch n_seq n_embd"]: any leading axes,
then the named ones, which must agree across a call's arguments and result); the tests check them at run time.

The compute dtype is the params' dtype (float32, or bfloat16 via `cast`); LayerNorm statistics, attention softmax and
the loss are always computed in float32. For finetuning big models: `remat=True` recomputes each block's activations
in the backward pass (gradient checkpointing), and LoRA adapters are a second dict that `with_adapters` puts beside
the frozen weights (`init_adapters`, `merge_adapters`).
"""
import math
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray, UInt32

import quant

Position = int | Int[Array, ""]  # a position in the sequence: a Python int, or a traced scalar


def wide(dtype):  # the dtype for sums and statistics: float32, or float64 when the params are float64
    return jnp.promote_types(dtype, jnp.float32)


def gelu(x: Float[Array, "*shape"]) -> Float[Array, "*shape"]:  # GPT-2 uses the tanh approximation
    return 0.5 * x * (1 + jnp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))


def layer_norm(x: Float[Array, "*rows n_embd"], g: Float[Array, " n_embd"], b: Float[Array, " n_embd"] | None = None,
               eps: float = 1e-5) -> Float[Array, "*rows n_embd"]:
    y = normalized(x.astype(wide(x.dtype)), eps) * g
    return (y if b is None else y + b).astype(x.dtype)


def linear(x: Float[Array, "*rows n_in"], w: Float[Array, "n_in n_out"] | dict, b: Float[Array, " n_out"] | None = None,
           lora_a: Float[Array, "n_in rank"] | None = None,
           lora_b: Float[Array, "rank n_out"] | None = None) -> Float[Array, "*rows n_out"]:
    # w: a matrix, or an int8 one (quant.py, which stores it transposed and packed). One 2-D matmul over the rows of
    # all sequences: for a [batch, n_seq, n_in] operand XLA:CPU computes the weight gradient by first copying the
    # activations transposed, which made training ~1.3x slower
    rows = x.reshape(-1, x.shape[-1])
    y = quant.matmul(rows, w) if quant.is_quantized(w) else rows @ w
    if lora_a is not None:  # a low-rank adapter (LoRA, see with_adapters): x W + (x A) B, never forming A B
        y = y + (rows @ lora_a) @ lora_b
    y = y.reshape(*x.shape[:-1], y.shape[-1])
    return y if b is None else y + b


def dropout(x: Float[Array, "*shape"], rate: float, key: PRNGKeyArray | None) -> Float[Array, "*shape"]:
    # identity when rate is 0 or there is no key (inference)
    if rate == 0.0 or key is None:
        return x
    keep = random_bits(key, x.shape) >= jnp.uint32(min(round(rate * 2**32), 2**32 - 1))  # P(keep) = 1 - rate
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


def attention(q: Float[Array, "*batch n_head n_q head_dim"], k: Float[Array, "*batch n_head n_k head_dim"],
              v: Float[Array, "*batch n_head n_k head_dim"], mask: Bool[Array, "n_q n_k"], dropout_rate: float = 0.0,
              key: PRNGKeyArray | None = None) -> Float[Array, "*batch n_head n_q head_dim"]:
    scores = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=wide(q.dtype)) / math.sqrt(q.shape[-1])
    scores = jnp.where(mask, scores, jnp.finfo(scores.dtype).min)
    weights = dropout(jax.nn.softmax(scores, axis=-1).astype(v.dtype), dropout_rate, key)
    return jnp.einsum("...qk,...kd->...qd", weights, v)


def cached_attention(q: Float[Array, "*batch n_head n_q head_dim"], k: Float[Array, "*batch n_head n_q head_dim"],
                     v: Float[Array, "*batch n_head n_q head_dim"],
                     cache_k: Float[Array, "*batch n_head n_cache head_dim"],
                     cache_v: Float[Array, "*batch n_head n_cache head_dim"],
                     past: Bool[Array, "*batch n_cache"] | None) -> Float[Array, "*batch n_head n_q head_dim"]:
    # a chunk's attention over the cached slots that past marks and, causally, over itself: one softmax over both,
    # joined by hand so that neither the cache nor the scores are concatenated (copied). past None: nothing cached
    def scores(keys, mask):
        s = jnp.einsum("...hqd,...hkd->...hqk", q, keys.astype(q.dtype), preferred_element_type=wide(q.dtype))
        return jnp.where(mask, s / math.sqrt(q.shape[-1]), -jnp.inf)

    n_q = q.shape[-2]
    new = scores(k, jnp.arange(n_q)[None, :] <= jnp.arange(n_q)[:, None])  # the diagonal: never all masked
    if past is None:
        return jnp.einsum("...hqk,...hkd->...hqd", jax.nn.softmax(new, axis=-1).astype(v.dtype), v)
    old = scores(cache_k, past[..., None, None, :])
    top = jnp.maximum(old.max(-1, keepdims=True), new.max(-1, keepdims=True))
    old, new = jnp.exp(old - top), jnp.exp(new - top)
    total = old.sum(-1, keepdims=True) + new.sum(-1, keepdims=True)
    out = (jnp.einsum("...hqk,...hkd->...hqd", old.astype(v.dtype), cache_v.astype(v.dtype),
                      preferred_element_type=old.dtype)
           + jnp.einsum("...hqk,...hkd->...hqd", new.astype(v.dtype), v, preferred_element_type=new.dtype))
    return (out / total).astype(q.dtype)


def after(x: Float[Array, "*shape"], dep: Float[Array, "*shape"]) -> Float[Array, "*shape"]:
    # x, as a value computed from dep: an in-place update of a buffer that dep read is then ordered after the read.
    # XLA:CPU keeps no such order through lax.optimization_barrier and copies the whole buffer instead (a KV cache, at
    # every decoding step); a data dependency it cannot simplify away (0 * dep is NaN for NaN dep) keeps it.
    return x + 0 * dep


def causal_self_attention(x: Float[Array, "*batch n_seq n_embd"], c_attn: dict, c_proj: dict, n_head: int,
                          cache: dict | None, pos: Position | Int[Array, "*batch"],
                          dropout_rate: float = 0.0, key: PRNGKeyArray | None = None,
                          past: Bool[Array, "*batch n_cache"] | None = None,
                          slot: Position | None = None) -> tuple[Float[Array, "*batch n_seq n_embd"], dict | None]:
    # With a cache ({"k", "v": [*batch, n_head, n_cache, head_dim]}, this layer's), x attends over the cached slots that
    # past marks (default: those before pos) and over itself, and its keys and values are written at slots slot..
    # (default: the largest pos) of every row: one slot for all rows, so that the write is one in-place
    # dynamic-update-slice (per-row slots make it a scatter, which XLA:CPU ran as several copies of the whole cache).
    # sampling.py decodes rows of different lengths this way: each row's past skips the slots between its prompt
    # and the others'.
    *lead, n_seq, n_embd = x.shape
    q, k, v = jnp.split(linear(x, **c_attn), 3, axis=-1)
    q, k, v = (t.reshape(*lead, n_seq, n_head, n_embd // n_head) for t in (q, k, v))  # [..., n_seq, n_head, head_dim]
    if cache is None and use_flash_attention(q.dtype) and (dropout_rate == 0.0 or key is None):
        out = jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    else:
        q, k, v = (t.swapaxes(-3, -2) for t in (q, k, v))  # [..., n_head, n_seq, head_dim]: heads lead, as matmuls want
        if cache is None:
            mask = jnp.arange(n_seq)[None, :] <= (pos + jnp.arange(n_seq))[:, None]
            out = attention(q, k, v, mask, dropout_rate, key)
        else:
            # Reading the cache before the write lets XLA update it in place: read after, the write was fused into
            # each reader and the whole cache copied several times a step (124M: ~10 ms of a 20 ms step). The cache
            # is head-major for the same reason as q, k, v: a sequence-major one was transposed (copied whole) for the
            # matmuls at every step.
            n_cache = cache["k"].shape[-2]
            if past is None and not (isinstance(pos, int) and pos == 0):  # at position 0 nothing is cached yet
                past = jnp.broadcast_to(jnp.arange(n_cache) < jnp.asarray(pos)[..., None], (*lead, n_cache))
            slot = jnp.max(pos) if slot is None else slot
            out = cached_attention(q, k, v, cache["k"], cache["v"], past)
            at = (0,) * len(lead) + (0, slot, 0)
            cache = {name: lax.dynamic_update_slice(c, after(new, out).astype(c.dtype), at)
                     for name, c, new in (("k", cache["k"], k), ("v", cache["v"], v))}
        out = out.swapaxes(-3, -2)
    out = out.reshape(*lead, n_seq, n_embd)
    return linear(out, **c_proj), cache


def mlp(x: Float[Array, "*rows n_embd"], c_fc: dict, c_proj: dict) -> Float[Array, "*rows n_embd"]:
    return linear(gelu(linear(x, **c_fc)), **c_proj)


def block(x: Float[Array, "*batch n_seq n_embd"], p: dict, n_head: int, cache: dict | None,
          pos: Position | Int[Array, "*batch"], dropout_rate: float = 0.0, key: PRNGKeyArray | None = None,
          past: Bool[Array, "*batch n_cache"] | None = None,
          slot: Position | None = None) -> tuple[Float[Array, "*batch n_seq n_embd"], dict | None]:
    # dropout where GPT-2 and nanoGPT put it: on the attention weights and on each residual branch
    k_weights, k_attn, k_mlp = (None, None, None) if key is None else jax.random.split(key, 3)
    a, cache = causal_self_attention(layer_norm(x, **p["ln_1"]), **p["attn"], n_head=n_head, cache=cache, pos=pos,
                                     dropout_rate=dropout_rate, key=k_weights, past=past, slot=slot)
    x = x + dropout(a, dropout_rate, k_attn)
    x = x + dropout(mlp(layer_norm(x, **p["ln_2"]), **p["mlp"]), dropout_rate, k_mlp)
    return x, cache


def transformer(params: dict, ids: Int[Array, "*batch n_seq"], n_head: int, caches: list | None = None,
                pos: Position | Int[Array, "*batch"] = 0, past: Bool[Array, "*batch n_cache"] | None = None,
                slot: Position | None = None, dropout_rate: float = 0.0, key: PRNGKeyArray | None = None,
                unroll: bool = False, remat: bool = False) -> tuple[Float[Array, "*batch n_seq n_embd"], list | None]:
    """The final hidden states (after ln_f), and the updated KV caches. Two layouts of params["h"], one computation:
    stacked arrays [n_layer, ...] (training: a lax.scan over the layers) or a list of per-layer dicts
    (unstack_layers; decoding and scoring, with per-layer caches from empty_caches, or none). caches, past and slot:
    see causal_self_attention. Dropout (key) draws each layer's masks from fold_in(key, layer) in both."""
    x = embed(params, ids, pos)
    if key is not None:
        key, k_embd = jax.random.split(key)
        x = dropout(x, dropout_rate, k_embd)
    layer_key = lambda layer: None if key is None else jax.random.fold_in(key, layer)
    if isinstance(params["h"], list):
        # Decoding reads every weight once a token, and is bound by that traffic: on a CPU, XLA copies each layer's
        # slice of a stacked array before a matmul reads it (124M: ~2x slower), while separate arrays are read in
        # place. The price: the compiled code grows with n_layer.
        out = []
        for layer, (p, cache) in enumerate(zip(params["h"], caches or [None] * len(params["h"]))):
            x, cache = block(x, p, n_head, cache, pos, dropout_rate, layer_key(layer), past, slot)
            out.append(cache)
        return layer_norm(x, **params["ln_f"]), None if caches is None else out
    if caches is not None:
        raise ValueError("KV caches go with per-layer params: decode with gpt.unstack_layers(params)")

    def layer_step(x, layer_in):
        p, layer = layer_in
        return run_block(x, p, n_head, None, pos, dropout_rate, layer_key(layer))[0], None

    run_block = block
    if remat:  # gradient checkpointing: keep each block's input and the matmul outputs its backward pass needs (costly
        # to recompute; 9 n_embd floats a token and layer in all), recompute the rest in the backward pass: LayerNorms,
        # GELU, dropout masks and the attention weights ([n_head, n_seq, n_seq] a sequence, the largest at long blocks)
        run_block = jax.checkpoint(block, static_argnums=(2, 4, 5),  # n_head, pos, dropout_rate
                                   policy=jax.checkpoint_policies.dots_with_no_batch_dims_saveable)

    n_layer = n_layers(params)
    # The rolled loop keeps compile time flat with depth. Training unrolls it (unroll=True): slicing each layer out of
    # the stack and stacking the gradients back cost ~25% of a 124M step on a GPU and ~15% of a small model's on a CPU.
    # With remat the loop stays rolled: unrolled, XLA schedules the recomputation beside the forward pass and the
    # memory saved is lost (measured: 4 layers, block 256, batch 8: 158 -> 46 MB of temporaries rolled, none unrolled)
    x, _ = lax.scan(layer_step, x, (params["h"], jnp.arange(n_layer)), unroll=n_layer if unroll and not remat else 1)
    return layer_norm(x, **params["ln_f"]), None


def embed(params: dict, ids: Int[Array, "*batch n_seq"],
          pos: Position | Int[Array, "*batch"] = 0) -> Float[Array, "*batch n_seq n_embd"]:
    # token embeddings (rows of wte, or of its int8 form) plus the positions' from pos on (one pos, or one a row)
    wte = params["wte"]
    tokens = quant.embed(wte, ids, dtype(params)) if quant.is_quantized(wte) else wte[ids]
    if jnp.ndim(pos) == 0:
        return tokens + lax.dynamic_slice_in_dim(params["wpe"], pos, ids.shape[-1]).astype(tokens.dtype)
    return tokens + params["wpe"][pos[..., None] + jnp.arange(ids.shape[-1])].astype(tokens.dtype)


def dtype(params: dict):  # the compute dtype: the params' (wpe is never quantized)
    return params["wpe"].dtype


def unembed(params: dict, x: Float[Array, "*rows n_embd"]) -> Float[Array, "*rows n_vocab"]:
    # the LM head is tied to the token embedding
    if quant.is_quantized(params["wte"]):
        return quant.matmul(x, params["wte"]).astype(wide(x.dtype))
    # multiply in the params' dtype and upcast after: with bf16 weights the backward pass then stays on bf16 tensor
    # cores (a float32 result would make the two gradient matmuls float32, 2x slower for a 124M training step on GPU).
    # The rows are flattened for the reason given in `linear`.
    logits = jnp.einsum("ne,ve->nv", x.reshape(-1, x.shape[-1]), params["wte"]).astype(wide(x.dtype))
    return logits.reshape(*x.shape[:-1], logits.shape[-1])


def gpt(params: dict, ids: Int[Array, "*batch n_seq"], n_head: int) -> Float[Array, "*batch n_seq n_vocab"]:
    x, _ = transformer(params, ids, n_head)
    return unembed(params, x)


def empty_caches(params: dict, batch: int, n_head: int, cache_len: int, kv_dtype=None) -> list:
    # transformer's KV caches for per-layer params: per layer {"k", "v": [batch, n_head, cache_len, head_dim]}, zeros
    # in kv_dtype (None: the compute dtype)
    shape, kv_dtype = (batch, n_head, cache_len, params["wpe"].shape[1] // n_head), kv_dtype or dtype(params)
    return [{"k": jnp.zeros(shape, kv_dtype), "v": jnp.zeros(shape, kv_dtype)} for _ in range(n_layers(params))]


def n_layers(params: dict) -> int:  # in either layout
    return len(params["h"]) if isinstance(params["h"], list) else params["h"]["ln_1"]["g"].shape[0]


def unstack_layers(params: dict) -> dict:
    """params with "h" as a list of per-layer dicts instead of arrays stacked over the layers: the layout decoding
    runs on (see transformer). On a CPU the layers are views of the stacked arrays (no copy, ~20 ms for 124M)."""
    if isinstance(params["h"], list):
        return params
    return {**params, "h": [jax.tree.map(lambda w, i=i: layer_of(w, i), params["h"]) for i in range(n_layers(params))]}


def layer_of(w, i):  # [n_layer, ...] -> [...], its own array
    if all(d.platform == "cpu" for d in w.devices()):  # jax adopts the (aligned) memory of a numpy view: no copy
        return jax.device_put(np.asarray(w)[i], w.sharding)
    return w[i]


def lm_loss(params: dict, ids: Int[Array, "*batch n_seq"], targets: Int[Array, "*batch n_seq"], n_head: int,
            dropout_rate: float = 0.0, key: PRNGKeyArray | None = None, unroll: bool = False,
            remat: bool = False) -> Float[Array, ""]:
    # mean cross-entropy in nats over all the targets; targets < 0 are ignored (padding)
    x, _ = transformer(params, ids, n_head, dropout_rate=dropout_rate, key=key, unroll=unroll, remat=remat)
    logits = unembed(params, x)
    valid = targets >= 0
    # logsumexp minus the target's logit, picked by comparing against a vocabulary iota rather than a gather: both
    # directions then fuse into elementwise passes over [n_seq, n_vocab] instead of a scatter in the backward pass
    is_target = jnp.arange(logits.shape[-1]) == targets[..., None]
    target_logits = jnp.sum(jnp.where(is_target, logits, 0.0), axis=-1)
    nll = jax.nn.logsumexp(logits, axis=-1) - target_logits
    return jnp.sum(jnp.where(valid, nll, 0.0)) / jnp.maximum(valid.sum(), 1)


def init_params(key: PRNGKeyArray, hparams: dict, dtype=jnp.float32, bias: bool = True) -> dict:
    # GPT-2's initialisation: N(0, 0.02) matrices, N(0, 0.01) positions, zero biases, unit LayerNorm gains, and the
    # projections into the residual stream scaled by 1/sqrt(2 * n_layer) so its variance does not grow with depth.
    # bias=False: no "b" in the linear layers and LayerNorms (nanoGPT's option), which the functions then leave out
    n_vocab, n_ctx, E, L = hparams["n_vocab"], hparams["n_ctx"], hparams["n_embd"], hparams["n_layer"]
    k = iter(jax.random.split(key, 6))
    normal = lambda key, shape, std: (std * jax.random.normal(key, shape, jnp.float32)).astype(dtype)
    ones, zeros = (lambda *s: jnp.ones(s, dtype)), (lambda *s: jnp.zeros(s, dtype))
    proj_std = 0.02 / math.sqrt(2 * L)
    params = {
        "wte": normal(next(k), (n_vocab, E), 0.02),
        "wpe": normal(next(k), (n_ctx, E), 0.01),
        "h": {
            "ln_1": {"g": ones(L, E), "b": zeros(L, E)},
            "attn": {"c_attn": {"w": normal(next(k), (L, E, 3 * E), 0.02), "b": zeros(L, 3 * E)},
                     "c_proj": {"w": normal(next(k), (L, E, E), proj_std), "b": zeros(L, E)}},
            "ln_2": {"g": ones(L, E), "b": zeros(L, E)},
            "mlp": {"c_fc": {"w": normal(next(k), (L, E, 4 * E), 0.02), "b": zeros(L, 4 * E)},
                    "c_proj": {"w": normal(next(k), (L, 4 * E, E), proj_std), "b": zeros(L, E)}},
        },
        "ln_f": {"g": ones(E), "b": zeros(E)},
    }
    return params if bias else without_biases(params)


def without_biases(params):
    if isinstance(params, dict):
        return {k: without_biases(v) for k, v in params.items() if k != "b"}
    return params


# ------------------------------------------------------------------------------------------------ fast paths
# The same functions as the textbook versions, arranged for speed: LayerNorm's backward pass in one expression, dropout
# bits from a hash rather than threefry, and the gate for cuDNN's fused attention. Each comment gives the measurement.

@partial(jax.custom_vjp, nondiff_argnums=(1,))
def normalized(x: Float[Array, "*rows n"], eps: float) -> Float[Array, "*rows n"]:
    # mean 0 and variance 1 along the last axis
    return normalized_and_saved(x, eps)[0]


def normalized_and_saved(x, eps):  # the forward pass, and what the backward pass needs of it
    centered = x - x.mean(axis=-1, keepdims=True)
    inv_std = lax.rsqrt(jnp.square(centered).mean(axis=-1, keepdims=True) + eps)
    y = centered * inv_std
    return y, (y, inv_std)


def normalized_backward(eps, saved, dy):
    # the textbook gradient in one expression: autodiff's own ran to several more passes over the activations
    # (a training step ~5% slower on a CPU)
    y, inv_std = saved
    return (inv_std * (dy - dy.mean(axis=-1, keepdims=True) - y * (dy * y).mean(axis=-1, keepdims=True)),)


normalized.defvjp(normalized_and_saved, normalized_backward)


def random_bits(key: PRNGKeyArray, shape: tuple[int, ...]) -> UInt32[Array, "..."]:
    # a keyed hash of each element's index, shaped shape
    # Not jax.random.bits: threefry runs on a CPU as a loop of unfused passes over the whole array (~1/6 of a baby
    # GPT's training step, for its dropout masks). This hash is a few integer ops that fuse into the multiply, and it
    # depends only on the key and the element's global index, so the bits do not depend on how x is sharded.
    k0, k1 = jax.random.bits(key, (2,), jnp.uint32)
    row = lax.broadcasted_iota(jnp.uint32, shape, 0) if shape else jnp.uint32(0)
    col = jnp.zeros(shape, jnp.uint32)  # the element's index within its row (the leading axis)
    for axis in range(1, len(shape)):
        col = col * jnp.uint32(shape[axis]) + lax.broadcasted_iota(jnp.uint32, shape, axis)
    return mix32(mix32(mix32(row ^ k0) ^ col) ^ k1)


def mix32(h: UInt32[Array, "*shape"]) -> UInt32[Array, "*shape"]:
    # a bijection in which every input bit flips each output bit with probability ~1/2 (MurmurHash3's finaliser)
    h = (h ^ (h >> 16)) * jnp.uint32(0x85EBCA6B)
    h = (h ^ (h >> 13)) * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def use_flash_attention(dtype):
    # cuDNN's fused attention never materialises the [n_head, n_seq, n_seq] scores: on a GPU in 16-bit it is ~2.5x
    # faster than `attention` and saves most of the training step's activation memory. Elsewhere, and when the
    # attention weights need dropout (which it does not offer), `attention` is used.
    return jax.default_backend() == "gpu" and dtype in (jnp.bfloat16, jnp.float16)


# ------------------------------------------------------------------------------------------------ LoRA
# Low-rank adapters (Hu et al., 2021): a frozen matrix W [n_in, n_out] gets a trainable A [n_in, r] and B [r, n_out],
# and the layer computes x W + (alpha / r) x A B. The adapters are a dict of their own, shaped like the params they
# adapt: {"h": {"attn": {"c_attn": {"lora_a": [n_layer, n_in, r], "lora_b": [n_layer, r, n_out]}, ...}, ...}}.

LORA_TARGETS = ("attn/c_attn", "attn/c_proj", "mlp/c_fc", "mlp/c_proj")


def init_adapters(key: PRNGKeyArray, params: dict, rank: int, targets: tuple[str, ...] = LORA_TARGETS) -> dict:
    # A ~ N(0, 1 / n_in), B = 0: the adapted model starts as the base model exactly
    adapters = {}
    for i, target in enumerate(targets):
        group, name = target.split("/")
        w = params["h"][group][name]["w"]  # [n_layer, n_in, n_out]
        n_layer, n_in, n_out = w.shape
        a = jax.random.normal(jax.random.fold_in(key, i), (n_layer, n_in, rank), jnp.float32) / jnp.sqrt(n_in)
        adapters.setdefault(group, {})[name] = {"lora_a": a, "lora_b": jnp.zeros((n_layer, rank, n_out), jnp.float32)}
    return {"h": adapters}


def with_adapters(params: dict, adapters: dict, scale: float) -> dict:
    # params whose adapted layers also hold lora_a and lora_b * scale
    return map_adapted(params, adapters, lambda p, ab: {**p, "lora_a": ab["lora_a"], "lora_b": ab["lora_b"] * scale})


def merge_adapters(params: dict, adapters: dict, scale: float) -> dict:  # plain params computing the same: W + s A B
    return map_adapted(params, adapters,
                        lambda p, ab: {**p, "w": p["w"] + scale * (ab["lora_a"] @ ab["lora_b"]).astype(p["w"].dtype)})


def map_adapted(params, adapters, update):  # params with update(layer, its adapter) for each adapted layer's dict
    h = {group: dict(layers) for group, layers in params["h"].items()}
    for group, layers in adapters["h"].items():
        for name, ab in layers.items():
            h[group][name] = update(h[group][name], ab)
    return {**params, "h": h}


def cast(params: dict, dtype) -> dict:  # e.g. cast(params, jnp.bfloat16): bf16 inference or mixed-precision compute
    # (quant.py's int8 matrices stay int8: only their scales take dtype)
    return jax.tree.map(lambda p: p if p.dtype == jnp.int8 else p.astype(dtype), params)


def count_params(params: dict) -> int:
    return sum(p.size for p in jax.tree.leaves(params))


def flops_per_token(params, hparams, block_size):
    # PaLM's (and nanoGPT's) estimate for a forward + backward pass: 6 N + 12 L H Q T, N the parameters without the
    # position table, L layers, H heads of size Q, T the sequence length
    n = count_params(params) - params["wpe"].size
    L, H, Q = hparams["n_layer"], hparams["n_head"], hparams["n_embd"] // hparams["n_head"]
    return 6 * n + 12 * L * H * Q * block_size
