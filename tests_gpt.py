import json
import math
import pathlib
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import gpt
import weights

HERE = pathlib.Path(__file__).parent
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
