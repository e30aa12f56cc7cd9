"""gptjax tests: every check is against an independent reference (the fixtures in testdata/, made with
TensorFlow, HF transformers and tiktoken; float64 numpy math; hand-worked cases), offline."""
import http.server
import json
import math
import pathlib
import random
import re
import shutil
import socket
import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy
import urllib3

import encoder
import gpt
import weights

HERE = pathlib.Path(__file__).parent


# ==================== gpt =======================================================================================

TINY_TF = HERE / "testdata" / "gpt2-tiny"
TINY_HF = HERE / "testdata" / "gpt2-tiny-hf"
EXPECTED = json.loads((TINY_TF / "expected.json").read_text())


@pytest.fixture(scope="module", params=["tf", "hf"])
def tiny(request, tmp_path_factory):
    # a copy, so that the converted-weights cache is not written into testdata/
    folder = tmp_path_factory.mktemp(request.param) / "model"
    shutil.copytree(TINY_TF if request.param == "tf" else TINY_HF, folder)
    return weights.load_hparams_and_params(folder)


def test_gpt_last_logits_match_reference(tiny):
    hparams, params = tiny
    for prompt in EXPECTED["prompts"]:
        logits = gpt.gpt(params, jnp.array(prompt["ids"]), hparams["n_head"])
        assert logits.shape == (len(prompt["ids"]), hparams["n_vocab"])
        np.testing.assert_allclose(np.asarray(logits[-1]), prompt["last_logits"], atol=1e-4)
        assert list(np.argsort(-np.asarray(logits[-1]))[:5]) == prompt["last_logits_top5"]["ids"]


def test_gpt_all_position_logits_match_reference(tiny):
    hparams, params = tiny
    logits = gpt.gpt(params, jnp.array(EXPECTED["prompts"][0]["ids"]), hparams["n_head"])
    np.testing.assert_allclose(np.asarray(logits), np.load(TINY_TF / "logits_prompt1.npy"), atol=1e-4)


def test_lm_loss_matches_reference(tiny):
    hparams, params = tiny
    ids = jnp.array(EXPECTED["prompts"][2]["ids"])
    loss = gpt.lm_loss(params, ids[:-1], ids[1:], hparams["n_head"])
    assert abs(float(loss) - EXPECTED["loss_prompt3"]["value"]) < 1e-4
    # targets < 0 are ignored: masking the second half equals the loss over the first half
    half = len(ids) // 2
    masked = jnp.where(jnp.arange(len(ids) - 1) < half, ids[1:], -1)
    first = gpt.lm_loss(params, ids[:-1], masked, hparams["n_head"])
    logits = np.asarray(gpt.gpt(params, ids[:-1], hparams["n_head"]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    manual = -np.mean([logp[i, int(ids[i + 1])] for i in range(half)])
    assert abs(float(first) - manual) < 1e-5


def test_kv_cache_decoding_equals_full_forward(tiny):
    # prefill a few tokens, then feed the rest one by one (and a chunk of 3): every position's logits must equal
    # the cache-free forward pass
    hparams, params = tiny
    ids = jnp.array(EXPECTED["prompts"][2]["ids"][:20])
    full = gpt.gpt(params, ids, hparams["n_head"])
    cache = gpt.init_cache(hparams, max_len=32)
    step = jax.jit(gpt.transformer, static_argnums=2)
    x, cache = step(params, ids[:5], hparams["n_head"], cache, 0)
    got = [gpt.unembed(params, x)]
    pos = 5
    for n in [1, 1, 3] + [1] * 10:
        x, cache = step(params, ids[pos:pos + n], hparams["n_head"], cache, pos)
        got.append(gpt.unembed(params, x))
        pos += n
    np.testing.assert_allclose(np.concatenate(got), np.asarray(full), atol=1e-5)


def test_vmap_batches_rows_independently(tiny):
    hparams, params = tiny
    ids = jnp.array([p["ids"][:6] for p in EXPECTED["prompts"]])
    batched = jax.vmap(gpt.gpt, in_axes=(None, 0, None))(params, ids, hparams["n_head"])
    for row, expect in zip(ids, batched):
        np.testing.assert_allclose(np.asarray(gpt.gpt(params, row, hparams["n_head"])), np.asarray(expect), atol=1e-5)


def test_bfloat16_forward_tracks_float32(tiny):
    hparams, params = tiny
    ids = jnp.array(EXPECTED["prompts"][0]["ids"])
    ref = np.asarray(EXPECTED["prompts"][0]["last_logits"])
    low = gpt.gpt(gpt.cast(params, jnp.bfloat16), ids, hparams["n_head"])
    assert low.dtype == jnp.float32  # logits are accumulated in float32 even from bf16 weights
    err = np.linalg.norm(np.asarray(low[-1]) - ref) / np.linalg.norm(ref)
    assert err < 2e-2, err


def test_init_params_shapes_and_statistics():
    hparams = {"n_vocab": 300, "n_ctx": 32, "n_embd": 64, "n_head": 4, "n_layer": 3}
    params = gpt.init_params(jax.random.PRNGKey(0), hparams)
    ref_params = weights.unflatten(weights.read_hf_params(TINY_HF, weights.hf_hparams(TINY_HF / "config.json")))
    # same tree structure and per-leaf rank as a real checkpoint
    assert jax.tree.structure(params) == jax.tree.structure(ref_params)
    assert params["h"]["attn"]["c_attn"]["w"].shape == (3, 64, 192)
    assert params["h"]["mlp"]["c_proj"]["w"].shape == (3, 256, 64)
    assert abs(float(params["wte"].std()) - 0.02) < 0.002
    assert abs(float(params["h"]["mlp"]["c_proj"]["w"].std()) - 0.02 / math.sqrt(6)) < 0.001
    assert float(jnp.abs(params["h"]["attn"]["c_attn"]["b"]).max()) == 0.0
    # an untrained model predicts close to uniform: loss near ln(n_vocab)
    ids = jnp.arange(20) % 300
    loss = gpt.lm_loss(params, ids[:-1], ids[1:], hparams["n_head"])
    assert abs(float(loss) - math.log(300)) < 0.05
    assert gpt.count_params(params) == sum(x.size for x in jax.tree.leaves(params))


def test_loss_gradient_matches_finite_differences():
    # central differences in float64 on a tiny random model check value_and_grad through scan, attention and LN
    with jax.enable_x64(True):
        hparams = {"n_vocab": 11, "n_ctx": 8, "n_embd": 8, "n_head": 2, "n_layer": 2}
        params = gpt.init_params(jax.random.PRNGKey(1), hparams, dtype=jnp.float64)
        params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.PRNGKey(2), p.shape, p.dtype), params)
        ids = jnp.array([1, 5, 2, 9, 3, 3, 7])
        loss = jax.jit(lambda p: gpt.lm_loss(p, ids[:-1], ids[1:], hparams["n_head"]))
        grads = jax.grad(loss)(params)
        for path in [("h", "attn", "c_attn", "w"), ("h", "mlp", "c_proj", "b"), ("wpe",), ("ln_f", "g")]:
            leaf = params
            for k in path:
                leaf = leaf[k]
            g = grads
            for k in path:
                g = g[k]
            idx = tuple(0 for _ in leaf.shape[:-1]) + (1,)

            def bumped(delta):
                def at(tree, keys):
                    if not keys:
                        return tree.at[idx].add(delta)
                    return {**tree, keys[0]: at(tree[keys[0]], keys[1:])}
                return loss(at(params, path))

            numeric = (bumped(1e-6) - bumped(-1e-6)) / 2e-6
            assert abs(float(g[idx]) - float(numeric)) < 1e-6, path


def test_dropout_is_identity_without_key_and_scales_with_key():
    x = jnp.ones((1000, 8))
    assert gpt.dropout(x, 0.5, None) is x
    y = gpt.dropout(x, 0.25, jax.random.PRNGKey(0))
    kept = np.asarray(y) != 0
    assert abs(kept.mean() - 0.75) < 0.02
    np.testing.assert_allclose(np.asarray(y)[kept], 1 / 0.75, rtol=1e-6)


def test_save_params_round_trips_through_a_model_folder(tmp_path):
    # gptjax's own layout (what train.py writes) loads like any model folder, hparams included
    hparams = {"n_vocab": 50, "n_ctx": 16, "n_embd": 8, "n_head": 2, "n_layer": 2}
    params = gpt.init_params(jax.random.PRNGKey(3), hparams)
    weights.save_params(tmp_path / "out", hparams, params)
    got_hparams, got = weights.load_hparams_and_params(tmp_path / "out")
    assert got_hparams == hparams
    assert jax.tree.structure(got) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not list((tmp_path / "out").glob("*.part"))


# ==================== encoder ===================================================================================

ENCODER_GPT2_DIR = HERE / "testdata" / "gpt2-tiny"
ENCODER_CASES = json.loads((HERE / "testdata" / "tokenizer_cases.json").read_text(encoding="utf-8"))
ENCODER_SHAKESPEARE = HERE / "testdata" / "tinyshakespeare" / "input.txt"
ENCODER_SHAKESPEARE_TOKENS = 338_025  # testdata README


@pytest.fixture(scope="module")
def encoder_fast():
    return encoder.bpe_encoder(ENCODER_GPT2_DIR / "encoder.json", ENCODER_GPT2_DIR / "vocab.bpe", fast=True)


@pytest.fixture(scope="module")
def encoder_pure():
    return encoder.bpe_encoder(ENCODER_GPT2_DIR / "encoder.json", ENCODER_GPT2_DIR / "vocab.bpe", fast=False)


@pytest.fixture(scope="module", params=["fast", "pure"])
def encoder_gpt2(request, encoder_fast, encoder_pure):
    return encoder_fast if request.param == "fast" else encoder_pure


def encoder_write_tiny_vocab(folder, merges, extra_ids=()):
    """A GPT-2-style vocabulary: the 256 bytes (ids 0..255), then one token per merge, in order."""
    vocab = {c: b for b, c in encoder.BYTE_TO_CHAR.items()}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab.update(extra_ids)
    (folder / "encoder.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab


# ------------------------------------------------------------------------------------------------ GPT-2 BPE

def test_encoder_paths_are_what_they_claim(encoder_fast, encoder_pure):
    assert encoder_fast.fast and encoder_fast.tiktoken is not None  # GPT-2's files pass the rank == id check
    assert not encoder_pure.fast and encoder_pure.tiktoken is None
    for enc in (encoder_fast, encoder_pure):
        assert enc.n_vocab == 50257 and enc.eot_token == 50256


@pytest.mark.parametrize("case", ENCODER_CASES, ids=lambda case: repr(case["text"])[:30])
def test_encoder_matches_tiktoken_ids(encoder_gpt2, case):
    assert encoder_gpt2.encode_ordinary(case["text"]) == case["ids"]
    assert encoder_gpt2.encode(case["text"]) == case.get("ids_allowed_special", case["ids"])
    assert encoder_gpt2.decode(case["ids"]) == case["text"]
    assert encoder_gpt2.decode(encoder_gpt2.encode(case["text"])) == case["text"]


def test_encoder_endoftext_is_special_only_in_encode(encoder_gpt2):
    # The fixture has one text with <|endoftext|>; check the rule on the edges too: start, end, repeated.
    hello = [15496]  # "Hello", from the fixture's "Hello world"
    assert encoder_gpt2.encode("<|endoftext|>Hello<|endoftext|><|endoftext|>") == [50256, *hello, 50256, 50256]
    assert 50256 not in encoder_gpt2.encode_ordinary("<|endoftext|>")
    assert encoder_gpt2.decode([50256]) == "<|endoftext|>"


def test_encoder_decode_partial_utf8_replaces(encoder_gpt2):
    ids = encoder_gpt2.encode("日")
    assert len(ids) == 2 and encoder_gpt2.decode(ids) == "日"
    # The first token holds only part of the character's 3 UTF-8 bytes: OpenAI's errors="replace" gives U+FFFD.
    assert set(encoder_gpt2.decode(ids[:1])) == {"\ufffd"}


def test_encoder_decode_accepts_arrays_and_rejects_bad_ids(encoder_gpt2):
    assert encoder_gpt2.decode(np.array([15496, 995], dtype=np.int32)) == "Hello world"
    assert encoder_gpt2.decode([]) == ""
    for bad in ([50257], [-1]):
        with pytest.raises(ValueError, match=r"token id -?\d+ is not in the vocabulary"):
            encoder_gpt2.decode(bad)
    with pytest.raises(ValueError, match="1-D"):
        encoder_gpt2.decode([[15496, 995]])


def test_encoder_shakespeare_count_and_paths_agree(encoder_fast, encoder_pure):
    text = ENCODER_SHAKESPEARE.read_text(encoding="utf-8")
    start = time.perf_counter()
    fast = encoder_fast.encode(text)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    pure = encoder_pure.encode(text)
    pure_s = time.perf_counter() - start
    assert len(fast) == ENCODER_SHAKESPEARE_TOKENS
    assert pure == fast
    assert encoder_fast.decode(fast) == text
    print(f"tiny shakespeare: tiktoken {fast_s:.2f} s, pure {pure_s:.2f} s")


def test_encoder_paths_agree_on_random_unicode(encoder_fast, encoder_pure):
    # Strings drawn from the character classes the pre-split regex separates, to reach its corners.
    pieces = ["a", "Z", "é", "ß", "日", "й", "7", "٣", "½", " ", "  ", "\t", "\n", "\r\n", "\u00a0", "\u3000", "'s",
              "'LL", "'", "!", "...", "😀", "🏽", "\u200d", "<|endoftext|>", "<|", "\ud800", "ǅ", "\u0301"]
    rng = random.Random(0)
    for _ in range(300):
        text = "".join(rng.choice(pieces) for _ in range(rng.randrange(1, 40)))
        assert encoder_pure.encode(text) == encoder_fast.encode(text), repr(text)
        assert encoder_pure.encode_ordinary(text) == encoder_fast.encode_ordinary(text), repr(text)


# ------------------------------------------------------------------------------------------------ other vocabularies

def test_encoder_tiny_vocab_by_hand(tmp_path):
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w"), ("Ġw", "o")]
    vocab = encoder_write_tiny_vocab(tmp_path, merges)  # he 256, ll 257, hell 258, Ġw 259, Ġwo 260
    for fast in (True, False):
        enc = encoder.bpe_encoder(tmp_path / "encoder.json", tmp_path / "vocab.bpe", fast=fast)
        assert enc.fast == fast and enc.n_vocab == 261 and enc.eot_token is None
        # "hello" -> he ll o -> hell o; " world" -> Ġw o r l d -> Ġwo r l d
        assert enc.encode("hello world") == [258, vocab["o"], 260, vocab["r"], vocab["l"], vocab["d"]]
        # No <|endoftext|> in this vocabulary: the string is plain text for encode too.
        assert enc.encode("<|endoftext|>") == [vocab[c] for c in "<|endoftext|>"]
        assert enc.decode(enc.encode("hello world")) == "hello world"


def test_encoder_falls_back_to_pure_when_ranks_are_not_ids(tmp_path, encoder_fast):
    # Swap the ids of the first two merged tokens ("Ġt" 256, "Ġa" 257): merges still segment text the same way, but
    # tiktoken's rank == id assumption breaks, so the fast path must not be used.
    vocab = json.loads((ENCODER_GPT2_DIR / "encoder.json").read_text(encoding="utf-8"))
    a, b = (token for token, i in vocab.items() if i in (256, 257))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tmp_path / "encoder.json").write_text(json.dumps(vocab), encoding="utf-8")
    enc = encoder.bpe_encoder(tmp_path / "encoder.json", ENCODER_GPT2_DIR / "vocab.bpe", fast=True)
    assert not enc.fast
    text = "x t a tx ax the cat"
    swap = {256: 257, 257: 256}
    expected = [swap.get(i, i) for i in encoder_fast.encode(text)]
    assert 256 in expected and 257 in expected
    assert enc.encode(text) == expected
    assert enc.decode(expected) == text


def test_encoder_extra_token_falls_back_to_pure(tmp_path):
    merges = [("h", "e")]
    vocab = encoder_write_tiny_vocab(tmp_path, merges, extra_ids={"hel": 257})  # a token no merge makes
    enc = encoder.get_encoder(tmp_path)
    assert not enc.fast  # tiktoken would merge "he" + "l" into "hel"; OpenAI's BPE never does
    assert enc.encode("hell") == [256, vocab["l"], vocab["l"]]


def test_encoder_hf_file_names(tmp_path, encoder_fast):
    shutil.copy(ENCODER_GPT2_DIR / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(ENCODER_GPT2_DIR / "vocab.bpe", tmp_path / "merges.txt")
    enc = encoder.get_encoder(tmp_path)
    assert enc.fast and enc.eot_token == 50256
    for case in ENCODER_CASES:
        assert enc.encode(case["text"]) == case.get("ids_allowed_special", case["ids"])


def test_encoder_prefers_openai_files(tmp_path):
    vocab = encoder_write_tiny_vocab(tmp_path, [("a", "b")])
    (tmp_path / "meta.json").write_text(json.dumps({"kind": "char", "chars": ["a", "b"]}), encoding="utf-8")
    (tmp_path / "vocab.json").write_text("not read", encoding="utf-8")
    (tmp_path / "merges.txt").write_text("not read", encoding="utf-8")
    assert encoder.get_encoder(tmp_path).encode("ab") == [vocab["ab"]]


def test_encoder_char_vocabulary(tmp_path):
    chars = sorted(set("First Citizen:\nBefore we proceed any further, hear me speak."))
    (tmp_path / "meta.json").write_text(json.dumps({"kind": "char", "chars": chars}), encoding="utf-8")
    enc = encoder.get_encoder(tmp_path)
    text = "hear me speak, Citizen\n"
    assert enc.encode(text) == [chars.index(c) for c in text]
    assert enc.decode(enc.encode(text)) == text
    assert enc.n_vocab == len(chars) and enc.eot_token is None
    with pytest.raises(ValueError, match=r"^character 'Z' \(at position 5\) is not in this model's vocabulary") as e:
        enc.encode("hear Zoe")
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="token id 99 is not in the vocabulary"):
        enc.decode([0, 99])


@pytest.mark.parametrize("meta", [{"chars": ["a"]}, {"kind": "bpe", "chars": ["a"]}, {"kind": "char", "chars": []},
                                  {"kind": "char", "chars": ["a", "bc"]}, {"kind": "char", "chars": ["a", "a"]}, []])
def test_encoder_bad_meta_json(tmp_path, meta):
    (tmp_path / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    with pytest.raises(ValueError, match="meta.json") as e:
        encoder.get_encoder(tmp_path)
    assert "\n" not in str(e.value)


def test_encoder_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        encoder.get_encoder(tmp_path)
    message = str(e.value)
    assert str(tmp_path) in message and "\n" not in message
    for name in ("encoder.json", "vocab.bpe", "vocab.json", "merges.txt", "meta.json"):
        assert name in message
    # Half a pair is not a tokenizer, and the message says what was there.
    shutil.copy(ENCODER_GPT2_DIR / "encoder.json", tmp_path / "encoder.json")
    with pytest.raises(FileNotFoundError, match=r"found only encoder\.json"):
        encoder.get_encoder(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        encoder.get_encoder(tmp_path / "does-not-exist")


def test_encoder_bad_bpe_files(tmp_path):
    vocab = encoder_write_tiny_vocab(tmp_path, [("a", "b")])
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\na b c\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"vocab\.bpe line 2 should hold two tokens"):
        encoder.get_encoder(tmp_path)
    (tmp_path / "vocab.bpe").write_text("#version: 0.2\nab c\n", encoding="utf-8")  # "abc" has no id
    with pytest.raises(ValueError, match="do not belong together"):
        encoder.get_encoder(tmp_path)
    del vocab["Ġ"]
    (tmp_path / "encoder.json").write_text(json.dumps(vocab), encoding="utf-8")
    with pytest.raises(ValueError, match="no token for the byte 0x20"):
        encoder.get_encoder(tmp_path)
    (tmp_path / "encoder.json").write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"encoder\.json is not valid JSON"):
        encoder.get_encoder(tmp_path)


# ==================== weights ===================================================================================

WEIGHTS_TINY_TF = HERE / "testdata" / "gpt2-tiny"
WEIGHTS_TINY_HF = HERE / "testdata" / "gpt2-tiny-hf"
WEIGHTS_EXPECTED = json.loads((WEIGHTS_TINY_TF / "expected.json").read_text())
WEIGHTS_DATA = "model.ckpt.data-00000-of-00001"


# ------------------------------------------------------------------------------------------------ references

def weights_reference_params():  # the fixture's weights as read by the safetensors package, stacked by hand
    hf = safetensors.numpy.load_file(WEIGHTS_TINY_HF / "model.safetensors")
    n_layer = WEIGHTS_EXPECTED["hparams"]["n_layer"]

    def stack(name):
        return np.stack([hf[f"transformer.h.{i}.{name}"] for i in range(n_layer)])
    params = {"wte": hf["transformer.wte.weight"], "wpe": hf["transformer.wpe.weight"],
              "ln_f/g": hf["transformer.ln_f.weight"], "ln_f/b": hf["transformer.ln_f.bias"]}
    for block in ("ln_1", "ln_2", "attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"):
        name = block.replace(".", "/")
        leaves = ("g", "b") if block.startswith("ln") else ("w", "b")
        params[f"h/{name}/{leaves[0]}"] = stack(f"{block}.weight")
        params[f"h/{name}/{leaves[1]}"] = stack(f"{block}.bias")
    return params


def weights_flat(params, prefix=""):  # nested params -> {"h/ln_1/g": np.ndarray}
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat.update(weights_flat(value, f"{prefix}{key}/"))
        else:
            flat[prefix + key] = np.asarray(value)
    return flat


def weights_assert_params_equal(params, expected):
    flat = weights_flat(params)
    assert sorted(flat) == sorted(expected)
    for name in expected:
        assert flat[name].dtype == np.float32, name
        np.testing.assert_array_equal(flat[name], expected[name], err_msg=name)


def weights_numpy_gpt2(flat, ids, n_head):  # float64 GPT-2 forward pass: [n_seq] -> [n_seq, n_vocab]
    p = {k: np.asarray(v, np.float64) for k, v in flat.items()}

    def layer_norm(x, g, b):
        mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + 1e-5) * g + b

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x ** 3)))

    n_seq = len(ids)
    x = p["wte"][ids] + p["wpe"][:n_seq]
    causal = np.tril(np.ones((n_seq, n_seq), bool))
    for i in range(p["h/ln_1/g"].shape[0]):
        h = layer_norm(x, p["h/ln_1/g"][i], p["h/ln_1/b"][i])
        q, k, v = np.split(h @ p["h/attn/c_attn/w"][i] + p["h/attn/c_attn/b"][i], 3, axis=-1)
        q, k, v = (t.reshape(n_seq, n_head, -1).transpose(1, 0, 2) for t in (q, k, v))
        scores = np.where(causal, q @ k.transpose(0, 2, 1) / math.sqrt(q.shape[-1]), -np.inf)
        att = np.exp(scores - scores.max(-1, keepdims=True))
        att /= att.sum(-1, keepdims=True)
        heads = (att @ v).transpose(1, 0, 2).reshape(n_seq, -1)
        x = x + heads @ p["h/attn/c_proj/w"][i] + p["h/attn/c_proj/b"][i]
        h = layer_norm(x, p["h/ln_2/g"][i], p["h/ln_2/b"][i])
        x = x + gelu(h @ p["h/mlp/c_fc/w"][i] + p["h/mlp/c_fc/b"][i]) @ p["h/mlp/c_proj/w"][i] + p["h/mlp/c_proj/b"][i]
    return layer_norm(x, p["ln_f/g"], p["ln_f/b"]) @ p["wte"].T


def weights_crc32c_bitwise(data):  # CRC-32C one bit at a time, straight from the definition
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


# ---------------------------------------------------------------------------------- TF tensor bundle writer
# Writes checkpoints in TensorFlow's format to make variants of the fixture (other dtypes, new weights); the reader is
# checked against the bundle TensorFlow itself wrote (testdata/gpt2-tiny).

def weights_varint(n):
    out = bytearray()
    while True:
        out.append((n & 0x7F) | (0x80 if n > 0x7F else 0))
        n >>= 7
        if not n:
            return bytes(out)


def weights_pb(field, value):  # one protobuf field: int -> varint, bytes -> length-delimited
    if isinstance(value, int):
        return weights_varint(field << 3) + weights_varint(value)
    return weights_varint(field << 3 | 2) + weights_varint(len(value)) + value


def weights_table_block(entries):
    out, restarts = bytearray(), []
    for key, value in entries:
        restarts.append(len(out))
        out += weights_varint(0) + weights_varint(len(key)) + weights_varint(len(value)) + key + value
    for r in restarts:
        out += r.to_bytes(4, "little")
    return bytes(out + len(restarts).to_bytes(4, "little"))


def weights_sstable(entries):
    out = bytearray()

    def put(block):
        handle = weights_varint(len(out)) + weights_varint(len(block))
        out.extend(block + b"\0" + weights.masked_crc32c(block + b"\0").to_bytes(4, "little"))
        return handle
    data = put(weights_table_block(entries))
    meta = put(weights_table_block([]))
    index = put(weights_table_block([(entries[-1][0], data)]))
    return bytes(out + (meta + index).ljust(40, b"\0") + weights.TABLE_MAGIC.to_bytes(8, "little"))


def weights_write_bundle(prefix, tensors):  # {name: float32/float16/bfloat16 array} -> prefix.index, prefix.data-*
    codes = {np.dtype(np.float32): 1, np.dtype(np.float16): 19, np.dtype(jnp.bfloat16): 14}
    data, entries = bytearray(), []
    for name in sorted(tensors):
        raw = np.ascontiguousarray(tensors[name]).tobytes()
        shape = b"".join(weights_pb(2, weights_pb(1, d)) for d in tensors[name].shape)
        entry = (weights_pb(1, codes[tensors[name].dtype]) + weights_pb(2, shape) + weights_pb(4, len(data))
                 + weights_pb(5, len(raw)) + bytes([6 << 3 | 5]) + weights.masked_crc32c(raw).to_bytes(4, "little"))
        entries.append((name.encode(), entry))
        data += raw
    header = weights_pb(1, 1) + weights_pb(3, weights_pb(1, 1))
    pathlib.Path(f"{prefix}.index").write_bytes(weights_sstable([(b"", header)] + entries))
    pathlib.Path(f"{prefix}.data-00000-of-00001").write_bytes(bytes(data))


def weights_tf_tensors(flat):  # flat stacked params -> {TF checkpoint name: array}, with the [1, in, out] matrices
    tensors = {}
    for name, array in flat.items():
        if name.startswith("h/"):
            for i, layer in enumerate(array):
                tensors[f"model/h{i}/{name[2:]}"] = layer[None] if name.endswith("/w") else layer
        else:
            tensors[f"model/{name}"] = array
    return tensors


# ------------------------------------------------------------------------------------------------ HTTP server

class WeightsHandler(http.server.BaseHTTPRequestHandler):
    """Serves the fixture as release 124M. server.plan maps a URL path to actions used once each, in order: an HTTP
    status to answer with, "cut" (send half the body, then hang up) or "ignore_range" (answer 200 with everything)."""

    def do_GET(self):
        self.server.log.append((self.path, self.headers.get("Range")))
        plan = self.server.plan.get(self.path, [])
        action = plan.pop(0) if plan else None
        source = self.server.files.get(self.path)
        if isinstance(action, int) or source is None:
            self.send_error(action or 404)
            return
        data = source.read_bytes()
        ranged = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", "")) if action != "ignore_range" else None
        start = int(ranged.group(1)) if ranged else 0
        self.send_response(206 if ranged else 200)
        if ranged:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        body = data[start:]
        self.wfile.write(body[:len(body) // 2] if action == "cut" else body)

    def log_message(self, *args):
        pass


@pytest.fixture
def weights_server(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), WeightsHandler)
    server.files = {f"/models/124M/{name}": WEIGHTS_TINY_TF / name for name in weights.RELEASE_FILES}
    server.plan, server.log = {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("GPTJAX_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(weights, "BACKOFF_S", 0.001)
    yield server
    server.shutdown()
    server.server_close()


def weights_requests(server, name):
    return [rng for path, rng in server.log if path == f"/models/124M/{name}"]


def weights_copy(tmp_path, source):  # a writable copy of a fixture folder (loading writes the cache beside it)
    ignore = shutil.ignore_patterns(weights.CACHE_NAME, "*.part")  # left there by loads of the fixture in place
    return pathlib.Path(shutil.copytree(source, tmp_path / source.name, ignore=ignore))


def weights_error(exc_info):  # the message of a raised error, which must be one line
    message = str(exc_info.value)
    assert "\n" not in message
    return message


# ------------------------------------------------------------------------------------------------------ tests

def test_weights_crc32c_check_values():
    assert weights.crc32c(b"123456789") == 0xE3069283
    assert weights.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 (iSCSI) B.4
    assert weights.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert weights.crc32c(bytes(range(32))) == 0x46DD794E
    assert weights.crc32c(b"") == 0


def test_weights_crc32c_matches_bitwise_definition(monkeypatch):
    monkeypatch.setattr(weights, "CRC_BLOCK", 64)  # exercise the merging of blocks, not only of leaves
    rng = np.random.default_rng(0)
    for n in (1, 2, 15, 16, 17, 63, 64, 65, 100, 1000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert weights.crc32c(data) == weights_crc32c_bitwise(data), n
        assert weights.crc32c(data[n // 3:], weights.crc32c(data[:n // 3])) == weights_crc32c_bitwise(data), n


def test_weights_download_load_and_logits(tmp_path, weights_server):
    hparams, params = weights.load_hparams_and_params(weights.model_folder("124M", tmp_path / "models"))
    for name in weights.RELEASE_FILES:
        assert (tmp_path / "models" / "124M" / name).read_bytes() == (WEIGHTS_TINY_TF / name).read_bytes(), name
    assert not list((tmp_path / "models" / "124M").glob("*.part"))
    assert hparams == WEIGHTS_EXPECTED["hparams"]
    expected = weights_reference_params()
    weights_assert_params_equal(params, expected)
    for prompt in WEIGHTS_EXPECTED["prompts"]:
        logits = weights_numpy_gpt2(weights_flat(params), prompt["ids"], hparams["n_head"])
        np.testing.assert_allclose(logits[-1], prompt["last_logits"], atol=1e-4)


def test_weights_cut_transfer_resumes_with_range(tmp_path, weights_server):
    weights_server.plan[f"/models/124M/{WEIGHTS_DATA}"] = ["cut"]
    folder = weights.model_folder("124M", tmp_path)
    ranges = weights_requests(weights_server, WEIGHTS_DATA)
    assert ranges[0] is None and re.fullmatch(r"bytes=[1-9]\d*-", ranges[1]) and len(ranges) == 2
    assert (folder / WEIGHTS_DATA).read_bytes() == (WEIGHTS_TINY_TF / WEIGHTS_DATA).read_bytes()


def test_weights_cut_transfer_caught_by_size_check(tmp_path, weights_server, monkeypatch):
    # urllib3 1.x (allowed by requests) ends a cut body quietly instead of raising: the Content-Length check catches it
    init = urllib3.response.HTTPResponse.__init__
    monkeypatch.setattr(urllib3.response.HTTPResponse, "__init__",
                        lambda self, *a, **kw: init(self, *a, **{**kw, "enforce_content_length": False}))
    weights_server.plan[f"/models/124M/{WEIGHTS_DATA}"] = ["cut"]
    folder = weights.model_folder("124M", tmp_path)
    assert len(weights_requests(weights_server, WEIGHTS_DATA)) == 2
    assert (folder / WEIGHTS_DATA).read_bytes() == (WEIGHTS_TINY_TF / WEIGHTS_DATA).read_bytes()


def test_weights_cut_transfer_restarts_when_server_ignores_range(tmp_path, weights_server):
    weights_server.plan[f"/models/124M/{WEIGHTS_DATA}"] = ["cut", "ignore_range"]
    folder = weights.model_folder("124M", tmp_path)
    assert weights_requests(weights_server, WEIGHTS_DATA)[1] is not None  # asked for the rest, got the whole file
    assert (folder / WEIGHTS_DATA).read_bytes() == (WEIGHTS_TINY_TF / WEIGHTS_DATA).read_bytes()


def test_weights_500_once_is_retried(tmp_path, weights_server):
    weights_server.plan["/models/124M/hparams.json"] = [500, 503]
    folder = weights.model_folder("124M", tmp_path)
    assert len(weights_requests(weights_server, "hparams.json")) == 3
    assert (folder / "hparams.json").read_bytes() == (WEIGHTS_TINY_TF / "hparams.json").read_bytes()


def test_weights_persistent_500_fails_without_partial_file(tmp_path, weights_server):
    weights_server.plan[f"/models/124M/{WEIGHTS_DATA}"] = [500] * (weights.RETRIES + 1)
    with pytest.raises(ConnectionError) as e:
        weights.load_encoder_hparams_and_params("124M", tmp_path)
    message = weights_error(e)
    assert f"/models/124M/{WEIGHTS_DATA}" in message and "HTTP 500" in message and str(tmp_path / "124M") in message
    assert len(weights_requests(weights_server, WEIGHTS_DATA)) == weights.RETRIES + 1
    assert not (tmp_path / "124M" / WEIGHTS_DATA).exists()


def test_weights_404_names_url_and_sizes(tmp_path, weights_server):
    weights_server.plan["/models/124M/hparams.json"] = [404]
    with pytest.raises(FileNotFoundError) as e:
        weights.load_encoder_hparams_and_params("124M", tmp_path)
    message = weights_error(e)
    assert f"{weights.base_url()}/models/124M/hparams.json" in message and "404" in message and "1558M" in message
    assert len(weights_requests(weights_server, "hparams.json")) == 1  # a 404 is final: no retries


def test_weights_no_server_names_url_and_folder(tmp_path, monkeypatch):
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("GPTJAX_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(weights, "BACKOFF_S", 0.001)
    with pytest.raises(ConnectionError) as e:
        weights.load_encoder_hparams_and_params("124M", tmp_path / "models")
    message = weights_error(e)
    assert f"http://127.0.0.1:{port}/models/124M/checkpoint" in message
    assert str(tmp_path / "models" / "124M") in message and "by hand" in message


def test_weights_complete_folder_is_not_fetched_again(tmp_path, weights_server):
    weights.model_folder("124M", tmp_path)
    weights_server.log.clear()
    weights.load_hparams_and_params(weights.model_folder("124M", tmp_path))
    assert weights_server.log == []
    (tmp_path / "124M" / "vocab.bpe").unlink()
    weights.model_folder("124M", tmp_path)
    assert [path for path, _ in weights_server.log] == ["/models/124M/vocab.bpe"]


def test_weights_leftover_part_file_is_resumed(tmp_path, weights_server):
    folder = tmp_path / "124M"
    folder.mkdir()
    whole = (WEIGHTS_TINY_TF / WEIGHTS_DATA).read_bytes()
    (folder / f"{WEIGHTS_DATA}.part").write_bytes(whole[:1000])  # an earlier run stopped here
    weights.model_folder("124M", tmp_path)
    assert weights_requests(weights_server, WEIGHTS_DATA) == ["bytes=1000-"]
    assert (folder / WEIGHTS_DATA).read_bytes() == whole


def test_weights_hf_folder_equals_tf_folder(tmp_path):
    _, tf_params = weights.load_hparams_and_params(weights_copy(tmp_path, WEIGHTS_TINY_TF))
    hparams, hf_params = weights.load_hparams_and_params(weights_copy(tmp_path, WEIGHTS_TINY_HF))
    assert hparams == WEIGHTS_EXPECTED["hparams"]
    weights_assert_params_equal(hf_params, weights_flat(tf_params))
    weights_assert_params_equal(tf_params, weights_reference_params())


def test_weights_hf_without_transformer_prefix_and_in_bfloat16(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(WEIGHTS_TINY_HF / "config.json", folder)
    hf = safetensors.numpy.load_file(WEIGHTS_TINY_HF / "model.safetensors")
    bf16 = {name.removeprefix("transformer."): x.astype(jnp.bfloat16) for name, x in hf.items()}
    header = {name: {"dtype": "BF16", "shape": list(x.shape), "data_offsets": [0, 0]} for name, x in bf16.items()}
    offset = 0
    for name, x in bf16.items():
        header[name]["data_offsets"] = [offset, offset + x.nbytes]
        offset += x.nbytes
    blob = json.dumps(header).encode()
    (folder / "model.safetensors").write_bytes(len(blob).to_bytes(8, "little") + blob
                                               + b"".join(x.tobytes() for x in bf16.values()))
    _, params = weights.load_hparams_and_params(folder)
    expected = {name: x.astype(jnp.bfloat16).astype(np.float32) for name, x in weights_reference_params().items()}
    weights_assert_params_equal(params, expected)


def test_weights_cache_is_written_used_and_invalidated(tmp_path, monkeypatch):
    folder = weights_copy(tmp_path, WEIGHTS_TINY_TF)
    expected = weights_reference_params()
    weights.load_hparams_and_params(folder)
    cached = safetensors.numpy.load_file(folder / "params.safetensors")  # readable by the reference implementation
    assert sorted(cached) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(cached[name], expected[name])
    with safetensors.safe_open(folder / "params.safetensors", "np") as f:
        assert json.loads(f.metadata()["hparams"]) == WEIGHTS_EXPECTED["hparams"]

    with monkeypatch.context() as m:  # a second load reads the cache only
        m.setattr(weights, "read_tf_params", lambda *a: pytest.fail("the checkpoint was read again"))
        _, params = weights.load_hparams_and_params(folder)
    weights_assert_params_equal(params, expected)

    doubled = {name: x * 2 for name, x in expected.items()}  # a new checkpoint in place of the old one
    weights_write_bundle(folder / "model.ckpt", weights_tf_tensors(doubled))
    _, params = weights.load_hparams_and_params(folder)
    weights_assert_params_equal(params, doubled)


def test_weights_damaged_cache_is_remade(tmp_path):
    folder = weights_copy(tmp_path, WEIGHTS_TINY_TF)
    weights.load_hparams_and_params(folder)
    cache = folder / "params.safetensors"
    cache.write_bytes(cache.read_bytes()[:-100])
    _, params = weights.load_hparams_and_params(folder)
    weights_assert_params_equal(params, weights_reference_params())
    assert cache.stat().st_size > 100 + sum(x.nbytes for x in weights_reference_params().values())


def test_weights_dtype_bfloat16(tmp_path):
    _, params = weights.load_hparams_and_params(weights_copy(tmp_path, WEIGHTS_TINY_TF), dtype=jnp.bfloat16)
    flat = weights_flat(params)
    for name, x in weights_reference_params().items():
        assert flat[name].dtype == jnp.bfloat16
        np.testing.assert_array_equal(flat[name], x.astype(jnp.bfloat16), err_msg=name)


def test_weights_half_and_bfloat16_checkpoints(tmp_path):
    expected = weights_reference_params()
    for dtype in (np.float16, jnp.bfloat16):
        folder = tmp_path / np.dtype(dtype).name
        folder.mkdir()
        shutil.copy(WEIGHTS_TINY_TF / "hparams.json", folder)
        tensors = weights_tf_tensors({name: x.astype(dtype) for name, x in expected.items()})
        weights_write_bundle(folder / "model.ckpt", tensors)
        _, params = weights.load_hparams_and_params(folder)
        weights_assert_params_equal(params, {n: x.astype(dtype).astype(np.float32) for n, x in expected.items()})


def test_weights_corrupt_data_file_fails_its_checksum(tmp_path):
    folder = weights_copy(tmp_path, WEIGHTS_TINY_TF)
    data = bytearray((folder / WEIGHTS_DATA).read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / WEIGHTS_DATA).write_bytes(bytes(data))
    with pytest.raises(ValueError) as e:
        weights.load_hparams_and_params(folder)
    message = weights_error(e)
    assert str(folder / WEIGHTS_DATA) in message and "crc32c" in message and "delete it" in message


def test_weights_truncated_data_file(tmp_path):
    folder = weights_copy(tmp_path, WEIGHTS_TINY_TF)
    (folder / WEIGHTS_DATA).write_bytes((WEIGHTS_TINY_TF / WEIGHTS_DATA).read_bytes()[:-10])
    with pytest.raises(ValueError) as e:
        weights.load_hparams_and_params(folder)
    message = weights_error(e)
    assert str(folder / WEIGHTS_DATA) in message and "truncated" in message and "delete it" in message


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_weights_damaged_index_file(tmp_path, damage):
    folder = weights_copy(tmp_path, WEIGHTS_TINY_TF)
    index = (folder / "model.ckpt.index").read_bytes()
    if damage == "truncate":
        index = index[:len(index) // 2]
    else:
        index = index[:100] + bytes([index[100] ^ 0x40]) + index[101:]
    (folder / "model.ckpt.index").write_bytes(index)
    with pytest.raises(ValueError) as e:
        weights.load_hparams_and_params(folder)
    message = weights_error(e)
    assert str(folder / "model.ckpt.index") in message and "delete it" in message
    assert ("footer" if damage == "truncate" else "checksum") in message


def test_weights_unknown_model_size(tmp_path):
    with pytest.raises(ValueError) as e:
        weights.load_encoder_hparams_and_params("125M", tmp_path)
    message = weights_error(e)
    assert "'125M'" in message and all(size in message for size in weights.MODEL_SIZES)


def test_weights_missing_files_are_named(tmp_path):
    folder = tmp_path / "partial"
    folder.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        weights.load_hparams_and_params(folder)
    assert str(folder) in weights_error(e) and "hparams.json" in weights_error(e)
    shutil.copy(WEIGHTS_TINY_TF / "model.ckpt.index", folder)
    with pytest.raises(FileNotFoundError) as e:
        weights.load_hparams_and_params(folder)
    assert re.search(rf"{re.escape(str(folder))} lacks hparams.json, {WEIGHTS_DATA}$", weights_error(e))
    with pytest.raises(FileNotFoundError) as e:
        weights.load_hparams_and_params(tmp_path / "absent")
    assert str(tmp_path / "absent") in weights_error(e)


def test_weights_hf_folder_with_only_pytorch_bin(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(WEIGHTS_TINY_HF / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as e:
        weights.load_hparams_and_params(folder)
    assert "model.safetensors" in weights_error(e) and str(folder) in weights_error(e)


@pytest.mark.parametrize("change", [{"activation_function": "relu"}, {"layer_norm_epsilon": 1e-6},
                                    {"model_type": "gpt_neo"}])
def test_weights_hf_config_outside_gpt2_is_refused(tmp_path, change):
    folder = weights_copy(tmp_path, WEIGHTS_TINY_HF)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError) as e:
        weights.load_hparams_and_params(folder)
    assert str(folder / "config.json") in weights_error(e) and next(iter(change)) in weights_error(e)


def test_weights_hf_folder_gets_gpt2_tokenizer_files(tmp_path, weights_server):
    folder = weights_copy(tmp_path, WEIGHTS_TINY_HF)
    assert weights.tokenizer_folder(folder, tmp_path / "models") == tmp_path / "models" / "124M"
    assert sorted(path for path, _ in weights_server.log) == ["/models/124M/encoder.json", "/models/124M/vocab.bpe"]
    for name in ("encoder.json", "vocab.bpe"):
        assert (tmp_path / "models" / "124M" / name).read_bytes() == (WEIGHTS_TINY_TF / name).read_bytes()
    weights_server.log.clear()
    assert weights.tokenizer_folder(folder, tmp_path / "models") == tmp_path / "models" / "124M"
    assert weights.tokenizer_folder(WEIGHTS_TINY_TF, tmp_path / "models") == WEIGHTS_TINY_TF
    assert weights_server.log == []


def test_weights_load_encoder_hparams_and_params_finds_the_vocabulary(tmp_path, weights_server, monkeypatch):
    stub = type(sys)("encoder")  # records which folder the tokenizer would be read from
    stub.get_encoder = lambda folder: pathlib.Path(folder)
    monkeypatch.setitem(sys.modules, "encoder", stub)
    models = tmp_path / "models"
    folder, hparams, params = weights.load_encoder_hparams_and_params("124M", models, dtype=jnp.bfloat16)
    assert folder == models / "124M" and hparams == WEIGHTS_EXPECTED["hparams"]
    assert weights_flat(params)["wte"].dtype == jnp.bfloat16
    weights_server.log.clear()
    hf = weights_copy(tmp_path, WEIGHTS_TINY_HF)  # no tokenizer files: GPT-2's, already in models/124M
    folder, _, params = weights.load_encoder_hparams_and_params(str(hf), models)
    assert folder == models / "124M" and weights_server.log == []
    weights_assert_params_equal(params, weights_reference_params())


def test_weights_unwritable_cache_still_loads(tmp_path):
    folder = weights_copy(tmp_path, WEIGHTS_TINY_TF)
    (folder / "params.safetensors").mkdir()  # the cache cannot be put in place
    with pytest.warns(UserWarning, match="converted on every load"):
        _, params = weights.load_hparams_and_params(folder)
    weights_assert_params_equal(params, weights_reference_params())
    assert not list(folder.glob(".*part"))


def test_weights_end_to_end_hf_folder_with_gpt2_tokenizer(tmp_path, weights_server):
    hf = weights_copy(tmp_path, WEIGHTS_TINY_HF)
    encoder, hparams, params = weights.load_encoder_hparams_and_params(str(hf), tmp_path / "models")
    for prompt in WEIGHTS_EXPECTED["prompts"]:
        ids = list(encoder.encode(prompt["text"]))
        assert ids == prompt["ids"]
        logits = weights_numpy_gpt2(weights_flat(params), ids, hparams["n_head"])
        np.testing.assert_allclose(logits[-1], prompt["last_logits"], atol=1e-4)
