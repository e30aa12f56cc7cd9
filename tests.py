"""gptjax's tests: every check is against an independent reference (the fixtures in testdata/, made with TensorFlow, HF
transformers and tiktoken, see testdata/README.md; float64 numpy math and the other references in testlib.py;
hand-worked cases), offline. One section per module, in the order a reader meets them; the fixtures shared by several
sections come first.

    pytest tests.py                  # everything, a worker process per core (about 6 minutes on 2 cores)
    pytest tests.py -m "not slow"    # the quick loop (about 2 minutes): leaves out the end-to-end runs (training,
                                     # servers, several processes, the harness) and the long sweeps
"""
import hashlib
import http.server
import importlib.util
import io
import json
import lzma
import math
import os
import pathlib
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import threading
import time
from functools import partial

import jax
import jax.ad_checkpoint as jax_ad_checkpoint
import jax.numpy as jnp
import jaxtyping
import lm_eval
import numpy as np
import optax
import pytest
import safetensors.numpy
import tiktoken
import tiktoken.load
import urllib3
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

import cli
import data
import devices
import download
import encoder
import eval as eval_cli
import files
import gpt
import harness
import main
import optim
import outdir
import quant
import sampling
import tf_checkpoint
import train
import train_config
import weights
from testlib import (
    DATA_FILE,
    EXPECTED,
    HERE,
    PROGRAMS,
    PROMPTS,
    SHAKESPEARE,
    TINY_HF,
    TINY_TF,
    ReleaseHandler,
    assert_params_equal,
    ckpt_tensors,
    crc32c_bitwise,
    flat_params,
    folder_state,
    free_port,
    numpy_gpt2,
    read_safetensors,
    reference_params,
    requests_for,
    run_program,
    scratch_copy,
    tf_tensors,
    write_bundle,
)

cli.enable_compilation_cache()  # at collection, before anything compiles: repeated tiny runs compile once (SCRATCH's)
jax.config.update("jax_disable_most_optimizations", True)  # as testlib sets it for the tests' processes (see there)

# property tests (hypothesis): a quick profile by default, GPTJAX_HYPOTHESIS=thorough for many more examples
settings.register_profile("quick", max_examples=25, deadline=None,
                          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
settings.register_profile("thorough", parent=settings.get_profile("quick"), max_examples=500)
settings.load_profile(os.environ.get("GPTJAX_HYPOTHESIS", "quick"))

TINY = {"tf": scratch_copy(TINY_TF), "hf": scratch_copy(TINY_HF)}  # loadable copies (a load writes its cache beside)
TOKENIZER_CASES = json.loads((HERE / "testdata" / "tokenizer_cases.json").read_text(encoding="utf-8"))
FOUR_CPU_DEVICES = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4", "JAX_PLATFORMS": "cpu"}
# train.py's runs in the tests: dropout and gradient accumulation on, so that the random streams and micro-batches
# are always covered
TINY_RUN = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 4, "eval_iters": 2,
            "learning_rate": 3e-3, "warmup_iters": 2, "lr_decay_iters": 12, "min_lr": 3e-4, "log_interval": 1,
            "dropout": 0.1, "gradient_accumulation_steps": 2}


@pytest.fixture(scope="session", params=["tf", "hf"])
def tiny(request):  # (hparams, params) of the tiny GPT-2 fixture, read from each of its two layouts
    return weights.load_hparams_and_params(TINY[request.param])


@pytest.fixture(scope="session")
def tiny_tf():
    return weights.load_hparams_and_params(TINY["tf"])


@pytest.fixture(scope="session")
def train_data_dir(tmp_path_factory):
    """A data_dir holding tiny Shakespeare, placed by hand as a user without network would."""
    data_dir = tmp_path_factory.mktemp("data")
    (data_dir / "shakespeare_char").mkdir()
    shutil.copy(SHAKESPEARE, data_dir / "shakespeare_char" / "input.txt")
    return data_dir


def run_config(data_dir, out_dir, **overrides):  # a tiny train.py run's config keys
    return {**TINY_RUN, "data_dir": str(data_dir), "out_dir": str(out_dir), **overrides}


def run_train_cli(*args, env=None):  # train.py in a fresh process
    return subprocess.run([sys.executable, str(HERE / "train.py"), *args], capture_output=True, text=True,
                          cwd=HERE, env={**os.environ, **(env or {})}, timeout=300)


# the model as the tests call it: jitted, so that each shape compiles as one program, not op by op (an eager forward
# pass compiles each of its dozens of operations anew for every new length)
gpt_forward = jax.jit(gpt.gpt, static_argnums=2)  # (params, ids, n_head) -> logits
gpt_loss = jax.jit(gpt.lm_loss, static_argnums=3)  # (params, ids, targets, n_head) -> mean loss


def gpt_init(key, hparams, dtype=jnp.float32):  # gpt.init_params, jitted (each leaf's draws eagerly: a compile each)
    return jax.jit(partial(gpt.init_params, hparams=hparams, dtype=dtype))(key)


def perturbed(tree, scale, seed):  # every leaf plus scale * N(0, 1) draws from PRNGKey(seed), jitted as gpt_init is
    return jax.jit(lambda tree: jax.tree.map(
        lambda x: x + scale * jax.random.normal(jax.random.PRNGKey(seed), x.shape, x.dtype), tree))(tree)


def run_main_cli(args, tmp_path, stdin=None):  # main.py in a fresh process -> (exit code, stdout, stderr)
    proc = subprocess.run([sys.executable, str(HERE / "main.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=tmp_path, input=stdin, timeout=120)  # the compilation cache: SCRATCH's
    return proc.returncode, proc.stdout, proc.stderr


# ==================== gpt =============================================================================================
# the model: logits, loss and gradients against the float64 references; dropout, remat, LoRA

def test_gpt_last_logits_match_reference(tiny):
    hparams, params = tiny
    for prompt in EXPECTED["prompts"]:
        logits = gpt_forward(params, jnp.array(prompt["ids"]), hparams["n_head"])
        assert logits.shape == (len(prompt["ids"]), hparams["n_vocab"])
        np.testing.assert_allclose(np.asarray(logits[-1]), prompt["last_logits"], atol=1e-4)
        assert list(np.argsort(-np.asarray(logits[-1]))[:5]) == prompt["last_logits_top5"]["ids"]


def test_gpt_all_position_logits_match_reference(tiny):
    hparams, params = tiny
    logits = gpt_forward(params, jnp.array(EXPECTED["prompts"][0]["ids"]), hparams["n_head"])
    np.testing.assert_allclose(np.asarray(logits), np.load(TINY_TF / "logits_prompt1.npy"), atol=1e-4)


def test_lm_loss_matches_reference(tiny):
    hparams, params = tiny
    ids = jnp.array(EXPECTED["prompts"][2]["ids"])
    loss = gpt_loss(params, ids[:-1], ids[1:], hparams["n_head"])
    assert abs(float(loss) - EXPECTED["loss_prompt3"]["value"]) < 1e-4
    # targets < 0 are ignored: masking the second half equals the loss over the first half
    half = len(ids) // 2
    masked = jnp.where(jnp.arange(len(ids) - 1) < half, ids[1:], -1)
    first = gpt_loss(params, ids[:-1], masked, hparams["n_head"])
    logits = np.asarray(gpt_forward(params, ids[:-1], hparams["n_head"]), np.float64)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    manual = -np.mean([logp[i, int(ids[i + 1])] for i in range(half)])
    assert abs(float(first) - manual) < 1e-5


def test_kv_cache_decoding_equals_full_forward(tiny):
    # prefill a few tokens, then feed the rest one by one (and a chunk of 3): every position's logits must equal
    # the cache-free forward pass
    hparams, params = tiny
    ids = jnp.array(EXPECTED["prompts"][2]["ids"][:20])
    full = gpt_forward(params, ids, hparams["n_head"])
    layers = gpt.unstack_layers(params)  # the layout the caches go with
    cache = [jax.tree.map(lambda c: c[0], c) for c in gpt.empty_caches(layers, 1, hparams["n_head"], 32)]  # one row
    step = jax.jit(gpt.transformer, static_argnums=2)
    x, cache = step(layers, ids[:5], hparams["n_head"], cache, 0)
    got = [gpt.unembed(params, x)]
    pos = 5
    for n in [1, 1, 3] + [1] * 10:
        x, cache = step(layers, ids[pos:pos + n], hparams["n_head"], cache, pos)
        got.append(gpt.unembed(params, x))
        pos += n
    np.testing.assert_allclose(np.concatenate(got), np.asarray(full), atol=1e-5)


def test_batches_rows_independently(tiny):
    # a batch given whole ([batch, n_seq] ids, as training does) or through vmap: each row's logits are those of
    # the row alone, and the batch's loss is the mean over all its targets
    hparams, params = tiny
    ids = jnp.array([p["ids"][:6] for p in EXPECTED["prompts"]])
    by_vmap = jax.vmap(gpt.gpt, in_axes=(None, 0, None))(params, ids, hparams["n_head"])
    whole = gpt_forward(params, ids, hparams["n_head"])
    assert whole.shape == (*ids.shape, hparams["n_vocab"])
    rows = [np.asarray(gpt_forward(params, row, hparams["n_head"]), np.float64) for row in ids]
    for row, a, b in zip(rows, by_vmap, whole):
        np.testing.assert_allclose(row, np.asarray(a), atol=1e-5)
        np.testing.assert_allclose(row, np.asarray(b), atol=1e-5)
    targets = np.asarray(ids[:, 1:])
    nll = [np.log(np.exp(r[:-1]).sum(-1)) - r[np.arange(5), t] for r, t in zip(rows, targets)]
    loss = gpt.lm_loss(params, ids[:, :-1], ids[:, 1:], hparams["n_head"])
    np.testing.assert_allclose(float(loss), np.mean(nll), rtol=1e-5)


def test_bfloat16_forward_tracks_float32(tiny):
    hparams, params = tiny
    ids = jnp.array(EXPECTED["prompts"][0]["ids"])
    ref = np.asarray(EXPECTED["prompts"][0]["last_logits"])
    low = gpt_forward(gpt.cast(params, jnp.bfloat16), ids, hparams["n_head"])
    assert low.dtype == jnp.float32  # logits are accumulated in float32 even from bf16 weights
    err = np.linalg.norm(np.asarray(low[-1]) - ref) / np.linalg.norm(ref)
    assert err < 2e-2, err


def test_init_params_shapes_and_statistics():
    hparams = {"n_vocab": 300, "n_ctx": 32, "n_embd": 64, "n_head": 4, "n_layer": 3}
    params = gpt_init(jax.random.PRNGKey(0), hparams)
    ref_params = weights.unflatten(weights.read_hf_params(TINY_HF, weights.hf_hparams(TINY_HF / "config.json")))
    # same tree structure and per-leaf rank as a real checkpoint
    assert jax.tree.structure(params) == jax.tree.structure(ref_params)
    assert params["h"]["attn"]["c_attn"]["w"].shape == (3, 64, 192)
    assert params["h"]["mlp"]["c_proj"]["w"].shape == (3, 256, 64)
    # every leaf as GPT-2 (and nanoGPT) initialise it: N(0, 0.02) matrices and token embeddings, N(0, 0.01) positions,
    # the two projections into the residual stream N(0, 0.02 / sqrt(2 n_layer)), zero biases, unit LayerNorm gains
    stds = {"wte": 0.02, "wpe": 0.01, "h/attn/c_attn/w": 0.02, "h/mlp/c_fc/w": 0.02,
            "h/attn/c_proj/w": 0.02 / math.sqrt(6), "h/mlp/c_proj/w": 0.02 / math.sqrt(6)}
    for name, leaf in flat_params(params).items():
        leaf = np.asarray(leaf, np.float64)
        if name in stds:  # the sample std of n normal draws is within 5 / sqrt(2 n) of sigma, relatively
            assert abs(leaf.mean()) < 5 * stds[name] / math.sqrt(leaf.size), name
            assert abs(leaf.std() / stds[name] - 1) < 5 / math.sqrt(2 * leaf.size), (name, leaf.std())
        else:
            np.testing.assert_array_equal(leaf, 1.0 if name.endswith("/g") else 0.0, err_msg=name)
    # an untrained model predicts close to uniform: loss near ln(n_vocab)
    ids = jnp.arange(20) % 300
    loss = gpt_loss(params, ids[:-1], ids[1:], hparams["n_head"])
    assert abs(float(loss) - math.log(300)) < 0.05
    assert gpt.count_params(params) == sum(x.size for x in jax.tree.leaves(params))


def test_loss_gradient_matches_finite_differences():
    # central differences in float64 on a tiny random model check value_and_grad through scan, attention and LN
    with jax.enable_x64(True):
        hparams = {"n_vocab": 11, "n_ctx": 8, "n_embd": 8, "n_head": 2, "n_layer": 2}
        params = gpt_init(jax.random.PRNGKey(1), hparams, dtype=jnp.float64)
        params = perturbed(params, 0.1, 2)
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
                        return tree.at[idx].add(delta)  # noqa: B023 (called at once, in this iteration)
                    return {**tree, keys[0]: at(tree[keys[0]], keys[1:])}
                return loss(at(params, path))  # noqa: B023

            numeric = (bumped(1e-6) - bumped(-1e-6)) / 2e-6
            assert abs(float(g[idx]) - float(numeric)) < 1e-6, path


def test_dropout_is_identity_without_key_and_scales_with_key():
    x = jnp.ones((1000, 8))
    assert gpt.dropout(x, 0.5, None) is x
    assert gpt.dropout(x, 0.0, jax.random.PRNGKey(0)) is x
    for rate in (0.1, 0.25, 0.5, 0.9):
        y = np.asarray(gpt.dropout(jnp.ones((64, 32, 48)), rate, jax.random.PRNGKey(0)))
        kept = y != 0
        sigma = math.sqrt(rate * (1 - rate) / y.size)
        assert abs(kept.mean() - (1 - rate)) < 5 * sigma, rate
        np.testing.assert_allclose(y[kept], 1 / (1 - rate), rtol=1e-6)


def test_dropout_bits_look_independent():
    # the masks come from a keyed hash of each element's index (gpt.random_bits), not from jax.random: check what
    # dropout needs of them against the statistics of independent fair bits
    bits = np.asarray(gpt.random_bits(jax.random.PRNGKey(7), (64, 128, 32))).astype(np.uint64)
    n = bits.size
    for shift in (0, 8, 16, 24):  # every byte is uniform (chi-square over 256 buckets, 255 dof: mean 255, sd 22.6)
        counts = np.bincount(((bits >> shift) & 255).astype(np.int64).ravel(), minlength=256)
        chi2 = ((counts - n / 256) ** 2 / (n / 256)).sum()
        assert chi2 < 255 + 5 * 22.6, (shift, chi2)
    keep = np.asarray(gpt.random_bits(jax.random.PRNGKey(7), (64, 128, 32))) >= 2**31  # a 0.5 dropout mask
    sigma = 0.5 / math.sqrt(n)  # of an agreement rate between two independent fair masks of n bits

    def agreement(a, b):
        return (a == b).mean()
    # neighbours along each axis, and other keys (other layers, steps, micro-batches) agree as independent bits do
    assert abs(agreement(keep[:, :, 1:], keep[:, :, :-1]) - 0.5) < 5 * sigma * math.sqrt(32 / 31)
    assert abs(agreement(keep[:, 1:], keep[:, :-1]) - 0.5) < 5 * sigma * math.sqrt(128 / 127)
    assert abs(agreement(keep[1:], keep[:-1]) - 0.5) < 5 * sigma * math.sqrt(64 / 63)
    key = jax.random.PRNGKey(7)
    for other in (jax.random.PRNGKey(8), jax.random.fold_in(key, 1), jax.random.fold_in(key, 2)):
        other_keep = np.asarray(gpt.random_bits(other, keep.shape)) >= 2**31
        assert abs(agreement(keep, other_keep) - 0.5) < 5 * sigma
    # the same key and shape give the same bits (training repeats exactly on resume)
    np.testing.assert_array_equal(np.asarray(gpt.random_bits(key, (3, 5))), np.asarray(gpt.random_bits(key, (3, 5))))


@pytest.mark.slow
def test_remat_gives_the_same_gradients_in_less_memory():
    # gradient checkpointing recomputes activations in the backward pass: the same loss and gradients (dropout on, so
    # the recomputed masks must be the same ones), and XLA's plan for the step holds fewer temporary bytes
    hparams = {"n_vocab": 65, "n_ctx": 256, "n_embd": 64, "n_head": 4, "n_layer": 4}
    params = gpt_init(jax.random.PRNGKey(0), hparams)
    ids = jax.random.randint(jax.random.PRNGKey(1), (8, 256), 0, 65)
    targets = jnp.roll(ids, -1, axis=-1)
    steps = {remat: jax.jit(jax.value_and_grad(lambda p, remat=remat: gpt.lm_loss(
        p, ids, targets, 4, 0.1, jax.random.PRNGKey(2), unroll=True, remat=remat))) for remat in (False, True)}
    (loss, grads), (remat_loss, remat_grads) = steps[False](params), steps[True](params)
    assert float(remat_loss) == pytest.approx(float(loss), rel=1e-6)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(remat_grads)):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-4, atol=1e-7)
    temp = {remat: f.lower(params).compile().memory_analysis().temp_size_in_bytes for remat, f in steps.items()}
    assert temp[True] < 0.75 * temp[False], temp


def test_dropout_masks_do_not_depend_on_sharding():
    # each element's bits depend on its global index, so a batch split across devices draws the masks it would draw
    # whole: this runs in a child process with 4 CPU devices
    proc = run_program("dropout_sharding.py", timeout=300, env=FOUR_CPU_DEVICES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "same"


def documented_dropout(key, rate):
    """numpy_gpt2's drop for gpt.py's documented dropout: the embedding's mask from jax.random.split(key)[1]; layer
    i's from jax.random.fold_in(split(key)[0], i), split in three for the attention weights, the attention branch and
    the MLP branch; each element kept where its gpt.random_bits are >= rate * 2**32, and scaled by 1 / (1 - rate)."""
    rest, k_embd = jax.random.split(key)

    def drop(site, layer, x):
        k = k_embd if site == "embd" else jax.random.split(jax.random.fold_in(rest, layer), 3)[
            ("attn_weights", "attn", "mlp").index(site)]
        keep = np.asarray(gpt.random_bits(k, x.shape)).astype(np.int64) >= round(rate * 2**32)
        return np.where(keep, x / (1 - rate), 0.0)
    return drop


def test_shapes_are_checked_at_run_time():
    # the test run checks gpt.py's and sampling.py's jaxtyping annotations (pyproject.toml's --jaxtyping-packages):
    # a mistake in a shape fails with the name of the dimension that disagrees
    x = jnp.ones((3, 8))
    with pytest.raises(jaxtyping.TypeCheckError, match="n_embd"):
        gpt.layer_norm(x, jnp.ones(7), jnp.zeros(8))
    with pytest.raises(jaxtyping.TypeCheckError):  # ids must be integers
        gpt.gpt(gpt.init_params(jax.random.PRNGKey(0), {"n_vocab": 5, "n_ctx": 4, "n_embd": 8, "n_head": 2,
                                                         "n_layer": 1}), x, 2)
    with pytest.raises(jaxtyping.TypeCheckError, match="n_vocab"):
        sampling.filter_logits(jnp.ones((2, 5)), jnp.int32(1), jnp.float32(1))


@pytest.mark.slow
def test_dropout_drops_what_gpt2_drops_with_the_documented_masks():
    # the forward pass with dropout, in float64, against numpy's GPT-2 with documented_dropout: which activations are
    # dropped (the embedding, the attention weights, each residual branch), with which mask (a distinct one per site,
    # layer and row), kept at which rate and scaled by how much
    with jax.enable_x64(True):
        hparams = {"n_vocab": 23, "n_ctx": 12, "n_embd": 16, "n_head": 2, "n_layer": 3}
        params = gpt_init(jax.random.PRNGKey(0), hparams, jnp.float64)
        params = perturbed(params, 0.05, 1)
        ids = jax.random.randint(jax.random.PRNGKey(2), (3, 10), 0, 23)
        key = jax.random.PRNGKey(3)
        dropped = jax.jit(lambda p, ids, key, rate: gpt.unembed(p, gpt.transformer(p, ids, 2, dropout_rate=rate,
                                                                                   key=key)[0]), static_argnums=3)
        for rate in (0.1, 0.5):
            expected = numpy_gpt2(flat_params(params), np.asarray(ids), 2, drop=documented_dropout(key, rate))
            np.testing.assert_allclose(np.asarray(dropped(params, ids, key, rate)), expected, rtol=1e-9, atol=1e-12)
        no_dropout = numpy_gpt2(flat_params(params), np.asarray(ids), 2)
        assert not np.allclose(expected, no_dropout, atol=1e-3)  # the masks did change the result
        np.testing.assert_allclose(np.asarray(gpt_forward(params, ids, 2)), no_dropout, rtol=1e-9, atol=1e-12)


def test_bfloat16_layer_norm_keeps_float32_statistics():
    # LayerNorm over bfloat16 activations with a large common offset (as the residual stream has): computed in float32
    # and rounded once to bfloat16, it is the float64 LayerNorm of the same numbers to bfloat16's rounding (2**-8
    # relative); statistics in bfloat16 cancel catastrophically (x - mean loses the offset's rounding: errors ~0.3)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 64)) * 0.5 + 30 + rng.normal(size=(16, 1)) * 4, jnp.bfloat16)
    g = jnp.asarray(rng.normal(size=64) * 0.2 + 1, jnp.bfloat16)
    b = jnp.asarray(rng.normal(size=64) * 0.1, jnp.bfloat16)
    x64, g64, b64 = (np.asarray(t.astype(jnp.float32), np.float64) for t in (x, g, b))
    expected = (x64 - x64.mean(-1, keepdims=True)) / np.sqrt(x64.var(-1, keepdims=True) + 1e-5) * g64 + b64
    y = gpt.layer_norm(x, g, b)
    assert y.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(y.astype(jnp.float32), np.float64), expected, rtol=2**-8, atol=1e-4)


def saved_residuals(f, *args, capsys):  # [(dtype, shape, where it comes from)] that f's backward pass keeps
    capsys.readouterr()
    jax_ad_checkpoint.print_saved_residuals(f, *args)
    lines = capsys.readouterr().out.splitlines()
    found = [re.match(r"(\w+)\[([\d,]*)\] (.*)", line) for line in lines]
    return [(m[1], tuple(int(d) for d in m[2].split(",") if d), m[3]) for m in found if m]


def test_remat_saves_each_blocks_input_and_matmul_outputs_only(capsys):
    # what gpt.transformer's remat policy promises to keep of each block for the backward pass: its input and the
    # outputs of the matmuls the backward pass needs (c_attn: 3 n_embd floats a token; attn/c_proj: 1; mlp/c_fc: 4;
    # mlp/c_proj's output feeds only the residual sum, whose gradient does not need it), 9 n_embd floats a token and
    # layer in all; never the attention weights ([n_head, n_seq, n_seq] a row), which it recomputes
    hparams = {"n_vocab": 50, "n_ctx": 16, "n_embd": 24, "n_head": 2, "n_layer": 3}
    params = gpt_init(jax.random.PRNGKey(0), hparams)
    ids = jax.random.randint(jax.random.PRNGKey(1), (2, 16), 0, 50)
    n_tokens, n_seq, L, E = 32, 16, 3, 24
    per_layer = {}
    for remat in (True, False):
        residuals = saved_residuals(lambda p, remat=remat: gpt.lm_loss(p, ids, ids, 2, 0.1, jax.random.PRNGKey(2),
                                                                       remat=remat), params, capsys=capsys)
        per_layer[remat] = [(shape, where) for dtype, shape, where in residuals
                            if dtype == "f32" and shape[:1] == (L,) and "argument" not in where]
        assert residuals, "print_saved_residuals printed nothing that could be read"
    floats = sum(math.prod(shape) for shape, _ in per_layer[True])
    assert floats == 9 * E * n_tokens * L, per_layer[True]
    assert not [s for s, _ in per_layer[True] if s[-2:] == (n_seq, n_seq)], per_layer[True]
    assert [s for s, _ in per_layer[False] if s[-2:] == (n_seq, n_seq)]  # without remat the weights are kept


def test_lora_adapters_start_at_the_base_model_and_merge_exactly():
    hparams = {"n_vocab": 50, "n_ctx": 16, "n_embd": 16, "n_head": 2, "n_layer": 2}
    params = gpt_init(jax.random.PRNGKey(0), hparams)
    ids = jnp.array([3, 1, 4, 1, 5, 9, 2, 6])
    adapters = gpt.init_adapters(jax.random.PRNGKey(1), params, 4)
    base = gpt_forward(params, ids, 2)
    np.testing.assert_array_equal(gpt_forward(gpt.with_adapters(params, adapters, 2.0), ids, 2), base)  # B = 0
    # trained adapters (random B): the adapted forward pass == the merged model == W + scale A B formed in float64
    adapters = perturbed(adapters, 0.05, 2)
    adapted = gpt_forward(gpt.with_adapters(params, adapters, 2.0), ids, 2)
    assert not np.allclose(adapted, base, atol=1e-3)
    np.testing.assert_allclose(gpt_forward(gpt.merge_adapters(params, adapters, 2.0), ids, 2), adapted, atol=1e-5)
    flat = flat_params(params)
    for target in gpt.LORA_TARGETS:
        group, name = target.split("/")
        ab = adapters["h"][group][name]
        flat[f"h/{group}/{name}/w"] = (np.asarray(flat[f"h/{group}/{name}/w"], np.float64) + 2.0
                                       * np.asarray(ab["lora_a"], np.float64) @ np.asarray(ab["lora_b"], np.float64))
    np.testing.assert_allclose(numpy_gpt2(flat, np.asarray(ids), 2), adapted, atol=1e-4)


# ==================== encoder =========================================================================================
# GPT-2's BPE against tiktoken's ids; other vocabularies

SHAKESPEARE_TOKENS = 338_025  # tiktoken gpt2 (testdata/README.md)


@pytest.fixture(scope="module")
def encoder_fast():
    return encoder.bpe_encoder(TINY_TF / "encoder.json", TINY_TF / "vocab.bpe", fast=True)


@pytest.fixture(scope="module")
def encoder_pure():
    return encoder.bpe_encoder(TINY_TF / "encoder.json", TINY_TF / "vocab.bpe", fast=False)


@pytest.fixture(scope="module", params=["fast", "pure"])
def encoder_gpt2(request, encoder_fast, encoder_pure):
    return encoder_fast if request.param == "fast" else encoder_pure


def write_tiny_vocab(folder, merges, extra_ids=()):
    """A GPT-2-style vocabulary: the 256 bytes (ids 0..255), then one token per merge, in order."""
    vocab = {c: b for b, c in encoder.BYTE_TO_CHAR.items()}
    for a, b in merges:
        vocab[a + b] = len(vocab)
    vocab.update(extra_ids)
    (folder / "encoder.json").write_text(json.dumps(vocab), encoding="utf-8")
    (folder / "vocab.bpe").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return vocab


def test_encoder_paths_are_what_they_claim(encoder_fast, encoder_pure):
    assert encoder_fast.fast and encoder_fast.tiktoken is not None  # GPT-2's files pass the rank == id check
    assert not encoder_pure.fast and encoder_pure.tiktoken is None
    for enc in (encoder_fast, encoder_pure):
        assert enc.n_vocab == 50257 and enc.eot_token == 50256


@pytest.mark.parametrize("case", TOKENIZER_CASES, ids=lambda case: repr(case["text"])[:30])
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
    text = SHAKESPEARE.read_text(encoding="utf-8")
    start = time.perf_counter()
    fast = encoder_fast.encode(text)
    fast_s = time.perf_counter() - start
    start = time.perf_counter()
    pure = encoder_pure.encode(text)
    pure_s = time.perf_counter() - start
    assert len(fast) == SHAKESPEARE_TOKENS
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


def test_encoder_tiny_vocab_by_hand(tmp_path):
    merges = [("h", "e"), ("l", "l"), ("he", "ll"), ("Ġ", "w"), ("Ġw", "o")]
    vocab = write_tiny_vocab(tmp_path, merges)  # he 256, ll 257, hell 258, Ġw 259, Ġwo 260
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
    vocab = json.loads((TINY_TF / "encoder.json").read_text(encoding="utf-8"))
    a, b = (token for token, i in vocab.items() if i in (256, 257))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (tmp_path / "encoder.json").write_text(json.dumps(vocab), encoding="utf-8")
    enc = encoder.bpe_encoder(tmp_path / "encoder.json", TINY_TF / "vocab.bpe", fast=True)
    assert not enc.fast
    text = "x t a tx ax the cat"
    swap = {256: 257, 257: 256}
    expected = [swap.get(i, i) for i in encoder_fast.encode(text)]
    assert 256 in expected and 257 in expected
    assert enc.encode(text) == expected
    assert enc.decode(expected) == text


def test_encoder_extra_token_falls_back_to_pure(tmp_path):
    merges = [("h", "e")]
    vocab = write_tiny_vocab(tmp_path, merges, extra_ids={"hel": 257})  # a token no merge makes
    enc = encoder.get_encoder(tmp_path)
    assert not enc.fast  # tiktoken would merge "he" + "l" into "hel"; OpenAI's BPE never does
    assert enc.encode("hell") == [256, vocab["l"], vocab["l"]]


def test_encoder_hf_file_names(tmp_path, encoder_fast):
    shutil.copy(TINY_TF / "encoder.json", tmp_path / "vocab.json")
    shutil.copy(TINY_TF / "vocab.bpe", tmp_path / "merges.txt")
    enc = encoder.get_encoder(tmp_path)
    assert enc.fast and enc.eot_token == 50256
    for case in TOKENIZER_CASES:
        assert enc.encode(case["text"]) == case.get("ids_allowed_special", case["ids"])


def test_encoder_prefers_openai_files(tmp_path):
    vocab = write_tiny_vocab(tmp_path, [("a", "b")])
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
    shutil.copy(TINY_TF / "encoder.json", tmp_path / "encoder.json")
    with pytest.raises(FileNotFoundError, match=r"found only encoder\.json"):
        encoder.get_encoder(tmp_path)
    with pytest.raises(FileNotFoundError, match="no tokenizer in"):
        encoder.get_encoder(tmp_path / "does-not-exist")


def test_encoder_bad_bpe_files(tmp_path):
    vocab = write_tiny_vocab(tmp_path, [("a", "b")])
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


# ==================== tf_checkpoint, download, weights ================================================================
# reading checkpoints, downloading releases, model folders, the cache, HF export

@pytest.fixture
def release_server(monkeypatch):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), ReleaseHandler)
    server.files = {f"/models/124M/{name}": TINY_TF / name for name in weights.RELEASE_FILES}
    server.plan, server.log = {}, []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setenv("GPTJAX_BASE_URL", f"http://127.0.0.1:{server.server_address[1]}")
    monkeypatch.setattr(download, "BACKOFF_S", 0.001)
    yield server
    server.shutdown()
    server.server_close()


def copy_folder(tmp_path, source):  # a writable copy of a fixture folder (loading writes the cache beside it)
    ignore = shutil.ignore_patterns(weights.CACHE_NAME, "*.part")  # left there by loads of the fixture in place
    return pathlib.Path(shutil.copytree(source, tmp_path / source.name, ignore=ignore))


def one_line_error(exc_info):  # the message of a raised error, which must be one line
    message = str(exc_info.value)
    assert "\n" not in message
    return message


def test_weights_crc32c_check_values():
    assert tf_checkpoint.crc32c(b"123456789") == 0xE3069283
    assert tf_checkpoint.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 (iSCSI) B.4
    assert tf_checkpoint.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert tf_checkpoint.crc32c(bytes(range(32))) == 0x46DD794E
    assert tf_checkpoint.crc32c(b"") == 0


def test_weights_crc32c_matches_bitwise_definition():
    rng = np.random.default_rng(0)
    for n in (1, 2, 15, 16, 17, 63, 64, 65, 100, 1000):
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        assert tf_checkpoint.crc32c(data) == crc32c_bitwise(data), n
        assert tf_checkpoint.crc32c(np.frombuffer(data, np.uint8).copy()) == crc32c_bitwise(data), n  # writable
        assert tf_checkpoint.crc32c(data[n // 3:], tf_checkpoint.crc32c(data[:n // 3])) == crc32c_bitwise(data), n


def test_weights_download_load_and_logits(tmp_path, release_server):
    hparams, params = weights.load_hparams_and_params(weights.model_folder("124M", tmp_path / "models"))
    for name in weights.RELEASE_FILES:
        assert (tmp_path / "models" / "124M" / name).read_bytes() == (TINY_TF / name).read_bytes(), name
    assert not list((tmp_path / "models" / "124M").glob("*.part"))
    assert hparams == EXPECTED["hparams"]
    expected = reference_params()
    assert_params_equal(params, expected)
    for prompt in EXPECTED["prompts"]:
        logits = numpy_gpt2(flat_params(params), prompt["ids"], hparams["n_head"])
        np.testing.assert_allclose(logits[-1], prompt["last_logits"], atol=1e-4)


def test_weights_cut_transfer_resumes_with_range(tmp_path, release_server):
    release_server.plan[f"/models/124M/{DATA_FILE}"] = ["cut"]
    folder = weights.model_folder("124M", tmp_path)
    ranges = requests_for(release_server, DATA_FILE)
    assert ranges[0] is None and re.fullmatch(r"bytes=[1-9]\d*-", ranges[1]) and len(ranges) == 2
    assert (folder / DATA_FILE).read_bytes() == (TINY_TF / DATA_FILE).read_bytes()


def test_weights_cut_transfer_caught_by_size_check(tmp_path, release_server, monkeypatch):
    # urllib3 1.x (allowed by requests) ends a cut body quietly instead of raising: the Content-Length check catches it
    init = urllib3.response.HTTPResponse.__init__
    monkeypatch.setattr(urllib3.response.HTTPResponse, "__init__",
                        lambda self, *a, **kw: init(self, *a, **{**kw, "enforce_content_length": False}))
    release_server.plan[f"/models/124M/{DATA_FILE}"] = ["cut"]
    folder = weights.model_folder("124M", tmp_path)
    assert len(requests_for(release_server, DATA_FILE)) == 2
    assert (folder / DATA_FILE).read_bytes() == (TINY_TF / DATA_FILE).read_bytes()


def test_weights_cut_transfer_restarts_when_server_ignores_range(tmp_path, release_server):
    release_server.plan[f"/models/124M/{DATA_FILE}"] = ["cut", "ignore_range"]
    folder = weights.model_folder("124M", tmp_path)
    assert requests_for(release_server, DATA_FILE)[1] is not None  # asked for the rest, got the whole file
    assert (folder / DATA_FILE).read_bytes() == (TINY_TF / DATA_FILE).read_bytes()


def test_weights_500_once_is_retried(tmp_path, release_server):
    release_server.plan["/models/124M/hparams.json"] = [500, 503]
    folder = weights.model_folder("124M", tmp_path)
    assert len(requests_for(release_server, "hparams.json")) == 3
    assert (folder / "hparams.json").read_bytes() == (TINY_TF / "hparams.json").read_bytes()


def test_weights_persistent_500_fails_without_partial_file(tmp_path, release_server):
    release_server.plan[f"/models/124M/{DATA_FILE}"] = [500] * (download.RETRIES + 1)
    with pytest.raises(ConnectionError) as e:
        weights.load_encoder_hparams_and_params("124M", tmp_path)
    message = one_line_error(e)
    assert f"/models/124M/{DATA_FILE}" in message and "HTTP 500" in message and str(tmp_path / "124M") in message
    assert len(requests_for(release_server, DATA_FILE)) == download.RETRIES + 1
    assert not (tmp_path / "124M" / DATA_FILE).exists()


def test_weights_404_names_url_and_sizes(tmp_path, release_server):
    release_server.plan["/models/124M/hparams.json"] = [404]
    with pytest.raises(FileNotFoundError) as e:
        weights.load_encoder_hparams_and_params("124M", tmp_path)
    message = one_line_error(e)
    assert f"{weights.base_url()}/models/124M/hparams.json" in message and "404" in message and "1558M" in message
    assert len(requests_for(release_server, "hparams.json")) == 1  # a 404 is final: no retries


def test_weights_no_server_names_url_and_folder(tmp_path, monkeypatch):
    port = free_port()  # a port that nothing listens on
    monkeypatch.setenv("GPTJAX_BASE_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(download, "BACKOFF_S", 0.001)
    with pytest.raises(ConnectionError) as e:
        weights.load_encoder_hparams_and_params("124M", tmp_path / "models")
    message = one_line_error(e)
    assert f"http://127.0.0.1:{port}/models/124M/checkpoint" in message
    assert str(tmp_path / "models" / "124M") in message and "by hand" in message


def test_weights_complete_folder_is_not_fetched_again(tmp_path, release_server):
    weights.model_folder("124M", tmp_path)
    release_server.log.clear()
    weights.load_hparams_and_params(weights.model_folder("124M", tmp_path))
    assert release_server.log == []
    (tmp_path / "124M" / "vocab.bpe").unlink()
    weights.model_folder("124M", tmp_path)
    assert [path for path, _ in release_server.log] == ["/models/124M/vocab.bpe"]


def test_weights_leftover_part_file_is_resumed(tmp_path, release_server):
    folder = tmp_path / "124M"
    folder.mkdir()
    whole = (TINY_TF / DATA_FILE).read_bytes()
    (folder / f"{DATA_FILE}.part").write_bytes(whole[:1000])  # an earlier run stopped here
    weights.model_folder("124M", tmp_path)
    assert requests_for(release_server, DATA_FILE) == ["bytes=1000-"]
    assert (folder / DATA_FILE).read_bytes() == whole


def test_weights_a_web_page_is_never_taken_for_a_release_file(tmp_path, release_server):
    # a captive portal or proxy answering 200 with its own page: refused before it is renamed into place, whether it
    # says it is HTML or passes itself off as the file; a rerun then fetches the real file
    cases = [("portal", "model.ckpt.data-00000-of-00001"), ("portal_as_file", "encoder.json"),
             ("portal_as_file", "vocab.bpe"), ("portal_as_file", "model.ckpt.index"),
             ("portal_as_file", "model.ckpt.data-00000-of-00001")]
    for case, (action, name) in enumerate(cases):
        folder = tmp_path / str(case) / "124M"
        release_server.plan.clear()
        release_server.plan[f"/models/124M/{name}"] = [action] * (download.RETRIES + 1)
        with pytest.raises(ConnectionError) as e:
            weights.download_release("124M", folder)
        message = one_line_error(e)
        assert name in message and ("web page" in message or "not the file expected" in message), message
        assert not (folder / name).exists() and not (folder / (name + ".part")).exists()
        release_server.plan.clear()
        weights.download_release("124M", folder)  # the next run fetches the real file
        for name in weights.RELEASE_FILES:
            assert (folder / name).read_bytes() == (TINY_TF / name).read_bytes()


def test_weights_a_stalled_transfer_is_cut_and_resumed(tmp_path, release_server, monkeypatch):
    monkeypatch.setattr(download, "STALL_WINDOW_S", 0.3)  # the real window is a minute
    name = "model.ckpt.data-00000-of-00001"
    release_server.plan[f"/models/124M/{name}"] = ["trickle"]
    t = time.monotonic()
    folder, hparams, params = weights.load_model("124M", tmp_path / "models")
    assert time.monotonic() - t < 30
    ranges = requests_for(release_server, name)
    assert len(ranges) == 2 and ranges[0] is None and ranges[1].startswith("bytes=")  # cut, then resumed
    assert (folder / name).read_bytes() == (TINY_TF / name).read_bytes()
    release_server.plan[f"/models/124M/{name}"] = ["trickle"] * (download.RETRIES + 1)
    with pytest.raises(ConnectionError, match="stalled"):
        weights.download_release("124M", tmp_path / "other")


def test_weights_concurrent_downloads_into_one_folder_wait_for_each_other(tmp_path, release_server, capsys):
    for name in weights.RELEASE_FILES:
        release_server.plan[f"/models/124M/{name}"] = ["slow"]
    errors = []

    def fetch():
        try:
            weights.download_release("124M", tmp_path / "models" / "124M")
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
    threads = [threading.Thread(target=fetch) for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    for name in weights.RELEASE_FILES:  # each fetched once, whole
        assert len(requests_for(release_server, name)) == 1, name
        assert (tmp_path / "models" / "124M" / name).read_bytes() == (TINY_TF / name).read_bytes()
    assert "waiting for another process downloading into" in capsys.readouterr().err


@pytest.mark.parametrize("layout", ["tf", "hf"])
@pytest.mark.parametrize("n_layer", [1, 3])
def test_weights_config_must_name_the_layers_the_weights_hold(tmp_path, layout, n_layer):
    # fewer layers in the config than in the weights once loaded a truncated model without a word
    folder = copy_folder(tmp_path, TINY_TF if layout == "tf" else TINY_HF)
    config = folder / ("hparams.json" if layout == "tf" else "config.json")
    values = json.loads(config.read_text())
    values["n_layer"] = n_layer
    config.write_text(json.dumps(values))
    with pytest.raises(ValueError) as e:
        weights.load_hparams_and_params(folder)
    message = one_line_error(e)
    assert f"{config} gives n_layer {n_layer}" in message and "holds 2 blocks" in message, message
    assert "config does not match the weights" in message


def test_weights_every_tensor_in_the_file_must_be_used(tmp_path):
    folder = copy_folder(tmp_path, TINY_HF)
    tensors = safetensors.numpy.load_file(folder / "model.safetensors")
    prefix = "transformer." if "transformer.wte.weight" in tensors else ""
    tensors[prefix + "h.0.attn.bias"] = np.tril(np.ones((1, 1, 64, 64), np.float32))  # older files' mask buffer
    safetensors.numpy.save_file(tensors, folder / "model.safetensors")
    weights.load_hparams_and_params(folder)  # a buffer is not a weight: fine
    tensors[prefix + "h.1.mlp.c_gate.weight"] = np.zeros((16, 64), np.float32)
    safetensors.numpy.save_file(tensors, folder / "model.safetensors")
    with pytest.raises(ValueError) as e:
        weights.load_hparams_and_params(folder)
    assert f"holds {prefix}h.1.mlp.c_gate.weight, which a GPT-2 of the shape in" in one_line_error(e)


def test_weights_own_layout_is_checked_against_its_hparams(tmp_path):
    hparams = {"n_vocab": 50, "n_ctx": 16, "n_embd": 8, "n_head": 2, "n_layer": 2}
    params = gpt_init(jax.random.PRNGKey(0), hparams)
    weights.save_params(tmp_path / "m", {**hparams, "n_layer": 1}, params)  # metadata that disagrees with the tensors
    with pytest.raises(ValueError) as e:
        weights.load_hparams_and_params(tmp_path / "m")
    message = one_line_error(e)
    assert "h/attn/c_attn/b has shape [2, 24] where its hparams give [1, 24]" in message
    assert "download" not in message  # a trained model cannot be fetched again


def test_weights_damaged_release_is_fetched_anew_but_a_users_folder_is_not(tmp_path, release_server):
    folder, _, _ = weights.load_model("124M", tmp_path / "models")
    weights.cache_path(folder).unlink()
    data = bytearray((folder / "model.ckpt.data-00000-of-00001").read_bytes())
    data[100] ^= 1
    (folder / "model.ckpt.data-00000-of-00001").write_bytes(bytes(data))
    with pytest.raises(ValueError, match="crc32c checksum mismatch .*: delete it and run again to download it anew"):
        weights.load_model("124M", tmp_path / "models")
    with pytest.raises(ValueError, match="crc32c checksum mismatch .*: put back a good copy$"):
        weights.load_model(str(folder))  # the same files, as a folder of the user's


def test_weights_hf_folder_equals_tf_folder(tmp_path):
    _, tf_params = weights.load_hparams_and_params(copy_folder(tmp_path, TINY_TF))
    hparams, hf_params = weights.load_hparams_and_params(copy_folder(tmp_path, TINY_HF))
    assert hparams == EXPECTED["hparams"]
    assert_params_equal(hf_params, flat_params(tf_params))
    assert_params_equal(tf_params, reference_params())


def test_weights_hf_without_transformer_prefix_and_in_bfloat16(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(TINY_HF / "config.json", folder)
    hf = safetensors.numpy.load_file(TINY_HF / "model.safetensors")
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
    expected = {name: x.astype(jnp.bfloat16).astype(np.float32) for name, x in reference_params().items()}
    assert_params_equal(params, expected)


def test_weights_cache_is_written_used_and_invalidated(tmp_path, monkeypatch):
    folder = copy_folder(tmp_path, TINY_TF)
    expected, before = reference_params(), folder_state(folder)
    weights.load_hparams_and_params(folder)
    assert folder_state(folder) == before  # the user's folder is left as it was: the cache is gptjax's own
    cache = weights.cache_path(folder)
    assert cache.is_file() and str(cache).startswith(os.environ["GPTJAX_CACHE"])
    cached = safetensors.numpy.load_file(cache)  # readable by the reference implementation
    assert sorted(cached) == sorted(expected)
    for name in expected:
        np.testing.assert_array_equal(cached[name], expected[name])
    with safetensors.safe_open(cache, "np") as f:
        assert json.loads(f.metadata()["hparams"]) == EXPECTED["hparams"]

    with monkeypatch.context() as m:  # a second load reads the cache only
        m.setattr(weights, "read_tf_params", lambda *a: pytest.fail("the checkpoint was read again"))
        _, params = weights.load_hparams_and_params(folder)
    assert_params_equal(params, expected)

    doubled = {name: x * 2 for name, x in expected.items()}  # a new checkpoint in place of the old one
    write_bundle(folder / "model.ckpt", tf_tensors(doubled))
    _, params = weights.load_hparams_and_params(folder)
    assert_params_equal(params, doubled)
    # new weights of the same size with the old time (cp -p, an archive, a sync) are noticed too
    data_file = folder / DATA_FILE
    old = data_file.stat()
    write_bundle(folder / "model.ckpt", tf_tensors(expected))
    os.utime(data_file, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert data_file.stat().st_size == old.st_size and data_file.stat().st_mtime_ns == old.st_mtime_ns
    _, params = weights.load_hparams_and_params(folder)
    assert_params_equal(params, expected)
    # a change near the end of the file alone (same size, same time) is noticed too: read again, its checksums fail
    blob = bytearray(data_file.read_bytes())
    blob[-8:] = bytes(8 - i for i in range(8))
    data_file.write_bytes(bytes(blob))
    os.utime(data_file, ns=(old.st_atime_ns, old.st_mtime_ns))
    with pytest.raises(ValueError, match="damaged|checksum|crc"):
        weights.load_hparams_and_params(folder)


def test_weights_damaged_cache_is_remade(tmp_path):
    folder = copy_folder(tmp_path, TINY_TF)
    weights.load_hparams_and_params(folder)
    cache = weights.cache_path(folder)
    cache.write_bytes(cache.read_bytes()[:-100])
    _, params = weights.load_hparams_and_params(folder)
    assert_params_equal(params, reference_params())
    assert cache.stat().st_size > 100 + sum(x.nbytes for x in reference_params().values())


def test_weights_dtype_bfloat16(tmp_path):
    _, params = weights.load_hparams_and_params(copy_folder(tmp_path, TINY_TF), dtype=jnp.bfloat16)
    flat = flat_params(params)
    for name, x in reference_params().items():
        assert flat[name].dtype == jnp.bfloat16
        np.testing.assert_array_equal(flat[name], x.astype(jnp.bfloat16), err_msg=name)


def test_weights_half_and_bfloat16_checkpoints(tmp_path):
    expected = reference_params()
    for dtype in (np.float16, jnp.bfloat16):
        folder = tmp_path / np.dtype(dtype).name
        folder.mkdir()
        shutil.copy(TINY_TF / "hparams.json", folder)
        tensors = tf_tensors({name: x.astype(dtype) for name, x in expected.items()})
        write_bundle(folder / "model.ckpt", tensors)
        _, params = weights.load_hparams_and_params(folder)
        assert_params_equal(params, {n: x.astype(dtype).astype(np.float32) for n, x in expected.items()})


def test_weights_corrupt_data_file_fails_its_checksum(tmp_path):
    folder = copy_folder(tmp_path, TINY_TF)
    data = bytearray((folder / DATA_FILE).read_bytes())
    data[len(data) // 2] ^= 0x01
    (folder / DATA_FILE).write_bytes(bytes(data))
    with pytest.raises(ValueError) as e:
        weights.load_hparams_and_params(folder)
    message = one_line_error(e)
    assert str(folder / DATA_FILE) in message and "crc32c" in message and "put back a good copy" in message


def test_weights_truncated_data_file(tmp_path):
    folder = copy_folder(tmp_path, TINY_TF)
    (folder / DATA_FILE).write_bytes((TINY_TF / DATA_FILE).read_bytes()[:-10])
    with pytest.raises(ValueError) as e:
        weights.load_hparams_and_params(folder)
    message = one_line_error(e)
    assert str(folder / DATA_FILE) in message and "truncated" in message and "put back a good copy" in message


@pytest.mark.parametrize("damage", ["truncate", "flip"])
def test_weights_damaged_index_file(tmp_path, damage):
    folder = copy_folder(tmp_path, TINY_TF)
    index = (folder / "model.ckpt.index").read_bytes()
    if damage == "truncate":
        index = index[:len(index) // 2]
    else:
        index = index[:100] + bytes([index[100] ^ 0x40]) + index[101:]
    (folder / "model.ckpt.index").write_bytes(index)
    with pytest.raises(ValueError) as e:
        weights.load_hparams_and_params(folder)
    message = one_line_error(e)
    assert str(folder / "model.ckpt.index") in message and "put back a good copy" in message
    assert ("footer" if damage == "truncate" else "checksum") in message


def test_weights_unknown_model_size(tmp_path):
    with pytest.raises(ValueError) as e:
        weights.load_encoder_hparams_and_params("125M", tmp_path)
    message = one_line_error(e)
    assert "'125M'" in message and all(size in message for size in weights.MODEL_SIZES)


def test_weights_missing_files_are_named(tmp_path):
    folder = tmp_path / "partial"
    folder.mkdir()
    with pytest.raises(FileNotFoundError) as e:
        weights.load_hparams_and_params(folder)
    assert str(folder) in one_line_error(e) and "hparams.json" in one_line_error(e)
    shutil.copy(TINY_TF / "model.ckpt.index", folder)
    with pytest.raises(FileNotFoundError) as e:
        weights.load_hparams_and_params(folder)
    assert re.search(rf"{re.escape(str(folder))} lacks hparams.json, {DATA_FILE}$", one_line_error(e))
    with pytest.raises(FileNotFoundError) as e:
        weights.load_hparams_and_params(tmp_path / "absent")
    assert str(tmp_path / "absent") in one_line_error(e)


def test_weights_hf_folder_with_only_pytorch_bin(tmp_path):
    folder = tmp_path / "hf"
    folder.mkdir()
    shutil.copy(TINY_HF / "config.json", folder)
    (folder / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(FileNotFoundError) as e:
        weights.load_hparams_and_params(folder)
    assert "model.safetensors" in one_line_error(e) and str(folder) in one_line_error(e)


@pytest.mark.parametrize("change", [{"activation_function": "relu"}, {"layer_norm_epsilon": 1e-6},
                                    {"model_type": "gpt_neo"}])
def test_weights_hf_config_outside_gpt2_is_refused(tmp_path, change):
    folder = copy_folder(tmp_path, TINY_HF)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **change}))
    with pytest.raises(ValueError) as e:
        weights.load_hparams_and_params(folder)
    assert str(folder / "config.json") in one_line_error(e) and next(iter(change)) in one_line_error(e)


def test_weights_hf_folder_without_tokenizer_gets_the_shipped_gpt2_vocabulary(tmp_path, release_server):
    folder = copy_folder(tmp_path, TINY_HF)
    assert weights.tokenizer_folder(folder) == encoder.GPT2_VOCAB
    assert weights.tokenizer_folder(TINY_TF) == TINY_TF
    # the shipped files are OpenAI's: the sha256 that tiktoken pins for its gpt2 encoding
    pinned = {"encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
              "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"}
    for name, digest in pinned.items():
        assert hashlib.sha256((encoder.GPT2_VOCAB / name).read_bytes()).hexdigest() == digest
    assert release_server.log == []  # nothing fetched


def test_weights_load_encoder_hparams_and_params_finds_the_vocabulary(tmp_path, release_server, monkeypatch):
    stub = type(sys)("encoder")  # records which folder the tokenizer would be read from
    stub.get_encoder = lambda folder: pathlib.Path(folder)
    stub.GPT2_VOCAB, stub.GPT2_FILES = encoder.GPT2_VOCAB, encoder.GPT2_FILES
    monkeypatch.setattr(weights, "encoder", stub)
    models = tmp_path / "models"
    folder, hparams, params = weights.load_encoder_hparams_and_params("124M", models, dtype=jnp.bfloat16)
    assert folder == models / "124M" and hparams == EXPECTED["hparams"]
    assert flat_params(params)["wte"].dtype == jnp.bfloat16
    release_server.log.clear()
    hf = copy_folder(tmp_path, TINY_HF)  # no tokenizer files: GPT-2's, shipped with gptjax
    folder, _, params = weights.load_encoder_hparams_and_params(str(hf), models)
    assert folder == encoder.GPT2_VOCAB and release_server.log == []
    assert_params_equal(params, reference_params())


def test_weights_unwritable_cache_still_loads(tmp_path, monkeypatch):
    folder = copy_folder(tmp_path, TINY_TF)
    weights.cache_path(folder).mkdir(parents=True)  # the cache cannot be put in place
    with pytest.warns(UserWarning, match="converted on every load; set GPTJAX_CACHE to a writable folder"):
        _, params = weights.load_hparams_and_params(folder)
    assert_params_equal(params, reference_params())
    assert not list(weights.cache_path(folder).parent.glob(".*part"))
    # GPTJAX_CACHE naming a file, and a link planted where gptjax's own cache folders go: converted in memory, with
    # one warning, nothing written through the link
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv("GPTJAX_CACHE", str(tmp_path / "a-file"))
    with pytest.warns(UserWarning, match=f"cannot be written \\({tmp_path / 'a-file'}: File exists\\)"):
        _, params = weights.load_hparams_and_params(folder)
    assert_params_equal(params, reference_params())
    monkeypatch.setenv("GPTJAX_CACHE", str(tmp_path / "cache"))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    for planted in (weights.cache_path(folder).parent.parent, weights.cache_path(folder).parent):
        planted.parent.mkdir(parents=True, exist_ok=True)
        planted.symlink_to(elsewhere, target_is_directory=True)
        with pytest.warns(UserWarning, match="is a symbolic link, which gptjax never writes through"):
            _, params = weights.load_hparams_and_params(folder)
        assert_params_equal(params, reference_params())
        assert list(elsewhere.iterdir()) == []
        planted.unlink()


def test_weights_end_to_end_hf_folder_with_gpt2_tokenizer(tmp_path, release_server):
    hf = copy_folder(tmp_path, TINY_HF)  # saved without a tokenizer: loads offline all the same
    enc, hparams, params = weights.load_encoder_hparams_and_params(str(hf), tmp_path / "models")
    assert release_server.log == [] and not (tmp_path / "models").exists()
    for prompt in EXPECTED["prompts"]:
        ids = list(enc.encode(prompt["text"]))
        assert ids == prompt["ids"]
        logits = numpy_gpt2(flat_params(params), ids, hparams["n_head"])
        np.testing.assert_allclose(logits[-1], prompt["last_logits"], atol=1e-4)


def test_save_params_round_trips_through_a_model_folder(tmp_path):
    # gptjax's own layout (what train.py writes) loads like any model folder, hparams included
    hparams = {"n_vocab": 50, "n_ctx": 16, "n_embd": 8, "n_head": 2, "n_layer": 2}
    params = gpt_init(jax.random.PRNGKey(3), hparams)
    weights.save_params(tmp_path / "out", hparams, params)
    got_hparams, got = weights.load_hparams_and_params(tmp_path / "out")
    assert got_hparams == hparams
    assert jax.tree.structure(got) == jax.tree.structure(params)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert not list((tmp_path / "out").glob("*.part"))


def test_weights_25_heads_and_non_square_shapes_in_every_layout(tmp_path):
    # GPT-2 1558M has 25 heads (of 64): a small model with 25 heads of 2 (n_embd 50: every matrix but attn/c_proj is
    # non-square) through each layout, OpenAI's TF checkpoint, gptjax's own folder and its HF export read back, against
    # numpy's GPT-2 in float64 with 25 heads
    hparams = {"n_vocab": 40, "n_ctx": 12, "n_embd": 50, "n_head": 25, "n_layer": 3}
    params = gpt_init(jax.random.PRNGKey(0), hparams)
    params = perturbed(params, 0.1, 1)
    flat = {name: np.asarray(x) for name, x in flat_params(params).items()}
    ids = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3])
    expected = numpy_gpt2(flat, ids, 25)
    (tmp_path / "tf").mkdir()
    (tmp_path / "tf" / "hparams.json").write_text(json.dumps(hparams))
    write_bundle(tmp_path / "tf" / "model.ckpt", tf_tensors(flat))
    weights.save_params(tmp_path / "own", hparams, params)
    weights.to_hf(str(tmp_path / "own"), tmp_path / "hf")
    for folder in ("tf", "own", "hf"):
        loaded_hparams, loaded = weights.load_hparams_and_params(tmp_path / folder)
        assert loaded_hparams == hparams, folder
        np.testing.assert_allclose(gpt_forward(loaded, jnp.asarray(ids), loaded_hparams["n_head"]), expected, atol=1e-4,
                                   err_msg=folder)


def test_weights_to_hf_writes_what_transformers_writes(tmp_path, capsys):
    # gpt2-tiny-hf was written by transformers' save_pretrained from gpt2-tiny's weights: exporting gpt2-tiny must
    # give the same tensors under the same names, a config that describes the same model, GPT-2's vocabulary under
    # HF's file names, and (read back by gptjax's HF reader) the reference logits
    dest = tmp_path / "exported"
    assert weights.main(["to_hf", str(copy_folder(tmp_path, TINY_TF)), str(dest)]) == 0
    got = read_safetensors(dest / "model.safetensors")
    want = read_safetensors(TINY_HF / "model.safetensors")
    assert sorted(got) == sorted(want)
    for name in want:
        np.testing.assert_array_equal(got[name], want[name], err_msg=name)
    config, reference = (json.loads((d / "config.json").read_text()) for d in (dest, TINY_HF))
    for key in ("architectures", "model_type", "vocab_size", "n_positions", "n_embd", "n_layer", "n_head", "n_inner",
                "activation_function", "layer_norm_epsilon", "scale_attn_weights", "scale_attn_by_inverse_layer_idx",
                "tie_word_embeddings", "bos_token_id", "eos_token_id"):
        assert config[key] == reference[key], key
    assert (dest / "vocab.json").read_bytes() == (TINY_TF / "encoder.json").read_bytes()
    assert (dest / "merges.txt").read_bytes() == (TINY_TF / "vocab.bpe").read_bytes()
    encoder, hparams, params = weights.load_encoder_hparams_and_params(str(dest), tmp_path / "models")
    for prompt in EXPECTED["prompts"]:
        assert list(encoder.encode(prompt["text"])) == prompt["ids"]
        logits = numpy_gpt2(flat_params(params), prompt["ids"], hparams["n_head"])
        np.testing.assert_allclose(logits[-1], prompt["last_logits"], atol=1e-4)
    # a folder that holds a model is not written over
    assert weights.main(["to_hf", str(TINY_TF), str(dest)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already holds config.json" in err
    # nor one of any other layout: OpenAI's (its weights alone, too) or gptjax's own
    for name, files_there in (("openai", ["hparams.json", DATA_FILE, "model.ckpt.index"]), ("openai-weights",
                              [DATA_FILE]), ("gptjax", ["params.safetensors"])):
        other = tmp_path / name
        other.mkdir()
        for file in files_there:
            (other / file).write_bytes(b"someone's")
        assert weights.main(["to_hf", str(TINY_TF), str(other)]) == 2, name
        assert "already holds" in capsys.readouterr().err
        assert sorted(p.name for p in other.iterdir()) == sorted(files_there)


def test_weights_to_hf_loads_in_transformers(tmp_path):
    # with the bench extra installed, transformers itself reads the export: its tokenizer gives tiktoken's ids and
    # its model the reference logits
    transformers, torch = pytest.importorskip("transformers"), pytest.importorskip("torch")
    dest = tmp_path / "exported"
    weights.to_hf(str(copy_folder(tmp_path, TINY_TF)), dest)
    model = transformers.GPT2LMHeadModel.from_pretrained(dest).eval()
    tokenizer = transformers.GPT2TokenizerFast.from_pretrained(dest)
    assert tokenizer.eos_token_id == 50256
    for prompt in EXPECTED["prompts"]:
        ids = tokenizer(prompt["text"])["input_ids"]
        assert ids == prompt["ids"]
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].double().numpy()
        np.testing.assert_allclose(logits, prompt["last_logits"], atol=1e-4)


@pytest.mark.slow
def test_weights_to_hf_of_a_trained_char_model_without_biases(train_data_dir, tmp_path, capsys):
    out, dest = tmp_path / "out", tmp_path / "exported"
    train.train(run_config(train_data_dir, out, max_iters=2, eval_interval=2))  # bias=False: no bias tensors
    assert weights.main(["to_hf", str(out), str(dest)]) == 0
    assert "character vocabulary (meta.json) has no Hugging Face tokenizer" in capsys.readouterr().err
    assert not (dest / "vocab.json").exists()
    tensors = read_safetensors(dest / "model.safetensors")  # HF's layers all have biases: here zeros
    assert not tensors["transformer.h.1.attn.c_attn.bias"].any() and not tensors["transformer.ln_f.bias"].any()
    trained_encoder, hparams, trained = weights.load_encoder_hparams_and_params(str(out))
    encoder, exported_hparams, exported = weights.load_encoder_hparams_and_params(str(dest))
    assert exported_hparams == hparams and encoder.encode("ROMEO: O") == trained_encoder.encode("ROMEO: O")
    ids = jnp.array(encoder.encode("ROMEO: O Juliet"))
    np.testing.assert_allclose(gpt_forward(exported, ids, hparams["n_head"]),
                               gpt_forward(trained, ids, hparams["n_head"]), atol=1e-5)


def test_weights_a_release_vocabulary_must_be_gpt2s(tmp_path, release_server):
    # a vocab.bpe cut at a line boundary (its header intact, its length what the server says) once changed the
    # tokenization for good; a reordered encoder.json of valid form too: both differ from the shipped copies
    bpe = (TINY_TF / "vocab.bpe").read_bytes()
    cut = tmp_path / "cut.bpe"
    cut.write_bytes(bpe[:bpe.index(b"\n", len(bpe) // 2) + 1])
    vocab = json.loads((TINY_TF / "encoder.json").read_text())
    reordered = tmp_path / "reordered.json"
    reordered.write_text(json.dumps(dict(zip(vocab, reversed(list(vocab.values()))))))
    for name, served in (("vocab.bpe", cut), ("encoder.json", reordered)):
        release_server.files[f"/models/124M/{name}"] = served
        folder = tmp_path / name / "124M"
        with pytest.raises(ConnectionError) as e:
            weights.download_release("124M", folder)
        assert f"differs from GPT-2's {name}" in one_line_error(e)
        assert not (folder / name).exists() and not (folder / f"{name}.part").exists()
        release_server.files[f"/models/124M/{name}"] = TINY_TF / name


def test_weights_a_release_file_is_no_larger_than_it_can_be(tmp_path, release_server):
    # a server streaming on and on into a small file (no Content-Length) is stopped at the file's limit; a 206 whose
    # Content-Range is not what was asked is not appended; a server that answers 416 to everything is one line
    for name in ("checkpoint", "hparams.json", "vocab.bpe", "model.ckpt.index"):
        release_server.plan = {f"/models/124M/{name}": ["endless"]}
        folder = tmp_path / "endless" / name
        with pytest.raises(ConnectionError) as e:
            weights.download_release("124M", folder)
        message = one_line_error(e)
        assert "not the file expected" in message and "it can be" in message, message
        assert not (folder / name).exists() and not (folder / f"{name}.part").exists()
    folder = tmp_path / "ranges"
    folder.mkdir()
    data = (TINY_TF / DATA_FILE).read_bytes()
    shutil.copy(TINY_TF / "model.ckpt.index", folder / "model.ckpt.index")
    (folder / f"{DATA_FILE}.part").write_bytes(data[:1000])  # what an earlier attempt kept
    release_server.plan = {f"/models/124M/{DATA_FILE}": ["wrong_range"]}
    weights.download_release("124M", folder)
    assert (folder / DATA_FILE).read_bytes() == data  # started over, not spliced
    release_server.plan = {"/models/124M/hparams.json": [416] * (download.RETRIES + 1)}
    with pytest.raises(ConnectionError) as e:
        weights.download_release("124M", tmp_path / "416")
    assert "HTTP 416" in one_line_error(e) and "Errno" not in one_line_error(e)


def test_weights_are_read_as_given_and_never_written_beside_them(tmp_path, release_server, capsys):
    # the conversion cache is gptjax's (weights.cache_path): a user's folder is left as it was; NaN weights are
    # refused; a flipped bit in gptjax's own files is found; a release lacking only what loading does not need
    # (model.ckpt.meta) loads offline; a folder holding only a training checkpoint says what to do
    hf = copy_folder(tmp_path, TINY_HF)
    before = folder_state(hf)
    assert main.main(["--model_dir", str(hf), "--prompt", PROMPTS[0]["text"], "--greedy",
                      "--n_tokens_to_generate", "20"]) == 0
    assert capsys.readouterr().out == PROMPTS[0]["greedy_text"] + "\n" and folder_state(hf) == before
    tensors = read_safetensors(hf / "model.safetensors")
    tensors["transformer.h.1.mlp.c_fc.weight"][3, 5] = np.nan
    safetensors.numpy.save_file(tensors, hf / "model.safetensors", {"format": "pt"})
    with pytest.raises(ValueError, match="h.1.mlp.c_fc.weight holds NaN or infinite values"):
        weights.load_hparams_and_params(hf)
    own = tmp_path / "own"
    weights.save_params(own, EXPECTED["hparams"], weights.unflatten(reference_params()))
    blob = bytearray((own / "params.safetensors").read_bytes())
    blob[-5] ^= 0x01  # one bit of the last tensor (ln_f's)
    (own / "params.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="fails its checksum"):
        weights.load_hparams_and_params(own)
    models = tmp_path / "models"
    weights.download_release("124M", models / "124M")
    (models / "124M" / "model.ckpt.meta").unlink()
    release_server.log.clear()
    _, params = weights.load_hparams_and_params(weights.model_folder("124M", models))
    assert not release_server.log
    only_ckpt = tmp_path / "only-ckpt"
    only_ckpt.mkdir()
    (only_ckpt / "ckpt.safetensors").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="holds a training checkpoint .* --init_from=resume"):
        weights.load_hparams_and_params(only_ckpt)


def test_weights_to_hf_writes_only_a_new_model(tmp_path, capsys):
    dest = tmp_path / "hf"
    dest.mkdir()
    (dest / "tokenizer_config.json").write_text("a user's own")
    assert weights.main(["to_hf", str(TINY_TF), str(dest)]) == 2
    assert "already holds tokenizer_config.json" in capsys.readouterr().err
    assert (dest / "tokenizer_config.json").read_text() == "a user's own"
    assert weights.main(["to_hf", str(TINY_TF), ""]) == 2
    assert "the destination is empty" in capsys.readouterr().err
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / "new" / f".model.safetensors.{int(dead.stdout)}.part"  # what a killed export left
    stale.parent.mkdir()
    stale.write_bytes(b"x" * 1000)
    assert weights.main(["to_hf", str(TINY_TF), str(tmp_path / "new")]) == 0
    assert not stale.exists()


def test_hostile_sizes_in_a_model_folder_are_refused_at_once(tmp_path):
    # sizes of 10^9, zero, negative, true, or n_head not dividing n_embd, in OpenAI's hparams.json and HF's
    # config.json: a one-line error within seconds (a list of n_layer block numbers once took 20 GB and a minute)
    cases = [("n_layer", 10**9, "n_layer"), ("n_vocab", 10**9, "shape"), ("n_ctx", 10**9, "shape"),
             ("n_embd", 10**9, "n_embd"), ("n_head", 0, "n_head"), ("n_layer", -1, "n_layer"),
             ("n_head", True, "n_head"), ("n_head", 3, "multiple of n_head"), ("n_layer", 3, "n_layer 3")]
    hf_names = {"n_vocab": "vocab_size", "n_ctx": "n_positions"}
    for layout, file in (("tf", "hparams.json"), ("hf", "config.json")):
        for key, value, words in cases:
            folder = tmp_path / f"{layout}-{key}-{value}"
            shutil.copytree(TINY[layout], folder, ignore=shutil.ignore_patterns("params*.safetensors"))
            config = json.loads((folder / file).read_text())
            config[hf_names.get(key, key) if layout == "hf" else key] = value
            (folder / file).write_text(json.dumps(config))
            started = time.perf_counter()
            with pytest.raises(ValueError) as e:
                weights.load_hparams_and_params(folder)
            assert time.perf_counter() - started < 10 and "\n" not in str(e.value), (layout, key, value)
            assert words in str(e.value), (layout, key, value, str(e.value))


# ==================== sampling ========================================================================================
# generation against the fixture's greedy tokens and exact sampling distributions

def softmax64(logits):
    p = np.exp(np.asarray(logits, np.float64) - np.max(logits))
    return p / p.sum()


def draws(logits, n, seed, top_k=None, top_p=1.0, temperature=1.0):  # n draws from next_tokens on one logit vector
    rows = jnp.tile(jnp.asarray(logits, jnp.float32), (n, 1))
    controls = sampling.request_controls({"n_vocab": len(logits)}, n, temperature=temperature, top_k=top_k,
                                         top_p=top_p, seed=seed)
    return np.asarray(jax.jit(partial(sampling.next_tokens, greedy=False))(rows, controls, jnp.zeros(n, jnp.int32)))


def filtered_probs(logits, top_k=None, top_p=1.0):  # softmax of filter_logits, as float64
    filtered = jax.jit(sampling.filter_logits)(jnp.asarray(logits, jnp.float32), top_k or len(logits), top_p)
    return np.asarray(jax.nn.softmax(filtered), np.float64)


def numpy_adjusted(logits, counts, in_prompt, repetition_penalty=1.0, presence_penalty=0.0, frequency_penalty=0.0,
                   logit_bias=None):  # float64, from the definitions: HF's repetition penalty, OpenAI's other two
    out = np.array(logits, np.float64)
    for j in range(len(out)):
        if in_prompt[j] or counts[j] > 0:  # HF: every token of the input so far, prompt included
            out[j] = out[j] / repetition_penalty if out[j] > 0 else out[j] * repetition_penalty
        out[j] -= counts[j] * frequency_penalty + (counts[j] > 0) * presence_penalty  # OpenAI: generated tokens
    for token, bias in (logit_bias or {}).items():
        out[token] += bias
    return out


PENALTIES = {"repetition_penalty": 1.3, "presence_penalty": 0.4, "frequency_penalty": -0.7,
             "logit_bias": {3: -100.0, 7: 2.5, 0: 0.25}}


def test_penalties_and_logit_bias_change_the_logits_as_defined():
    rng = np.random.default_rng(0)
    n_rows, n_vocab = 3, 50
    logits = rng.normal(0, 3, (n_rows, n_vocab)).astype(np.float32)
    logits[:, 5] = 0.0  # a zero logit stays zero under the repetition penalty
    counts = (rng.integers(1, 4, (n_rows, n_vocab)) * (rng.random((n_rows, n_vocab)) < 0.3)).astype(np.int32)
    in_prompt = rng.random((n_rows, n_vocab)) < 0.2
    state = {"counts": counts, "in_prompt": in_prompt}
    adjust = jax.jit(sampling.adjusted_logits)
    for options in [PENALTIES] + [{name: value} for name, value in PENALTIES.items()]:  # together and each alone
        controls = sampling.request_controls({"n_vocab": n_vocab}, n_rows, **options)
        got = np.asarray(adjust(logits, controls, state))
        for row in range(n_rows):
            want = numpy_adjusted(logits[row], counts[row], in_prompt[row], **options)
            np.testing.assert_allclose(got[row], want, atol=1e-5, err_msg=str(options))


def test_penalties_come_before_the_temperature():
    # OpenAI and HF adjust the model's logits, then divide by the temperature: draws from softmax((l - penalty) / T)
    logits = np.array([1.0, 0.5, 0.0, -0.5], np.float32)
    n, temperature = 20000, 2.0
    controls = sampling.request_controls({"n_vocab": 4}, n, temperature=temperature, presence_penalty=1.5, seed=4)
    state = {"counts": np.tile(np.array([2, 0, 0, 1], np.int32), (n, 1)), "in_prompt": np.zeros((n, 4), bool),
             "done": np.zeros(n, bool), "step": np.zeros(n, np.int32)}
    drawn = np.asarray(jax.jit(partial(sampling.sample, greedy=False))(
        state, jnp.tile(logits, (n, 1)), {**controls, "eot_token": np.int32(-1)})["token"])
    want = softmax64((logits - np.array([1.5, 0, 0, 1.5])) / temperature)
    np.testing.assert_allclose(np.bincount(drawn, minlength=4) / n, want, atol=0.015)  # ~4 sd of a frequency


@pytest.mark.slow
def test_penalised_decoding_follows_the_float64_model(tiny_tf):
    # rows of different lengths decoded greedily with the penalties and logit_bias: each token is the most likely one
    # of the float64 model's logits after the prompt and the tokens before it, adjusted by numpy_adjusted
    hparams, params = tiny_tf
    prompts = [PROMPTS[0]["ids"], PROMPTS[1]["ids"][:5]]
    options = {**PENALTIES, "logit_bias": {PROMPTS[0]["greedy_new_ids"][0]: -100.0, 11: 1.5}}
    out = sampling.generate(params, hparams, prompts, 30, greedy=True, **options)
    assert out != sampling.generate(params, hparams, prompts, 30, greedy=True)  # the controls change the tokens
    flat = reference_params()
    for prompt, new in zip(prompts, out):
        logits = numpy_gpt2(flat, np.array(prompt + new[:-1]), hparams["n_head"])[len(prompt) - 1:]
        in_prompt = np.isin(np.arange(hparams["n_vocab"]), prompt)
        for i, token in enumerate(new):
            counts = np.bincount(new[:i], minlength=hparams["n_vocab"])
            adjusted = numpy_adjusted(logits[i], counts, in_prompt, **options)
            assert adjusted[token] >= adjusted.max() - 1e-4, (i, token, adjusted.argmax())


def test_logit_bias_bans_and_forces_tokens(tiny_tf):
    hparams, params = tiny_tf
    prompt = PROMPTS[0]
    banned = set(prompt["greedy_new_ids"])
    out = sampling.generate(params, hparams, [prompt["ids"]], 20, greedy=True,
                            logit_bias={t: -100.0 for t in banned})[0]
    assert not banned & set(out)
    for options in ({"greedy": True}, {"temperature": 1.5, "seed": 2}):
        assert sampling.generate(params, hparams, [prompt["ids"]], 12, logit_bias={198: 100.0}, **options) == \
            [[198] * 12]


def test_text_stream_cuts_at_the_earliest_stop_string_and_ends_the_row():
    # ids are characters here; chunks of 3 behave as generate_stream does: an ended row yields nothing more
    texts = ["hello world. Bye\n\nmore text", "say xy then xyz!", "ends on a partial x"]
    stops = [["\n\n", "world"], ["xyz"], ["xyz", "rtial q"]]
    sent = []

    def chunks():
        ended = set()
        for start in range(0, max(map(len, texts)), 3):
            got = yield [[] if row in ended else [ord(c) for c in text[start:start + 3]]
                         for row, text in enumerate(texts)]
            sent.append((start, got))
            ended |= set(got or ())

    decode = lambda ids: "".join(map(chr, ids))
    pieces = list(sampling.text_stream(chunks(), decode, stops))
    joined = ["".join(p[row] for p in pieces) for row in range(3)]
    assert joined == ["hello ", "say xy then ", "ends on a partial x"]
    assert pieces[2][0] == "" and pieces[1][1] == " "  # "wor" and "xy" held back: they could begin a stop string
    assert [(start, got) for start, got in sent if got] == [(9, [0]), (12, [1])]  # ended as soon as seen


def test_greedy_matches_reference(tiny):
    hparams, params = tiny
    for prompt in PROMPTS:
        out = sampling.generate(params, hparams, [prompt["ids"]], 20, greedy=True)
        assert out == [prompt["greedy_new_ids"]]


def test_batched_greedy_matches_separate_runs(tiny):
    hparams, params = tiny
    pair = [PROMPTS[i]["ids"] for i in EXPECTED["batch"]["prompt_indices"]]
    assert sampling.generate(params, hparams, pair, 20, greedy=True) == EXPECTED["batch"]["greedy_new_ids"]
    # three lengths (10, 6, 40 tokens): the short rows are padded to the long one's bucket and still match
    out = sampling.generate(params, hparams, [p["ids"] for p in PROMPTS], 20, greedy=True)
    assert out == [p["greedy_new_ids"] for p in PROMPTS]


def test_unstacked_params_give_the_same_tokens(tiny_tf):
    hparams, params = tiny_tf
    layers = gpt.unstack_layers(params)
    assert len(layers["h"]) == hparams["n_layer"]
    stacked, layer_1 = params["h"]["mlp"]["c_fc"]["w"], layers["h"][1]["mlp"]["c_fc"]["w"]
    np.testing.assert_array_equal(layer_1, stacked[1])
    if jax.default_backend() == "cpu":  # views into the stacked weights, not copies: generation needs no more memory
        assert layer_1.unsafe_buffer_pointer() == stacked.unsafe_buffer_pointer() + layer_1.nbytes
    prompt = PROMPTS[0]
    assert sampling.generate(layers, hparams, [prompt["ids"]], 20, greedy=True) == [prompt["greedy_new_ids"]]


def test_top_k_draws_only_the_k_most_likely():
    logits = np.random.default_rng(0).normal(0, 2, 1000)
    top5 = set(np.argsort(-logits)[:5])
    drawn = draws(logits, 4000, seed=1, top_k=5)
    assert set(drawn) == top5  # never outside, and every one of the five is drawn
    # and in proportion to their renormalised probabilities (4000 draws: a standard error of <= 0.008)
    p = softmax64(logits[sorted(top5)])
    freq = np.array([np.mean(drawn == t) for t in sorted(top5)])
    np.testing.assert_allclose(freq, p, atol=0.04)


def test_top_p_keeps_the_smallest_set_reaching_p():
    rng = np.random.default_rng(1)
    handmade = np.log(np.array([0.04, 0.4, 0.1, 0.25, 0.06, 0.15]))  # sorted: .4 .25 .15 .1 .06 .04
    cases = [(handmade, 0.5, {1, 3}), (handmade, 0.7, {1, 3, 5}), (handmade, 0.01, {1}),
             (handmade, 0.93, {1, 3, 5, 2, 4}), (handmade, 1.0, set(range(6)))]
    halves = np.log(np.array([0.5, 0.25, 0.125, 0.0625, 0.0625]))  # float32 sums them exactly: a mass that reaches p
    cases += [(halves, 0.5, {0}), (halves, 0.75, {0, 1}), (halves, 0.875, {0, 1, 2})]  # exactly stops there
    random_logits = rng.normal(0, 3, 500)
    for p in (0.3, 0.8, 0.95):  # numpy reference: the most likely tokens until their float64 mass reaches p
        probs = softmax64(random_logits)
        order = np.argsort(-probs)
        n = int(np.searchsorted(np.cumsum(probs[order]), p)) + 1
        cases.append((random_logits, p, set(order[:n])))
    for logits, p, kept in cases:
        probs = softmax64(logits)
        want = np.where(np.isin(np.arange(len(logits)), list(kept)), probs, 0)
        np.testing.assert_allclose(filtered_probs(logits, top_p=p), want / want.sum(), atol=1e-6)
    drawn = draws(handmade, 2000, seed=2, top_p=0.7)
    assert set(drawn) == {1, 3, 5}


def test_top_k_then_top_p():
    logits = np.log(np.array([0.3, 0.05, 0.25, 0.2, 0.15, 0.05]))
    # top_k 3 keeps .3 .25 .2 (renormalised: .4, .333, .267); top_p .6 then keeps the first two (mass .733)
    np.testing.assert_allclose(filtered_probs(logits, top_k=3, top_p=0.6), [0.3 / 0.55, 0, 0.25 / 0.55, 0, 0, 0],
                               atol=1e-6)
    # top_k alone
    np.testing.assert_allclose(filtered_probs(logits, top_k=2), [0.3 / 0.55, 0, 0.25 / 0.55, 0, 0, 0], atol=1e-6)


def test_temperature_comes_before_top_k_and_top_p():
    # the documented order: logits / temperature, then top-k, then top-p on the tempered distribution. At temperature
    # 0.5, softmax(log([.5, .3, .2]) / 0.5) = [.658, .237, .105]: top_p .6 keeps token 0 alone; filtering first (on
    # [.5, .3, .2]) would keep tokens 0 and 1 and draw token 1 about a quarter of the time
    logits = np.log([0.5, 0.3, 0.2])
    assert set(draws(logits, 2000, seed=4, top_p=0.6, temperature=0.5)) == {0}
    # at temperature 2 the kept top-2 are drawn in proportion to exp(logit / 2): [.5, .3] ** 0.5, renormalised
    drawn = draws(logits, 4000, seed=5, top_k=2, temperature=2.0)
    want = np.sqrt([0.5, 0.3]) / np.sqrt([0.5, 0.3]).sum()  # .563, .437; 4000 draws: standard error .008
    assert set(drawn) == {0, 1}
    np.testing.assert_allclose([np.mean(drawn == 0), np.mean(drawn == 1)], want, atol=0.04)


def test_generate_batches_leave_room_for_both_halves_of_the_kv_cache():
    # a shape where the KV cache is nearly all of a row's memory: rows_that_fit's rows must fit BATCH_BYTES with K and
    # V both counted (2 x n_layer x cache_len x n_embd x itemsize a row, from the cache's definition)
    hparams = {"n_vocab": 8, "n_ctx": 1024, "n_embd": 1024, "n_head": 16, "n_layer": 12}
    rows = sampling.rows_that_fit(hparams, 16, 1024, 4)
    kv_per_row = 2 * hparams["n_layer"] * 1024 * hparams["n_embd"] * 4  # ~100 MB: about 20 rows in 2 GiB
    assert rows * kv_per_row <= sampling.BATCH_BYTES
    assert (rows + 1) * kv_per_row > sampling.BATCH_BYTES * 0.9  # and not far below it: the estimate is not padded


def test_generate_batches_fit_the_memory_the_compiled_programs_use():
    # XLA's plan for the compiled prefill and decode of rows_that_fit's rows (their temporaries and results: the KV
    # caches, the prompt's attention against the whole cache) stays within BATCH_BYTES; a short prompt before a long
    # cache is where scores of [n_head, prompt_len, cache_len] a row are easy to under-count
    hparams = {"n_vocab": 512, "n_ctx": 1024, "n_embd": 256, "n_head": 4, "n_layer": 2}
    params = gpt.unstack_layers(gpt_init(jax.random.PRNGKey(0), hparams))
    prompt_len, cache_len = 64, 1024
    rows = sampling.rows_that_fit(hparams, prompt_len, cache_len, 4)
    controls = sampling.request_controls(hparams, rows, top_k=512)
    args = (params, jax.ShapeDtypeStruct((rows, prompt_len), jnp.int32), jax.ShapeDtypeStruct((rows,), jnp.int32),
            controls)
    static = {"n_head": 4, "greedy": False}
    prefill = sampling.prefill.lower(*args, cache_len=cache_len, **static).compile().memory_analysis()
    state = jax.eval_shape(partial(sampling.prefill, cache_len=cache_len, **static), *args)
    decode = sampling.decode.lower(params, state, np.int32(16), controls, chunk=16,
                                   **static).compile().memory_analysis()
    for plan in (prefill, decode):
        assert plan.temp_size_in_bytes + plan.output_size_in_bytes <= sampling.BATCH_BYTES, (rows, plan)
    used = prefill.temp_size_in_bytes + prefill.output_size_in_bytes
    assert used > 0.6 * sampling.BATCH_BYTES, used  # and the estimate is not so padded that most is left unused


def test_top_k_1_and_low_temperature_are_greedy(tiny_tf):
    hparams, params = tiny_tf
    prompt = PROMPTS[0]
    # the smallest top-1/top-2 logit gap on the way is 0.01: at temperature 1e-4 a gap of 100, beyond any noise draw
    assert sampling.generate(params, hparams, [prompt["ids"]], 20, temperature=1e-4, seed=3) == \
        [prompt["greedy_new_ids"]]
    assert sampling.generate(params, hparams, [prompt["ids"]], 20, top_k=1, seed=4) == [prompt["greedy_new_ids"]]


@pytest.mark.slow
def test_seed_reproducible_and_rows_independent_of_batch(tiny_tf):
    hparams, params = tiny_tf
    p1, p2 = PROMPTS[0]["ids"], PROMPTS[1]["ids"]
    a = sampling.generate(params, hparams, [p1, p2], 20, seed=5, top_p=0.9)
    assert a == sampling.generate(params, hparams, [p1, p2], 20, seed=5, top_p=0.9)
    assert a != sampling.generate(params, hparams, [p1, p2], 20, seed=6, top_p=0.9)
    assert a[0] != a[1] and all(len(row) == 20 for row in a)
    # a row's random numbers depend on (seed, row, token index) only: row 0 alone draws what it draws in a batch
    assert sampling.generate(params, hparams, [p1], 20, seed=5, top_p=0.9) == [a[0]]
    # num_samples: the same prompt twice gives two different samples
    twice = sampling.generate(params, hparams, [p1, p1], 20, seed=5, top_p=0.9)
    assert twice[0] == a[0] and twice[1] != twice[0]


def test_eot_token_ends_each_row(tiny_tf):
    hparams, params = tiny_tf
    prompts = [PROMPTS[0]["ids"], PROMPTS[1]["ids"]]
    eot = 18903  # "Photograph": greedy emits it at step 3 for prompt 1 and step 13 for prompt 2
    want = [g[:g.index(eot)] for g in (PROMPTS[0]["greedy_new_ids"], PROMPTS[1]["greedy_new_ids"])]
    assert [len(w) for w in want] == [3, 13]
    assert sampling.generate(params, hparams, prompts, 20, greedy=True, eot_token=eot) == want
    # once every row has ended, no more chunks are computed: 20 tokens take 3 chunks (1 + 16 + 3), the 2nd ends both
    chunks = list(sampling.generate_stream(params, hparams, prompts, 20, greedy=True, eot_token=eot))
    assert chunks == [[want[0][:1], want[1][:1]], [want[0][1:], want[1][1:]]]


def test_stream_chunks_join_into_generate(tiny_tf):
    hparams, params = tiny_tf
    prompts = [PROMPTS[0]["ids"], PROMPTS[1]["ids"]]
    chunks = list(sampling.generate_stream(params, hparams, prompts, 20, top_k=50, seed=7))
    assert [[len(row) for row in chunk] for chunk in chunks] == [[1, 1], [16, 16], [3, 3]]
    joined = [sum((chunk[row] for chunk in chunks), []) for row in range(2)]
    assert joined == sampling.generate(params, hparams, prompts, 20, top_k=50, seed=7)


def test_no_recompilation_within_a_bucket(tiny_tf):
    hparams, params = tiny_tf
    sizes = lambda: np.array([sampling.prefill._cache_size(), sampling.decode._cache_size()])
    before = sizes()
    # at most one compile of each (none if another test compiled this case already), though the 20 tokens are
    # decoded in two chunks of different lengths (16 and 3)
    sampling.generate(params, hparams, [PROMPTS[0]["ids"]] * 2, 20, top_k=3)
    after_first = sizes()
    assert set(after_first - before) <= {0, 1}
    # other prompt lengths, token counts and sampling settings in the same buckets (prompt <= 16, prompt + new
    # <= 32) reuse them
    for prompt, n, options in (([5] * 16, 16, {"top_p": 0.5}), ([7, 8], 15, {}), ([9] * 11, 21, {"eot_token": 3})):
        sampling.generate(params, hparams, [prompt, prompt[:1]], n, seed=n, temperature=0.5, **options)
    assert (sizes() == after_first).all()


def test_bfloat16_params_generate(tiny_tf):
    # the fixture's greedy continuations hold in bfloat16 too (its smallest top-1/top-2 gap is wide enough)
    hparams, params = tiny_tf
    out = sampling.generate(jax.tree.map(lambda p: p.astype(jnp.bfloat16), params), hparams,
                            [p["ids"] for p in PROMPTS], 20, greedy=True)
    assert out == [p["greedy_new_ids"] for p in PROMPTS]


def test_same_seed_same_tokens_whatever_the_chunking(tiny_tf, monkeypatch):
    hparams, params = tiny_tf
    prompts = [PROMPTS[0]["ids"][:20], PROMPTS[2]["ids"][:12]]  # + 30 tokens: within n_ctx=64
    want = sampling.generate(params, hparams, prompts, 30, seed=11, temperature=0.8)
    monkeypatch.setattr(sampling, "CHUNK", 5)  # 30 tokens as 1 + 5 * 5 + 4 rather than 1 + 16 + 13
    assert sampling.generate(params, hparams, prompts, 30, seed=11, temperature=0.8) == want


@pytest.mark.slow
def test_many_rows_run_in_batches_that_give_one_batchs_tokens(tiny_tf):
    # num_samples 10,000 once ran as one batch (8.7 GB on the tiny model); now as batches that fit, each row with
    # the random stream and padded shapes it has in the whole request
    hparams, params = tiny_tf
    prompts = [PROMPTS[i % 3]["ids"][:4 + i] for i in range(7)]
    for options in ({"seed": 3, "top_k": 40}, {"greedy": True}):
        whole = sampling.generate(params, hparams, prompts, 12, **options)
        assert sampling.generate(params, hparams, prompts, 12, max_rows=3, **options) == whole
    assert sampling.rows_that_fit({"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12},
                                  1024, 1024, 4) < 64  # 124M at a full context: ~75 MB of KV cache a row
    assert sampling.rows_that_fit(hparams, 16, 32, 4) > 100


def test_decoding_logits_match_the_model_row_by_row(tiny_tf):
    # what prefill and decode run (per-layer weights, per-row positions, right-padded rows of different lengths, the
    # CPU's few-row LM head) against the float64 model on each row alone: logits, not only greedy tokens (a LayerNorm
    # eps or GELU variant moves logits by ~1e-3 and can leave greedy tokens alone)
    hparams, params = tiny_tf
    layers, n_head, reference = gpt.unstack_layers(params), hparams["n_head"], reference_params()
    prompts = [PROMPTS[0]["ids"][:9], PROMPTS[1]["ids"][:4], PROMPTS[2]["ids"][:6]]
    lengths, n_steps = np.array([len(p) for p in prompts]), 5
    ids = np.zeros((3, 16), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = prompt
    caches = gpt.empty_caches(layers, 3, n_head, 32)
    forward = jax.jit(gpt.transformer, static_argnums=2)
    x, caches = forward(layers, jnp.asarray(ids), n_head, caches, 0)
    logits = sampling.unembed_rows(layers, x[jnp.arange(3), lengths - 1])
    # as sampling.decode: each row at its own position, all rows writing into one slot (the longest prompt's length,
    # then on), each row's past its prompt and the slots written since
    past, slot = np.arange(32) < lengths[:, None], int(lengths.max())
    rows = [list(p) for p in prompts]
    for step in range(n_steps + 1):
        for row in range(3):
            expect = numpy_gpt2(reference, np.array(rows[row]), n_head)[-1]
            np.testing.assert_allclose(np.asarray(logits[row]), expect, atol=1e-5, err_msg=f"step {step} row {row}")
        if step == n_steps:
            break
        tokens = np.asarray(jnp.argmax(logits, -1), np.int32)
        for row in range(3):
            rows[row].append(int(tokens[row]))
        x, caches = forward(layers, jnp.asarray(tokens[:, None]), n_head, caches, jnp.asarray(lengths + step),
                            jnp.asarray(past), slot)
        past[:, slot], slot = True, slot + 1
        logits = sampling.unembed_rows(layers, x[:, 0])


def test_long_decoding_of_rows_of_different_lengths_follows_the_model(tiny_tf):
    # prompts of 10 and 6 tokens and 50 new ones (4 chunks, the shared write slot far past the shorter prompt): every
    # token must be the float64 model's most likely one after the prompt and the tokens before it
    hparams, params = tiny_tf
    prompts = [PROMPTS[0]["ids"], PROMPTS[1]["ids"]]
    flat = reference_params()
    for prompt, new in zip(prompts, sampling.generate(params, hparams, prompts, 50, greedy=True)):
        logits = numpy_gpt2(flat, np.array(prompt + new[:-1]), hparams["n_head"])[len(prompt) - 1:]
        chosen = logits[np.arange(len(new)), new]
        assert np.all(chosen >= logits.max(-1) - 1e-4), np.flatnonzero(chosen < logits.max(-1) - 1e-4)


@pytest.mark.slow
def test_a_bfloat16_kv_cache_holds_half_the_bytes_and_decodes_as_the_model(tiny_tf, monkeypatch, main_inprocess,
                                                                           capsys):
    # kv_dtype="bfloat16": the keys and values are kept in bfloat16 (half the memory, so a batch holds more rows) and
    # read back into float32; the log probabilities of 30 decoding steps after prompts of different lengths stay
    # within bfloat16's rounding (2^-9 of the values) of the float64 model's, as a float32 cache's stay within 1e-5
    hparams, params = tiny_tf
    layers, flat, n_steps = gpt.unstack_layers(params), reference_params(), 30
    prompts = [PROMPTS[0]["ids"], PROMPTS[1]["ids"][:5]]
    ids = np.zeros((2, 16), np.int32)
    for row, prompt in enumerate(prompts):
        ids[row, :len(prompt)] = prompt
    controls = sampling.request_controls(hparams, 2, greedy=True)
    for kv_dtype, dtype, atol in ((None, np.float32, 1e-5), ("bfloat16", jnp.bfloat16, 5e-3)):
        state = sampling.prefill(layers, ids, np.array([len(p) for p in prompts], np.int32), controls,
                                 n_head=hparams["n_head"], cache_len=64, greedy=True, kv_dtype=kv_dtype)
        assert {c[name].dtype for c in state["caches"] for name in "kv"} == {np.dtype(dtype)}
        first = np.asarray(state["token"])
        state = {**state, "logprob": jnp.zeros(2), "top_logprobs": jnp.zeros((2, 5)),
                 "top_ids": jnp.zeros((2, 5), jnp.int32)}
        out, _ = sampling.decode(layers, state, np.int32(n_steps), controls, n_head=hparams["n_head"], chunk=32,
                                 greedy=True, n_logprobs=5)
        for row, prompt in enumerate(prompts):
            text = list(prompt) + [int(first[row])] + np.asarray(out["token"][row, :n_steps]).tolist()
            logits = numpy_gpt2(flat, np.array(text[:-1]), hparams["n_head"])[len(prompt):]
            logp = logits - logits.max(-1, keepdims=True)
            logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
            np.testing.assert_allclose(np.asarray(out["top_logprobs"][row, :n_steps]), -np.sort(-logp, -1)[:, :5],
                                       atol=atol, err_msg=str(kv_dtype))
    # generate, batch_streams and main.py --kv_cache pass it on; a batch's rows are counted with its bytes
    asked, prefill = [], sampling.prefill

    def recording_prefill(*args, kv_dtype=None, **kwargs):
        asked.append(kv_dtype)
        return prefill(*args, kv_dtype=kv_dtype, **kwargs)
    monkeypatch.setattr(sampling, "prefill", recording_prefill)
    assert sampling.generate(params, hparams, prompts, 3, greedy=True, kv_dtype="bfloat16")
    assert main_inprocess("--model_dir", TINY["tf"], "--prompt", "Hello", "--greedy", "--n_tokens_to_generate", 2,
                          "--kv_cache", "bfloat16") == 0
    assert asked == ["bfloat16", "bfloat16"], asked
    sizes, rows_that_fit = [], sampling.rows_that_fit
    monkeypatch.setattr(sampling, "rows_that_fit", lambda *args: sizes.append(args[-1]) or rows_that_fit(*args))
    for kv_dtype in (None, "bfloat16"):
        next(sampling.batch_streams(params, hparams, prompts, 3, kv_dtype=kv_dtype))
    assert sizes == [4, 2], sizes  # the bytes of a cached value


def test_cache_lengths_between_the_buckets_decode_as_the_model(tiny_tf, monkeypatch):
    # cache lengths step by CACHE_STEP (8 here), finer than the prompt's power-of-two bucket: a prompt of 20 tokens
    # (bucket 32) and 3 new ones (cache_length 24) still get a cache that holds the padded prompt; 30 + 15 tokens a
    # cache of 48. Greedy tokens as the float64 model's.
    hparams, params = tiny_tf
    monkeypatch.setattr(sampling, "CACHE_STEP", 8)
    flat = reference_params()
    for prompts, n_new, cache_len in (([PROMPTS[2]["ids"][:20], PROMPTS[1]["ids"]], 3, 32),
                                      ([PROMPTS[2]["ids"][:30]], 15, 48)):
        assert sampling.padded_lengths(hparams, prompts, n_new)[1] == cache_len
        for prompt, new in zip(prompts, sampling.generate(params, hparams, prompts, n_new, greedy=True)):
            logits = numpy_gpt2(flat, np.array(prompt + new[:-1]), hparams["n_head"])[len(prompt) - 1:]
            chosen = logits[np.arange(len(new)), new]
            assert np.all(chosen >= logits.max(-1) - 1e-4)


def test_bad_requests_raise_one_line_errors(tiny_tf):
    hparams, params = tiny_tf
    ids = PROMPTS[0]["ids"]  # 10 tokens
    cases = [([], {}, "no prompts"), ([ids, []], {}, "prompt 2 is empty"),
             ([ids], {"n_tokens": 55}, "10 tokens plus 55 new tokens is 65, more than the model's context of n_ctx=64"),
             ([ids], {"n_tokens": 0}, "at least 1"), ([[50257]], {}, "token id 50257"),
             ([ids], {"top_k": 0}, "top_k"), ([ids], {"top_p": 0.0}, "top_p"), ([ids], {"top_p": 1.5}, "top_p"),
             ([ids], {"temperature": 0.0}, "temperature"), ([ids], {"temperature": -1.0}, "temperature"),
             ([ids], {"temperature": 1e-38}, "temperature must be at least 1e-06"),
             ([ids], {"repetition_penalty": -1.0}, "repetition_penalty"),
             ([ids], {"presence_penalty": float("nan")}, "presence_penalty"),
             ([ids], {"frequency_penalty": -2.5}, "frequency_penalty"),
             ([ids], {"logit_bias": {-1: 1.0}}, "token id -1 in logit_bias"),
             ([ids], {"logit_bias": {5: float("inf")}}, "logit_bias of token 5")]
    for prompts, options, message in cases:
        n_tokens = options.pop("n_tokens", 5)
        with pytest.raises(ValueError, match=message) as e:
            sampling.generate(params, hparams, prompts, n_tokens, **options)
        assert "\n" not in str(e.value)
    assert len(sampling.generate(params, hparams, [ids], 54, greedy=True, temperature=0.0)[0]) == 54  # 64 in all


# ==================== quant ===========================================================================================
# int8 weights: the format against its definition, the kernel against float64 and the pure-JAX path, the model's
# quality against float32, and int8 models on disk, in main.py and in train.py's evaluation

def int8_test_params(n_embd=64, n_layer=2, n_vocab=50257, seed=0):
    # a GPT-2 of the fixture's statistics (testdata/README.md) with rows the kernel serves (multiples of 32)
    rng = np.random.default_rng(seed)
    hparams = {"n_vocab": n_vocab, "n_ctx": 64, "n_embd": n_embd, "n_head": 2, "n_layer": n_layer}
    shapes = weights.param_shapes(hparams)
    std = lambda name: 0.2 if name == "wte" else 0.1 if name == "wpe" else 0.02 if name.endswith("/b") else 0.14
    draw = lambda name, shape: (1 if name.endswith("/g") else 0) + std(name) * rng.standard_normal(shape)
    flat = {name: draw(name, shape).astype(np.float32) for name, shape in shapes.items()}
    return hparams, weights.unflatten(flat)


def test_quantize_follows_its_definition():
    rng = np.random.default_rng(1)
    w = rng.standard_normal((2, 37, 96)).astype(np.float32)  # 37 rows: the last tile of 16 is padded
    w[0, 3, 32:64] = 0  # an all-zero block
    q = quant.quantize(w)
    assert q["int8"].shape == (2, 3, 48, 16, 2) and q["scale"].shape == (2, 3, 37)
    blocks = w.astype(np.float64).reshape(2, 37, 3, 32)
    scale = np.abs(blocks).max(-1) / 127  # [2, 37, 3]: the definition, in float64
    values = np.rint(np.divide(blocks, scale[..., None], out=np.zeros_like(blocks), where=scale[..., None] > 0))
    np.testing.assert_allclose(q["scale"], scale.swapaxes(-1, -2), rtol=1e-6)
    packed = q["int8"]
    for o, i in [(0, 0), (5, 33), (16, 95), (36, 64), (21, 1)]:  # W[o, i] sits at tile o // 16, pair i // 2
        assert packed[1, o // 16, i // 2, o % 16, i % 2] == values.reshape(2, 37, 96)[1, o, i]
    assert np.all(packed[:, 2, :, 5:] == 0)  # the padding rows
    assert np.abs(values).max() == 127 and np.all(values[0, 3, 1] == 0) and scale[0, 3, 1] == 0
    dequantized = np.asarray(quant.dequantize(jax.tree.map(jnp.asarray, q)), np.float64)
    np.testing.assert_allclose(dequantized, (values * scale[..., None]).reshape(w.shape), rtol=1e-6, atol=1e-7)
    assert np.all(np.abs(dequantized - w) <= np.repeat(scale, 32, axis=-1) / 2 + 1e-6)  # within half a step
    rows = np.asarray(quant.embed(jax.tree.map(jnp.asarray, quant.quantize(w[0])), jnp.array([[36, 0], [17, 3]])))
    np.testing.assert_allclose(rows, dequantized[0][[[36, 0], [17, 3]]], rtol=1e-6)


def test_int8_kernel_is_built_and_matches_float64():
    # the kernel (a CPU's decoding path) and the pure-JAX reference, against the product in float64 of the
    # dequantized matrix: rows of x in all numbers, rows of W not a multiple of the 16 of a tile, leading axes
    assert quant.kernel_loaded(), "the int8 kernel is not built: pip install -e . with a C++ compiler builds it"
    rng = np.random.default_rng(2)
    for m, n_out, n_in in [(1, 1, 32), (1, 37, 64), (3, 16, 96), (8, 100, 32), (9, 50, 64), (32, 33, 128)]:
        w = quant.quantize(rng.standard_normal((n_out, n_in)).astype(np.float32))
        x = rng.standard_normal((m, n_in)).astype(np.float32)
        x[0, :32] *= 1000  # a block of outliers: x's int16 scales are per block of 32
        exact = x.astype(np.float64) @ np.asarray(quant.dequantize(jax.tree.map(jnp.asarray, w)), np.float64).T
        bound = np.abs(x).astype(np.float64) @ np.abs(np.asarray(quant.dequantize(jax.tree.map(jnp.asarray, w)))).T
        kernel = np.asarray(jax.jit(quant.matmul)(jnp.asarray(x), w))
        reference = np.asarray(jax.jit(quant.reference_matmul)(jnp.asarray(x), w))
        assert np.all(np.abs(kernel - exact) <= 1e-4 * bound + 1e-6), (m, n_out, n_in)  # x's rounding to int16
        assert np.all(np.abs(reference - exact) <= 1e-5 * bound + 1e-6), (m, n_out, n_in)
    w = jax.tree.map(jnp.asarray, quant.quantize(rng.standard_normal((40, 64)).astype(np.float32)))
    x = jnp.asarray(rng.standard_normal((2, 3, 64)).astype(np.float32))
    lone = np.asarray(jax.jit(quant.matmul)(x, w))
    np.testing.assert_array_equal(np.asarray(jax.jit(jax.vmap(quant.matmul, in_axes=(0, None)))(x, w)), lone)
    reference = np.asarray(quant.reference_matmul(x, w))
    np.testing.assert_allclose(lone, reference, atol=1e-4 * np.abs(reference).max())


@pytest.mark.slow
def test_int8_decoding_runs_the_kernel_and_tracks_float32():
    hparams, params = int8_test_params()
    params = jax.tree.map(jnp.asarray, params)
    qparams = jax.tree.map(jnp.asarray, quant.quantize_params(params))
    layers = gpt.unstack_layers(qparams)
    ids = np.array([[PROMPTS[0]["ids"][:16]]], np.int32)[0]
    controls = sampling.request_controls(hparams, 1, greedy=True)
    state = sampling.prefill(layers, ids, np.array([10], np.int32), controls, n_head=2, cache_len=32, greedy=True)
    hlo = sampling.decode.lower(layers, state, np.int32(4), controls, n_head=2, chunk=16, greedy=True).as_text()
    assert hlo.count(quant.KERNEL_TARGET) == 4 * hparams["n_layer"] + 1  # every matrix and the LM head
    # the int8 model against the float64 GPT-2 with the dequantized weights: the kernel's only error is x's rounding
    dequantized = jax.tree.map(lambda w: quant.dequantize(w) if quant.is_quantized(w) else w, qparams,
                               is_leaf=quant.is_quantized)
    flat = {name: np.asarray(w) for name, w in flat_params(dequantized).items()}
    for name in [n for n in flat if n.endswith("/w")]:
        flat[name] = flat[name].swapaxes(-1, -2)  # back to the checkpoint's [n_in, n_out]
    prompts = [p["ids"] for p in PROMPTS]
    out = sampling.generate(layers, hparams, prompts, 12, greedy=True)
    for prompt, new in zip(prompts, out):
        logits = numpy_gpt2(flat, np.array(prompt + new[:-1]), 2)[len(prompt) - 1:]
        assert list(np.argmax(logits, -1)) == new
    float_out = sampling.generate(params, hparams, prompts, 12, greedy=True)
    agree = np.mean([a == b for row, frow in zip(out, float_out) for a, b in zip(row, frow)])
    assert agree >= 0.9  # the quality figure README gives is measured on 124M's shapes (bench.py quality)


@pytest.mark.slow
def test_int8_without_the_kernel_gives_the_same_logits(tmp_path):
    hparams, params = int8_test_params()
    weights.save_params(tmp_path / "model", hparams, params)
    program = ("import json, sys, jax.numpy as jnp, gpt, weights; "
               "hp, p = weights.load_hparams_and_params(sys.argv[1], quantize='int8'); "
               "print(json.dumps(gpt.gpt(p, jnp.array(sys.argv[2:], dtype=jnp.int32), 2)[-1].tolist()))")
    ids = [str(i) for i in PROMPTS[0]["ids"]]
    env = {**os.environ, "GPTJAX_CACHE": str(tmp_path / "cache")}
    runs = {}
    for name, extra in [("kernel", {}), ("pure", {"GPTJAX_NO_KERNEL": "1"})]:
        proc = subprocess.run([sys.executable, "-c", program, str(tmp_path / "model"), *ids], capture_output=True,
                              text=True, cwd=HERE, env={**env, **extra}, timeout=120)
        assert proc.returncode == 0, proc.stderr
        runs[name] = (np.array(json.loads(proc.stdout)), proc.stderr)
    assert "pure JAX" in runs["pure"][1] and runs["pure"][1].count("\n") == 1 and "note" not in runs["kernel"][1]
    np.testing.assert_allclose(runs["kernel"][0], runs["pure"][0], atol=1e-3 * np.abs(runs["pure"][0]).max())


def test_weights_quantize_writes_a_quarter_that_main_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPTJAX_CACHE", str(tmp_path / "cache"))
    hparams, params = int8_test_params()
    weights.save_params(tmp_path / "float", hparams, params)
    assert weights.main(["quantize", str(tmp_path / "float"), str(tmp_path / "int8")]) == 0
    assert "wrote" in capsys.readouterr().out
    size = lambda folder: (folder / "params.safetensors").stat().st_size
    assert size(tmp_path / "int8") < 0.3 * size(tmp_path / "float")
    _, loaded = weights.load_hparams_and_params(tmp_path / "int8")
    expect = quant.quantize_params(params)
    for name, array in flat_params(loaded).items():
        np.testing.assert_array_equal(np.asarray(array), flat_params(expect)[name])
    # main.py: the folder, and --quantize on the float one (quantized once, into gptjax's cache), generate alike
    texts = []
    for args in (["--model_dir", tmp_path / "int8"], ["--model_dir", tmp_path / "float", "--quantize", "int8"],
                 ["--model_dir", tmp_path / "float", "--quantize", "int8"]):
        assert main.main([*map(str, args), "--prompt", PROMPTS[0]["text"], "--greedy"]) == 0
        texts.append(capsys.readouterr().out)
    assert texts[0] == texts[1] == texts[2] and len(texts[0]) > 10
    cached = list((tmp_path / "cache").rglob("params-int8.safetensors"))
    assert len(cached) == 1 and sorted(p.name for p in (tmp_path / "float").iterdir()) == ["params.safetensors"]
    # refused, in one line each, writing nothing
    for argv in (["quantize", tmp_path / "float", tmp_path / "int8"], ["quantize", tmp_path / "int8", tmp_path / "x"],
                 ["to_hf", tmp_path / "int8", tmp_path / "hf"]):
        assert weights.main([str(a) for a in argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "x").exists() and not (tmp_path / "hf").exists()
    assert main.main(["--model_dir", str(tmp_path / "int8"), "--prompt", "a", "--dtype", "bfloat16"]) == 2
    assert "bfloat16 does not go with int8" in capsys.readouterr().err


def test_train_evaluates_int8_and_refuses_to_train_it(train_data_dir, tmp_path):
    out = tmp_path / "out"
    train.train(run_config(train_data_dir, out, max_iters=20, eval_interval=20, dropout=0.0))
    evals = {}
    for quantize in ("", "int8"):
        result = train.train(run_config(train_data_dir, out, init_from="resume", eval_only=True, quantize=quantize,
                                        dropout=0.0))
        evals[quantize] = result["evals"][0]["val_loss"]
    assert evals["int8"] != evals[""] and abs(evals["int8"] - evals[""]) < 0.01 * evals[""]
    with pytest.raises(cli.UsageError, match="int8 weights cannot be trained"):
        train.train(run_config(train_data_dir, tmp_path / "t", quantize="int8"))
    weights.quantize_model(str(out), tmp_path / "out-int8")
    with pytest.raises(cli.UsageError, match="int8 model: int8 weights cannot be trained"):
        train.train(run_config(train_data_dir, tmp_path / "t", init_from=str(tmp_path / "out-int8")))


# ==================== main ============================================================================================
# the command-line generator

def test_text_stream_holds_back_characters_split_between_tokens():
    enc = encoder.get_encoder(TINY["tf"])
    text = " naïve café: 日本語の文章 🎉🦜 done"
    ids = enc.encode(text)
    assert any(enc.decode(ids[:i]).endswith("\ufffd") for i in range(len(ids)))  # some token splits a character
    pieces = [row[0] for row in sampling.text_stream(([[i]] for i in ids), enc.decode, [[]])]
    assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces)




def test_main_prints_the_greedy_continuation(tmp_path):
    prompt = PROMPTS[0]
    code, out, err = run_main_cli(["--model_dir", TINY["tf"], "--greedy", "--n_tokens_to_generate", "20",
                                        "--prompt", prompt["text"]], tmp_path)
    assert (code, out) == (0, prompt["greedy_text"] + "\n"), err
    assert err == ""


def test_main_bfloat16_on_a_cpu_says_it_is_slow_and_generates(tmp_path):
    prompt = PROMPTS[0]  # its 20 greedy tokens hold in bfloat16 too
    code, out, err = run_main_cli(["--model_dir", TINY["tf"], "--greedy", "--n_tokens_to_generate", "20",
                                        "--prompt", prompt["text"], "--dtype", "bfloat16"], tmp_path)
    assert (code, out) == (0, prompt["greedy_text"] + "\n"), err
    assert err.count("\n") == 1 and err.startswith("note: on a CPU bfloat16") and "slower than float32" in err


def test_main_bad_input_exits_2_with_one_line(tmp_path):
    code, out, err = run_main_cli(["--model_dir", TINY["tf"], "--prompt", PROMPTS[0]["text"],
                                        "--n_tokens_to_generate", "60"], tmp_path)
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("error: ") and "10" in err and "60" in err and "64" in err


@pytest.fixture
def main_inprocess(monkeypatch):  # main.main in this process, its compilation cache setting left alone
    monkeypatch.setattr(cli, "enable_compilation_cache", lambda path=None: None)

    def run(*args):
        try:
            return main.main([str(a) for a in args])
        except SystemExit as e:  # argparse's --help and usage errors
            return e.code
    return run


def test_main_errors(main_inprocess, capsys, tmp_path, monkeypatch):
    tiny = TINY["tf"]
    broken = tmp_path / "broken"  # the release layout without its checkpoint index
    broken.mkdir()
    for name in ("hparams.json", "encoder.json", "vocab.bpe", "model.ckpt.data-00000-of-00001"):
        shutil.copy(tiny / name, broken / name)
    monkeypatch.setenv("GPTJAX_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: a refused connection
    monkeypatch.setattr(download, "BACKOFF_S", 0.0)
    # cli.py's exit codes: 2 for a request that cannot be served as asked, 1 for a failure along the way
    cases = [(["--model_dir", tiny, "--prompt", ""], "empty", 2),
             (["--model_dir", tiny], "--prompt", 2),
             (["--model_dir", tiny, "--prompt", "a", "--prompt_file", tmp_path / "p.txt"], "--prompt", 2),
             (["--model_dir", tiny, "--prompt_file", tmp_path / "missing.txt"], "missing.txt", 2),
             (["--model_dir", broken, "--prompt", "a"], "model.ckpt.index", 1),
             (["--model_dir", tmp_path / "nowhere", "--prompt", "a"], "nowhere", 2),
             (["--models_dir", tmp_path / "models", "--prompt", "a"], "127.0.0.1:9", 1),
             (["--model_dir", tiny, "--prompt", "a", "--top_k", "0"], "top_k", 2),
             (["--model_dir", tiny, "--prompt", "a", "--top_p", "2"], "top_p", 2),
             (["--model_dir", tiny, "--prompt", "a", "--temperature", "0"], "temperature", 2),
             (["--model_dir", tiny, "--prompt", "a", "--num_samples", "0"], "num_samples", 2),
             (["--model_dir", tiny, "--prompt", "a", "--num_samples", "2", "--stream"], "--stream", 2),
             (["--model_dir", tiny, "--prompt", "a", "--logit_bias", "50256"], "--logit_bias 50256", 2),
             (["--model_dir", tiny, "--prompt", "a", "--logit_bias", "x=1"], "--logit_bias x=1", 2),
             (["--model_dir", tiny, "--prompt", "a", "--logit_bias", "50257=1"], "token id 50257", 2),
             (["--model_dir", tiny, "--prompt", "a", "--logit_bias", "5=101"], "-100 to 100", 2),
             (["--model_dir", tiny, "--prompt", "a", "--logit_bias", "5=nan"], "-100 to 100", 2),
             (["--model_dir", tiny, "--prompt", "a", "--presence_penalty", "2.5"], "presence_penalty", 2),
             (["--model_dir", tiny, "--prompt", "a", "--frequency_penalty", "nan"], "frequency_penalty", 2),
             (["--model_dir", tiny, "--prompt", "a", "--repetition_penalty", "0"], "repetition_penalty", 2),
             (["--model_dir", tiny, "--prompt", "a", "--repetition_penalty", "inf"], "repetition_penalty", 2),
             (["--model_dir", tiny, "--prompt", "a", "--stop", "ab\\"], "--stop ab\\", 2)]
    for args, words, code in cases:
        assert main_inprocess(*args) == code, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and str(words) in err, (args, err)


def test_mistyped_flags_get_a_did_you_mean(capsys):
    # as train.py's config keys do: argparse's usage error (exit 2) naming the closest flag, a hyphen for an
    # underscore included; a flag close to none gets none
    import serve
    cases = [(main.main, ["--promt", "hi"], "--prompt"), (main.main, ["--prompt", "x", "--top-k", "3"], "--top_k"),
             (serve.main, ["--slot_ctxx", "3"], "--slot_ctx"), (data.main, ["x", "--num-proc", "2"], "--num_proc"),
             (eval_cli.main, ["--tasks", "x", "--limitt", "3"], "--limit"), (main.main, ["--zzzzz"], None)]
    for entry, argv, closest in cases:
        with pytest.raises(SystemExit) as e:
            entry(argv)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "unrecognized arguments" in err, (argv, err)
        assert (f"(did you mean {closest}?)" in err) if closest else "did you mean" not in err, (argv, err)


def test_usage_mistakes_exit_2_everywhere(tmp_path, capsys):
    # a path that is not there, a port out of range: the command line's mistakes, exit 2 and one line, in every tool
    import serve
    cases = [(weights.main, ["to_hf", str(tmp_path / "nowhere"), str(tmp_path / "hf")], "is neither a GPT-2 size"),
             (weights.main, ["quantize", str(tmp_path / "nowhere"), str(tmp_path / "q")], "is neither a GPT-2 size"),
             (data.main, [str(tmp_path / "nowhere")], "no dataset"),
             (serve.main, ["--port", "99999", "--model_dir", str(TINY["tf"])], "--port must be from 0"),
             (eval_cli.main, ["--tasks", "x", "--batch_size", "0"], "--batch_size must be at least 1")]
    for entry, argv, words in cases:
        assert entry(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, (argv, err)
    assert not (tmp_path / "hf").exists() and not (tmp_path / "q").exists()


def test_main_prompt_file_and_interactive(main_inprocess, capsys, tmp_path, monkeypatch):
    p1, p2 = PROMPTS[0], PROMPTS[1]
    (tmp_path / "prompts.txt").write_text(f"{p1['text']}\n\n{p2['text']}\n")
    common = ["--greedy", "--n_tokens_to_generate", "20", "--models_dir", tmp_path / "models"]
    # the HF folder has no tokenizer: GPT-2's, shipped with gptjax
    assert main_inprocess("--model_dir", TINY["hf"], "--prompt_file", tmp_path / "prompts.txt",
                                   *common) == 0
    want = f"--- prompt 1 ---\n{p1['greedy_text']}\n--- prompt 2 ---\n{p2['greedy_text']}\n"
    assert capsys.readouterr().out == want
    too_long = "x " * 70  # 70 tokens: with 20 new ones over n_ctx 64
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{p1['text']}\n\n{too_long}\n{p2['text']}\n"))
    assert main_inprocess("--model_dir", TINY["tf"], "--interactive", "--stream", *common) == 0
    out, err = capsys.readouterr()
    assert out == f"{p1['greedy_text']}\n{p2['greedy_text']}\n"
    ready, error = err.splitlines()
    assert ready == "ready: type a prompt and press Enter (Ctrl-D to end)"
    assert error.startswith("error: a prompt of")  # the long prompt, and it went on


def test_main_seed(main_inprocess, capsys):
    args = ["--model_dir", TINY["tf"], "--prompt", PROMPTS[1]["text"], "--n_tokens_to_generate", "8"]
    assert main_inprocess(*args) == 0  # sampling without --seed: a fresh seed, printed
    out, err = capsys.readouterr()
    seed = int(re.fullmatch(r"seed (\d+) \(give --seed \d+ to repeat this sampling\)\n", err).group(1))
    assert main_inprocess(*args, "--seed", seed) == 0
    again, err = capsys.readouterr()
    assert again == out and err == ""
    assert main_inprocess(*args, "--greedy") == 0  # greedy: deterministic, no seed
    assert capsys.readouterr().err == ""
    for bad in (2**63, -1):
        assert main_inprocess(*args, "--seed", bad) == 2
        err = capsys.readouterr().err
        assert err == f"error: seed must be an integer from 0 to 2**63 - 1, got {bad}\n"
    assert main_inprocess(*args, "--seed", 2**63 - 1) == 0


def test_main_prompt_file_not_utf8_and_help(main_inprocess, capsys, tmp_path):
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    assert main_inprocess("--model_dir", TINY["tf"], "--prompt_file", tmp_path / "latin1.txt") == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"{tmp_path / 'latin1.txt'} is not UTF-8 text" in err
    assert main_inprocess("--help") == 0
    out = capsys.readouterr().out
    for words in ("new tokens per continuation (default: 40)", "--temperature", "(default: 1.0)", "--dtype",
                  "a fresh one is drawn and printed"):
        assert words in " ".join(out.split()), words


def test_main_num_samples(main_inprocess, capsys):
    assert main_inprocess("--model_dir", TINY["tf"], "--prompt", PROMPTS[1]["text"],
                                   "--num_samples", "2", "--top_k", "40", "--n_tokens_to_generate", "20") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0::2] == ["--- sample 1 ---", "--- sample 2 ---"] and out[1] != out[3]


def test_main_stop_strings_end_the_continuation_before_the_earliest(main_inprocess, capsys):
    # the fixture's greedy text, cut before the earliest of two stop strings (the later-listed one comes first), in
    # batch and --stream modes; an escape (\\n) in --stop is the character
    prompt = PROMPTS[0]
    text = prompt["greedy_text"]
    first, second = text[12:16], text[4:8]
    assert text.find(second) < text.find(first) and "\n" not in text
    common = ["--model_dir", TINY["tf"], "--greedy", "--n_tokens_to_generate", "20", "--prompt", prompt["text"]]
    for extra in ([], ["--stream"]):
        assert main_inprocess(*common, "--stop", first, "--stop", second, *extra) == 0
        assert capsys.readouterr().out == text[:text.find(second)] + "\n"
        assert main_inprocess(*common, "--stop", "\\n", "--stop", "no such text", *extra) == 0
        assert capsys.readouterr().out == text + "\n"


def test_main_many_samples_print_as_each_batch_is_done(monkeypatch, capsys):
    # 7 samples in batches of 2: printed batch by batch, the same tokens as one generate() call
    hparams, params = weights.load_hparams_and_params(TINY["tf"])
    prompt = PROMPTS[1]
    want = sampling.generate(params, hparams, [prompt["ids"]] * 7, 6, seed=5)  # one call, all seven rows
    monkeypatch.setattr(sampling, "rows_that_fit", lambda *a: 2)
    batches = []
    batch_streams = sampling.batch_streams

    def watched(*args, **kwargs):
        for rows, stream in batch_streams(*args, **kwargs):
            batches.append((len(rows), capsys.readouterr().out.count("--- sample")))  # printed before the next
            yield rows, stream
    monkeypatch.setattr(sampling, "batch_streams", watched)
    assert main.main(["--model_dir", str(TINY["tf"]), "--prompt", prompt["text"], "--num_samples", "7", "--seed", "5",
                      "--n_tokens_to_generate", "6"]) == 0
    assert [n for n, _ in batches] == [2, 2, 2, 1] and [shown for _, shown in batches] == [0, 2, 2, 2]
    enc = encoder.get_encoder(TINY["tf"])
    assert capsys.readouterr().out.split("--- sample 7 ---\n")[1] == enc.decode(want[6]) + "\n"


def test_main_a_hundred_million_samples_start_printing_at_once(monkeypatch, capsys):
    # --num_samples 10^8: the rows are made batch by batch (no list of 10^8 encoded prompts), the first batches are
    # printed at once; stopped here after two batches of 2 (Ctrl-C: exit 130)
    monkeypatch.setattr(sampling, "rows_that_fit", lambda *a: 2)
    batch_streams = sampling.batch_streams

    def two_batches(*args, **kwargs):
        for i, batch in enumerate(batch_streams(*args, **kwargs)):
            if i == 2:
                raise KeyboardInterrupt
            yield batch
    monkeypatch.setattr(sampling, "batch_streams", two_batches)
    started = time.perf_counter()
    assert main.main(["--model_dir", str(TINY["tf"]), "--prompt", PROMPTS[1]["text"], "--num_samples", str(10**8),
                      "--seed", "5", "--n_tokens_to_generate", "3"]) == 130
    assert time.perf_counter() - started < 60
    out = capsys.readouterr().out
    assert out.count("--- sample") == 4 and "--- sample 4 ---" in out and "--- sample 5 ---" not in out


# ==================== data ============================================================================================
# dataset preparation and batches

def test_train_prepare_char_dataset(train_data_dir):
    text = SHAKESPEARE.read_text(encoding="utf-8")
    folder = data.prepare("shakespeare_char", train_data_dir)
    meta = json.loads((folder / "meta.json").read_text())
    assert meta == {"kind": "char", "chars": sorted(set(text))} and len(meta["chars"]) == 65
    cut = int(len(text) * 0.9)  # nanoGPT's split: 1,003,854 train and 111,540 val characters
    train_ids, val_ids = data.load_split(folder, "train"), data.load_split(folder, "val")
    assert isinstance(train_ids, np.memmap) and train_ids.dtype == np.uint16
    assert (len(train_ids), len(val_ids)) == (1_003_854, 111_540) == (cut, len(text) - cut)
    enc = encoder.get_encoder(folder)
    assert enc.decode(train_ids) == text[:cut] and enc.decode(val_ids) == text[cut:]
    # prepared once: a second call leaves the files alone
    mtime = (folder / "train.bin").stat().st_mtime_ns
    assert data.prepare("shakespeare_char", train_data_dir) == folder
    assert (folder / "train.bin").stat().st_mtime_ns == mtime


def test_train_prepare_gpt2_dataset(train_data_dir):
    # GPT-2 tokens of the same text, split like nanoGPT's data/shakespeare (its readme: 301,966 and 36,059 tokens)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    folder = data.prepare("shakespeare", train_data_dir, vocab_dir=TINY_TF)
    assert json.loads((folder / "meta.json").read_text()) == {"kind": "gpt2"}
    train_ids, val_ids = data.load_split(folder, "train"), data.load_split(folder, "val")
    assert (len(train_ids), len(val_ids)) == (301_966, 36_059)
    enc = encoder.get_encoder(folder)  # the vocabulary travels with the dataset
    assert enc.n_vocab == 50257
    cut = int(len(text) * 0.9)
    assert enc.decode(train_ids) == text[:cut] and enc.decode(val_ids) == text[cut:]


def test_train_prepare_text_file_and_folder(tmp_path):
    docs = tmp_path / "docs"
    docs.mkdir()
    texts = [f"Document number {i}: caf\u00e9 and na\u00efve words.\n" for i in range(10)]
    for i, t in enumerate(texts):
        (docs / f"{i:02d}.txt").write_text(t, encoding="utf-8")
    (docs / ".hidden").write_bytes(b"\xff\xfe not text")  # hidden files are skipped
    folder = data.prepare(str(docs), tmp_path / "data", "gpt2", vocab_dir=TINY_TF)
    assert folder.name == "docs_gpt2"
    ids = np.concatenate([data.load_split(folder, s) for s in data.SPLITS])
    assert (ids == 50256).sum() == 10 and ids[-1] == 50256  # every document ends with <|endoftext|>
    enc = encoder.get_encoder(folder)
    pieces = enc.decode(ids).split("<|endoftext|>")[:-1]
    assert sorted(pieces) == sorted(texts)  # the split moves whole documents
    assert len(data.load_split(folder, "val")) == len(enc.encode(texts[0])) + 1  # 10% of 10 documents: one
    # one text file with character tokens: 90/10 split of its characters
    one = tmp_path / "one.txt"
    one.write_text("".join(texts), encoding="utf-8")
    folder = data.prepare(str(one), tmp_path / "data", "char")
    enc = encoder.get_encoder(folder)
    assert enc.decode(data.load_split(folder, "train")) == "".join(texts)[:int(len("".join(texts)) * 0.9)]
    # a changed text is prepared again
    one.write_text("something else entirely, longer than before", encoding="utf-8")
    os.utime(one, ns=(1, 1))  # a different mtime even on coarse-grained filesystems
    changed = "something else entirely, longer than before"
    folder = data.prepare(str(one), tmp_path / "data", "char")
    enc = encoder.get_encoder(folder)
    assert enc.decode(data.load_split(folder, "val")) == changed[int(len(changed) * 0.9):]


def test_train_prepare_errors(tmp_path):
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match="not UTF-8"):
        data.prepare(str(bad), tmp_path / "data", "char")
    with pytest.raises(cli.UsageError, match="no dataset 'nothing'"):
        data.prepare("nothing", tmp_path / "data")
    with pytest.raises(FileNotFoundError, match="OpenWebText is not downloaded"):
        data.prepare("openwebtext", tmp_path / "data")
    with pytest.raises(ValueError, match="uses char tokens"):
        data.prepare("shakespeare_char", tmp_path / "data", "gpt2")


def test_train_batches_come_from_the_memmap_shifted_by_one(train_data_dir):
    folder = data.prepare("shakespeare_char", train_data_dir)
    ids = data.load_split(folder, "train")
    whole = np.fromfile(folder / "train.bin", dtype=np.uint16)
    starts = data.batch_starts(len(ids), 16, 8, seed=5, it=3, split="train")
    x, y = data.get_batch(ids, starts, 16)
    assert x.shape == y.shape == (8, 16) and x.dtype == np.int32
    for row, s in enumerate(starts):
        assert 0 <= s <= len(ids) - 17
        np.testing.assert_array_equal(x[row], whole[s:s + 16])
        np.testing.assert_array_equal(y[row], whole[s + 1:s + 17])
    # a pure function of (seed, iteration, split)
    np.testing.assert_array_equal(starts, data.batch_starts(len(ids), 16, 8, seed=5, it=3, split="train"))
    assert not np.array_equal(starts, data.batch_starts(len(ids), 16, 8, seed=5, it=4, split="train"))
    assert not np.array_equal(starts, data.batch_starts(len(ids), 16, 8, seed=5, it=3, split="val"))
    with pytest.raises(ValueError, match="too few for block_size"):
        data.batch_starts(10, 16, 8, seed=5, it=0, split="val")
    # every window of block_size + 1 tokens is drawn, the split's last one included, and none past it: a split of 12
    # tokens and block_size 8 has the starts 0..3
    drawn = np.concatenate([data.batch_starts(12, 8, 16, seed=0, it=it, split="train") for it in range(20)])
    assert set(drawn.tolist()) == {0, 1, 2, 3}
    tokens = np.arange(12, dtype=np.uint16)
    x, y = data.get_batch(tokens, np.array([3]), 8)
    assert x[0].tolist() == list(range(3, 11)) and y[0].tolist() == list(range(4, 12))


def test_data_token_files_hold_every_uint16_id_and_refuse_larger_ones():
    buf = io.BytesIO()
    assert data.write_ids(buf, np.array([0, 1, 65534, 65535])) == 4
    assert np.frombuffer(buf.getvalue(), np.uint16).tolist() == [0, 1, 65534, 65535]
    with pytest.raises(ValueError, match="65,536"):
        data.write_ids(io.BytesIO(), np.array([5, 65536]))


def test_data_one_text_is_read_in_pieces_that_keep_tiktokens_tokens(tmp_path, monkeypatch):
    # tiny Shakespeare read 1,000 bytes at a time (a 1 GB text the same way, 8 MB at a time): train.bin and val.bin
    # hold tiktoken's ids of the text's first 90% of characters and of the rest, as if each were encoded whole
    monkeypatch.setattr(data, "PIECE_BYTES", 1000)
    text = SHAKESPEARE.read_text(encoding="utf-8")
    source = tmp_path / "play.txt"
    source.write_text(text + " a\r\nb\rc", encoding="utf-8")  # carriage returns kept as they are
    text = source.read_bytes().decode("utf-8")
    cut = int(len(text) * 0.9)
    enc = tiktoken_gpt2()
    folder = data.prepare(str(source), tmp_path / "data", "gpt2")
    assert np.array_equal(data.load_split(folder, "train"), enc.encode_ordinary(text[:cut]))
    assert np.array_equal(data.load_split(folder, "val"), enc.encode_ordinary(text[cut:]))
    chars = sorted(set(text))
    folder = data.prepare(str(source), tmp_path / "data", "char")
    ids = np.concatenate([data.load_split(folder, split) for split in data.SPLITS])
    assert "".join(chars[i] for i in ids) == text and data.read_meta(folder)["chars"] == chars
    # a run longer than the most a piece may grow to, with no place to cut, is refused in one line
    monkeypatch.setattr(data, "MAX_RUN_BYTES", 5000)
    (tmp_path / "word.txt").write_text("x" * 20_000)
    with pytest.raises(ValueError, match="more than 5,000 characters with no space or line break"):
        data.prepare(str(tmp_path / "word.txt"), tmp_path / "data", "gpt2")


GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""  # tiktoken's, for gpt2


def tiktoken_gpt2():  # tiktoken's GPT-2 encoding from the shipped vocabulary files (no download)
    ranks = tiktoken.load.data_gym_to_mergeable_bpe_ranks(str(encoder.GPT2_VOCAB / "vocab.bpe"),
                                                           str(encoder.GPT2_VOCAB / "encoder.json"))
    return tiktoken.Encoding("gpt2-test", pat_str=GPT2_PATTERN, mergeable_ranks=ranks,
                             special_tokens={encoder.EOT: 50256})


def write_documents(folder, n, words=3000, seed=0):  # n text files of random Shakespeare words -> their texts
    words_ = SHAKESPEARE.read_text(encoding="utf-8").split()
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    texts = []
    for i in range(n):
        texts.append(" ".join(rng.choice(words_) for _ in range(words)))
        (folder / f"{i:04d}.txt").write_text(texts[-1], encoding="utf-8")
    return texts


def test_data_an_edited_source_is_encoded_again(tmp_path):
    # an unfinished preparation's parts are kept only for the very sources they were encoded from: a source edited
    # since then is encoded again (its stale part, planted here, must not reach the dataset)
    texts = write_documents(tmp_path / "docs", 4, words=50)
    folder = data.dataset_folder(str(tmp_path / "docs"), tmp_path / "data", "gpt2")
    sources = data.text_sources(tmp_path / "docs")
    parts = data.part_folder(folder, sources, "gpt2", str(encoder.GPT2_VOCAB), False)
    (parts / "0000000.bin").write_bytes(np.array([1, 2, 3], np.uint16).tobytes())  # as if encoded before the edit
    texts[0] += " and edited"
    pathlib.Path(sources[0]).write_text(texts[0], encoding="utf-8")
    data.prepare(str(tmp_path / "docs"), tmp_path / "data", "gpt2")
    enc, val = tiktoken_gpt2(), data.val_sources(len(texts), data.VAL_FRACTION)
    for split in data.SPLITS:
        want = [i for t, text in enumerate(texts) if (t in val) == (split == "val")
                for i in enc.encode_ordinary(text) + [50256]]
        assert np.array_equal(data.load_split(folder, split), want), split


@pytest.mark.slow
def test_data_a_dead_worker_stops_the_preparation_which_then_goes_on(tmp_path):
    texts = write_documents(tmp_path / "docs", 120, words=20_000)
    command = [sys.executable, str(HERE / "data.py"), str(tmp_path / "docs"), "--tokens=gpt2", "--num_proc=2",
               f"--data_dir={tmp_path / 'data'}"]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    parts = tmp_path / "data" / "docs_gpt2" / "parts"
    deadline = time.monotonic() + 60
    while len(list(parts.glob("*.bin"))) < 3 and time.monotonic() < deadline:  # the workers are at work
        time.sleep(0.05)
    workers = [pid for pid in child_pids(proc.pid) if "spawn_main" in pathlib.Path(f"/proc/{pid}/cmdline").read_text()]
    assert workers, "no worker process found"
    os.kill(workers[0], signal.SIGKILL)  # as the out-of-memory killer would
    out, err = proc.communicate(timeout=60)  # it stops, not hangs
    assert proc.returncode == 1 and err.strip().splitlines()[-1].startswith("error: a process encoding the documents "
                                                                           "died"), err[-2000:]
    assert "memory: 2 ran); run the same command again, with a lower --num_proc" in err
    done = len(list(parts.glob("*.bin")))
    assert 0 < done < len(texts)
    # the same command goes on from the files encoded, and the tokens are tiktoken's, document after document
    proc = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not parts.exists()
    enc = tiktoken_gpt2()
    val = data.val_sources(len(texts), data.VAL_FRACTION)
    for split in data.SPLITS:
        want = [i for t, text in enumerate(texts) if (t in val) == (split == "val")
                for i in enc.encode_ordinary(text) + [50256]]
        assert np.array_equal(data.load_split(tmp_path / "data" / "docs_gpt2", split), want), split


def test_data_workers_are_lean_and_as_many_as_memory_holds(monkeypatch, capsys):
    # the encoding processes import data.py, which must not bring jax in (~200 MB a process); --num_proc is capped by
    # the sources and by the memory available, with a note, and must be at least 1
    code = "import sys, data; print(sorted(m for m in sys.modules if m.split('.')[0] in ('jax', 'jaxlib')))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=HERE, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stdout[:500] + proc.stderr[-500:]
    monkeypatch.setattr(data, "available_bytes", lambda: 3 * data.WORKER_BYTES + 1)
    assert data.worker_count(16, 100) == 3 and "note: --num_proc 16: 3 processes" in capsys.readouterr().err
    assert data.worker_count(16, 2) == 2 and data.worker_count(2, 100) == 2 and capsys.readouterr().err == ""
    monkeypatch.setattr(data, "available_bytes", lambda: None)  # not Linux: no cap but the sources
    assert data.worker_count(16, 100) == 16
    assert data.main([str(SHAKESPEARE), "--num_proc=0"]) == 2
    assert "--num_proc must be at least 1, got 0" in capsys.readouterr().err


def child_pids(pid):
    return [int(p) for p in pathlib.Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]


@pytest.mark.slow
def test_data_a_folder_is_read_the_same_way_in_files_and_archives(tmp_path):
    # the same documents as .txt files and as a .tar.xz whose members are not in name order: the same tokens; a
    # non-UTF-8 document stops the preparation, or with skip_bad is left out and counted
    texts = write_documents(tmp_path / "docs", 6, words=50)
    texts[2] = texts[2].replace(" ", "\r\n", 3)
    (tmp_path / "docs" / "0002.txt").write_bytes(texts[2].encode())
    archives = tmp_path / "archives"
    archives.mkdir()
    for name, members in (("a.tar.xz", [5, 4, 3]), ("b.tar.xz", [2, 1, 0])):
        with tarfile.open(archives / name, "w:xz") as archive:
            for i in members:
                archive.add(tmp_path / "docs" / f"{i:04d}.txt", arcname=f"{i:04d}.txt")
    prepared = {kind: data.prepare(str(tmp_path / kind), tmp_path / "data", "gpt2") for kind in ("docs", "archives")}
    enc = tiktoken_gpt2()
    tokens = {kind: np.concatenate([data.load_split(folder, s) for s in data.SPLITS]) for kind, folder in
              prepared.items()}
    want = sorted(tuple(enc.encode_ordinary(text)) + (50256,) for text in texts)
    for kind in ("docs", "archives"):
        assert sorted(map(tuple, documents_of(tokens[kind]))) == want, kind
    # a plain .xz text (not a tar archive) is one document
    with lzma.open(tmp_path / "plain.txt.xz", "wb") as f:
        f.write(texts[0].encode())
    (tmp_path / "one").mkdir()
    shutil.move(tmp_path / "plain.txt.xz", tmp_path / "one" / "plain.txt.xz")
    (tmp_path / "one" / "other.txt").write_text(texts[1])
    folder = data.prepare(str(tmp_path / "one"), tmp_path / "data", "gpt2")
    both = np.concatenate([data.load_split(folder, s) for s in data.SPLITS])
    assert sorted(map(tuple, documents_of(both))) == sorted(tuple(enc.encode_ordinary(t)) + (50256,) for t in texts[:2])
    (tmp_path / "docs" / "0003.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ValueError, match="0003.txt is not UTF-8 text"):
        data.prepare(str(tmp_path / "docs"), tmp_path / "data", "gpt2")
    folder = data.prepare(str(tmp_path / "docs"), tmp_path / "data", "gpt2", skip_bad=True)
    both = np.concatenate([data.load_split(folder, s) for s in data.SPLITS])
    assert (both == 50256).sum() == 5


def documents_of(ids):  # GPT-2 token ids -> the documents, each ending with <|endoftext|>
    return np.split(ids, np.flatnonzero(ids == 50256)[:-1] + 1)


def test_data_reads_only_the_dataset_it_is_given(tmp_path, monkeypatch):
    # an empty dataset is no dataset (it once meant the current folder, hidden ones included); links and hidden
    # folders inside a dataset folder are not read; an edited tiny Shakespeare is prepared again
    monkeypatch.chdir(tmp_path)
    for empty in ("", " ", "."):
        with pytest.raises(cli.UsageError, match="names no text"):
            data.prepare(empty, tmp_path / "data", "char")
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("first document")
    (docs / "b.txt").write_text("second document")
    (tmp_path / "secret.txt").write_text("password")
    (docs / "link.txt").symlink_to(tmp_path / "secret.txt")
    (docs / ".ssh").mkdir()
    (docs / ".ssh" / "id_rsa").write_text("key material")
    (docs / "linked_folder").symlink_to(docs / ".ssh")
    folder = data.prepare(str(docs), tmp_path / "data", "char")
    assert "".join(sorted(data.read_meta(folder)["chars"])) == "".join(sorted(set("first documentsecond")))
    data_dir = tmp_path / "data2"
    (data_dir / "shakespeare_char").mkdir(parents=True)
    (data_dir / "shakespeare_char" / "input.txt").write_text("to be or not to be " * 50)
    folder = data.prepare("shakespeare_char", data_dir)
    assert data.read_meta(folder)["chars"] == sorted(set("to be or not "))
    (data_dir / "shakespeare_char" / "input.txt").write_text("xyz " * 100)
    assert data.read_meta(data.prepare("shakespeare_char", data_dir))["chars"] == sorted(set("xyz "))
    # with no copy in data_dir, the tiny Shakespeare that ships with gptjax (no network needed)
    folder = data.prepare("shakespeare_char", tmp_path / "data3")
    assert len(data.read_meta(folder)["chars"]) == 65


# ==================== train_config ====================================================================================
# the config: files, flags and checks

def test_train_config_file_and_flags(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('n_layer = 3\nlearning_rate = 1\ndataset = "x"\nbias = true\n')
    overrides = train_config.parse_args([str(toml), "--n_layer=5", "--eval_only", "--min_lr=2e-5"])
    assert overrides == {"n_layer": 5, "learning_rate": 1.0, "dataset": "x", "bias": True, "eval_only": True,
                         "min_lr": 2e-5}
    as_json = tmp_path / "c.json"
    as_json.write_text('{"max_iters": 7}')
    assert train_config.parse_args([str(as_json)]) == {"max_iters": 7}
    for path in sorted((HERE / "configs").glob("*.toml")):  # the shipped recipes parse and validate
        train_config.resolve_config(train_config.parse_args([str(path)]))
    bad_cases = {
        ("--n_layr=3",): "unknown config key 'n_layr' on the command line; did you mean n_layer?",
        ("--n_layer=three",): "--n_layer takes an integer, not 'three'",
        ("--dropout=nan",): "--dropout takes a finite number",
        ("--bias=maybe",): "--bias takes true or false",
        ("--max_iters",): "--max_iters needs a value",
    }
    for args, message in bad_cases.items():
        with pytest.raises(ValueError, match=message.replace("?", r"\?")):
            train_config.parse_args(list(args))
    (tmp_path / "bad.toml").write_text("n_layer = \n")
    (tmp_path / "typo.toml").write_text("n_embed = 3\n")
    (tmp_path / "type.toml").write_text('n_layer = "4"\n')
    (tmp_path / "c.py").write_text("n_layer = 4\n")
    with pytest.raises(ValueError, match="bad.toml is not valid TOML"):
        train_config.parse_args([str(tmp_path / "bad.toml")])
    with pytest.raises(ValueError, match="unknown config key 'n_embed' in .*typo.toml; did you mean n_embd"):
        train_config.parse_args([str(tmp_path / "typo.toml")])
    with pytest.raises(ValueError, match="n_layer should be int, got '4'"):
        train_config.parse_args([str(tmp_path / "type.toml")])
    with pytest.raises(ValueError, match="should end in .toml or .json"):
        train_config.parse_args([str(tmp_path / "c.py")])
    for overrides, message in [({"n_embd": 30, "n_head": 4}, "multiple of n_head"), ({"dtype": "float16"},
                               "float16 needs loss scaling"), ({"dropout": 1.0}, "dropout must be in"),
                               ({"warmup_iters": 50, "lr_decay_iters": 50}, "must exceed warmup_iters")]:
        with pytest.raises(ValueError, match=message):
            train_config.resolve_config(overrides)


def test_train_config_keys_have_a_role_and_their_rules_are_checked():
    # each key's rule refuses the first value outside it, naming the key; each choice key refuses another word
    outside = {">= 1": 0, ">= 0": -1, "[0, 1)": 1, "(0, 1]": 0}
    for name, (default, role, rule, _) in train_config.CONFIG.items():
        assert role in train_config.ROLES, name
        if rule is None:
            continue
        bad = "nonsense" if isinstance(rule, tuple) else type(default)(outside[rule])
        with pytest.raises(cli.UsageError, match=f"^{name} must "):
            train_config.check_config({**train_config.DEFAULTS, name: bad})
    # a resume keeps the model's shape; a requeued run may change only where it writes, reports and tracks
    assert set(train_config.MODEL_KEYS) == {"n_layer", "n_head", "n_embd", "bias", "lora_rank", "lora_alpha",
                                            "lora_targets"}
    assert {"max_iters", "out_dir", "eval_interval", "wandb_log", "lora_base"} <= train_config.RUN_CONTROL_KEYS
    assert not {"dataset", "learning_rate", "optimizer", "dropout", "seed", "batch_size"} & \
        train_config.RUN_CONTROL_KEYS
    # --help lists the keys under their roles, in ROLES' order
    text = train_config.help_text()
    headings = [line.split(":")[0] for line in text.splitlines() if line and not line.startswith((" ", "usage"))
                and ":" in line and line.split(":")[0] in train_config.ROLES]
    assert headings == list(train_config.ROLES)
    model_part = text[text.index("\nmodel:"):text.index("\ntraining:")]
    assert "--n_layer=4" in model_part and "--learning_rate" not in model_part


def test_train_cli_errors_are_one_line(tmp_path, capsys):
    (tmp_path / "bad.toml").write_text("[[[")
    for args, needle in [(["--n_layr=3"], "did you mean n_layer"), ([str(tmp_path / "bad.toml")], "not valid TOML"),
                         (["--init_from=resume", f"--out_dir={tmp_path}"], "cannot resume"),
                         (["--seed=-1"], "seed must be from 0 to 2**63 - 1, got -1"),
                         (["--beta1=1"], "beta1 must be in [0, 1), got 1"), (["--beta2=1"], "beta2 must be in [0, 1)"),
                         ([f"--seed={2**63}"], f"seed must be from 0 to 2**63 - 1, got {2**63}"),
                         (["--lora_rank=-1"], "lora_rank must not be negative, got -1"),
                         (["--lora_rank=8"], "lora_rank adapts a pretrained model"),
                         (["--lora_base_dtype=float16"], "lora_base_dtype must be float32 or bfloat16"),
                         (["--init_from=124M", "--lora_rank=8", "--lora_targets=attn.c_atn"],
                          "lora_targets: unknown layer 'attn.c_atn'; choose from attn.c_attn")]:
        assert train.main(args) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    proc = run_train_cli("--help")  # and once as a process of its own
    assert proc.returncode == 0
    for name in train_config.DEFAULTS:
        assert f"--{name}=" in proc.stdout, name
    assert "--n_layer=4" in proc.stdout and "--dataset=shakespeare_char" in proc.stdout


# ==================== train, outdir ===================================================================================
# training, in sub-sections by concern: the optimizer, the step, runs and resumes, devices and processes, pretrained
# models and LoRA, stopping, out_dir, tracking, data

# ---------------------------------------------------------------------------- the optimizer and its schedule (optim.py)

def test_train_learning_rate_schedule_matches_formula():
    config = train_config.resolve_config({"learning_rate": 6e-4, "min_lr": 6e-5, "warmup_iters": 10,
                                          "lr_decay_iters": 50})

    def reference(it):  # nanoGPT's get_lr, in float64
        if it < 10:
            return 6e-4 * (it + 1) / 11
        if it > 50:
            return 6e-5
        return 6e-5 + 0.5 * (1 + math.cos(math.pi * (it - 10) / 40)) * (6e-4 - 6e-5)
    iters = np.array([0, 1, 5, 9, 10, 11, 25, 30, 49, 50, 51, 100])
    in_optimizer = jax.jit(jax.vmap(lambda it: optim.learning_rate(it, config)))(iters)  # as optax calls it
    for it, traced in zip(iters, np.asarray(in_optimizer)):
        assert traced == pytest.approx(reference(it), rel=1e-6), it
        assert float(optim.learning_rate(it, config, np)) == pytest.approx(reference(it), rel=1e-6), it
    assert optim.learning_rate(30, config, np) == pytest.approx((6e-4 + 6e-5) / 2)  # half way down the cosine
    constant = {**config, "decay_lr": False}
    assert float(optim.learning_rate(0, constant, np)) == float(optim.learning_rate(10**6, constant, np)) == \
        pytest.approx(6e-4)


def test_train_weight_decay_only_on_matrices_and_embeddings():
    hparams = {"n_vocab": 11, "n_ctx": 8, "n_embd": 8, "n_head": 2, "n_layer": 2}
    shapes = jax.eval_shape(lambda: train.gpt.init_params(jax.random.PRNGKey(0), hparams))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: 1 + rng.random(s.shape, np.float32), shapes)
    config = train_config.resolve_config({"learning_rate": 0.1, "weight_decay": 0.5, "decay_lr": False})
    optimizer = optim.make_optimizer(config, params)

    def zero_grad_update(params):  # Adam's step is 0 for zero gradients: what moves is the decay alone
        zero_grads = jax.tree.map(jnp.zeros_like, params)
        return optimizer.update(zero_grads, optimizer.init(params), params)[0]
    updates = jax.jit(zero_grad_update)(params)
    flat = outdir.flat_names(updates, "")
    decayed = {"wte", "wpe", "h/attn/c_attn/w", "h/attn/c_proj/w", "h/mlp/c_fc/w", "h/mlp/c_proj/w"}
    for name, update in flat.items():
        p = outdir.flat_names(params, "")[name]
        expected = -0.1 * 0.5 * p if name in decayed else np.zeros_like(p)
        np.testing.assert_allclose(update, expected, rtol=1e-6, err_msg=name)
    assert {n for n in flat if n.endswith(("/b", "/g"))} == set(flat) - decayed  # biases and LayerNorm: no decay


def follows_reference(config, params, rng, scales, reference_step, rtol=1e-5, atol=1e-6):
    """make_optimizer(config)'s updates of params (numpy), step after step on gradients scaled by `scales` (global
    norms above and below grad_clip 1), against reference_step(name, p, clipped gradient, that leaf's moments dict,
    it) -> the new p, in float64."""
    params = jax.tree.map(lambda p: jnp.asarray(p, jnp.float32), params)
    optimizer = optim.make_optimizer(config, params)
    state, update = optimizer.init(params), jax.jit(optimizer.update)
    ref = {name: np.asarray(p, np.float64) for name, p in outdir.flat_names(params, "").items()}
    moments = {name: {"m": np.zeros_like(p), "v": np.zeros_like(p)} for name, p in ref.items()}
    for it, scale in enumerate(scales):
        grads = jax.tree.map(lambda p, s=scale: jnp.asarray(s * rng.normal(size=p.shape), jnp.float32), params)
        updates, state = update(grads, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        g = {name: np.asarray(x, np.float64) for name, x in outdir.flat_names(grads, "").items()}
        norm = math.sqrt(sum((x ** 2).sum() for x in g.values()))
        for name in ref:
            ref[name] = reference_step(name, ref[name], g[name] * min(1.0, 1.0 / norm), moments[name], it)
        for name, p in outdir.flat_names(params, "").items():
            np.testing.assert_allclose(p, ref[name], rtol=rtol, atol=atol, err_msg=f"{name} at step {it}")


def adamw_step(p, g, mom, it, lr, b1, b2, decay):  # float64 AdamW with bias correction, decoupled decay
    mom["m"] = b1 * mom["m"] + (1 - b1) * g
    mom["v"] = b2 * mom["v"] + (1 - b2) * g ** 2
    step = (mom["m"] / (1 - b1 ** (it + 1))) / (np.sqrt(mom["v"] / (1 - b2 ** (it + 1))) + 1e-8)
    return p - lr * (step + decay * p)


def test_train_optimizer_is_nanogpts_clip_then_adamw():
    # make_optimizer's updates over steps through warmup and decay, against the rule written out in float64: clip the
    # gradient to global norm grad_clip, Adam's moments with bias correction, then lr(it) * (m / (sqrt(v) + eps) +
    # weight_decay * p) on the decayed params (matrices, embeddings) and without the decay on the rest
    config = train_config.resolve_config({"learning_rate": 1e-2, "min_lr": 1e-3, "warmup_iters": 2,
                                          "lr_decay_iters": 5, "beta1": 0.9, "beta2": 0.95, "weight_decay": 0.1,
                                          "grad_clip": 1.0})
    rng = np.random.default_rng(0)
    params = {"wte": rng.normal(size=(5, 3)), "h": {"ln_1": {"g": 1 + rng.normal(size=3)},
                                                    "attn": {"c_attn": {"w": rng.normal(size=(3, 6)),
                                                                        "b": rng.normal(size=6)}}}}

    def reference_step(name, p, g, mom, it):
        lr = (1e-2 * (it + 1) / 3 if it < 2 else
              1e-3 + 0.5 * (1 + math.cos(math.pi * min(it - 2, 3) / 3)) * (1e-2 - 1e-3))
        return adamw_step(p, g, mom, it, lr, 0.9, 0.95, 0.1 if name in ("wte", "h/attn/c_attn/w") else 0.0)
    follows_reference(config, params, rng, [10.0, 0.1, 3.0, 0.5, 2.0, 0.01, 5.0], reference_step)


def newton_schulz(x, steps=5, coeffs=(3.4445, -4.775, 2.0315)):  # float64 numpy: Muon's orthogonalisation of one matrix
    tall = x.shape[0] > x.shape[1]
    x = x.T if tall else x
    x = x / (np.linalg.norm(x) + 1e-8)
    for _ in range(steps):
        a = x @ x.T
        x = coeffs[0] * x + (coeffs[1] * a + coeffs[2] * a @ a) @ x
    return x.T if tall else x


def test_newton_schulz_reference_orthogonalises():  # the reference itself: singular values pulled towards 1
    x = np.random.default_rng(0).normal(size=(6, 16)) * 1e-3
    s = np.linalg.svd(newton_schulz(x), compute_uv=False)
    assert s.min() > 0.6 and s.max() < 1.25  # the quintic's band (Keller Jordan's notes: ~[0.7, 1.2])
    assert np.linalg.svd(x / np.linalg.norm(x), compute_uv=False).max() < 0.6  # where it started


def test_optim_muon_is_newton_schulz_of_the_momentum_layer_by_layer():
    # make_optimizer(optimizer=muon) over steps of a wsd schedule, against float64 numpy: gradients clipped by their
    # global norm; on each block matrix [n_layer, n_in, n_out] optax's Nesterov momentum (bias-corrected), each LAYER
    # orthogonalised on its own, scaled by sqrt(max(1, n_out / n_in)), plus decoupled decay, times Muon's learning
    # rate; AdamW (beta1, beta2, learning_rate) on the rest, decaying only wte
    config = train_config.resolve_config({
        "optimizer": "muon", "learning_rate": 1e-2, "muon_learning_rate": 0.05, "min_lr": 1e-3, "warmup_iters": 2,
        "lr_decay_iters": 6, "lr_schedule": "wsd", "decay_fraction": 0.5, "beta1": 0.9, "beta2": 0.95,
        "muon_momentum": 0.9, "weight_decay": 0.1, "grad_clip": 1.0})
    rng = np.random.default_rng(0)
    params = {"wte": rng.normal(size=(5, 4)), "h": {"ln_1": {"g": 1 + rng.normal(size=(2, 4))},
                                                    "attn": {"c_attn": {"w": rng.normal(size=(2, 4, 12)),
                                                                        "b": rng.normal(size=(2, 12))}},
                                                    "mlp": {"c_proj": {"w": rng.normal(size=(2, 16, 4))}}}}

    def reference_step(name, p, g, mom, it):
        # wsd: warmup over 2, constant to 3, linear to min_lr at 6, both learning rates in proportion
        lr = 1e-2 * (it + 1) / 3 if it < 2 else 1e-2 - min(max(it - 3, 0) / 3, 1) * (1e-2 - 1e-3)
        if name not in ("h/attn/c_attn/w", "h/mlp/c_proj/w"):
            return adamw_step(p, g, mom, it, lr, 0.9, 0.95, 0.1 if name == "wte" else 0.0)
        b, t = 0.9, it + 1
        mom["m"] = b * mom["m"] + (1 - b) * g
        nesterov = b * mom["m"] / (1 - b ** (t + 1)) + (1 - b) * g / (1 - b ** t)
        ortho = np.stack([newton_schulz(layer) for layer in nesterov])
        n_in, n_out = ortho.shape[1:]
        return p - 5 * lr * (ortho * max(1.0, n_out / n_in) ** 0.5 + 0.1 * p)
    follows_reference(config, params, rng, [10.0, 0.1, 3.0, 0.5, 2.0, 0.01, 5.0, 1.0], reference_step, rtol=1e-4,
                      atol=1e-5)


def test_optim_muon_trains_the_blocks_matrices_and_adamw_the_rest():
    # the partition, written out: a model with biases, and LoRA's adapters (what a LoRA run optimizes)
    hparams = {"n_vocab": 11, "n_ctx": 8, "n_embd": 8, "n_head": 2, "n_layer": 2}
    params = jax.eval_shape(lambda: gpt.init_params(jax.random.PRNGKey(0), hparams))
    labels = outdir.flat_names(optim.muon_labels(params), "")
    assert {name for name, label in labels.items() if label == "muon"} == {
        "h/attn/c_attn/w", "h/attn/c_proj/w", "h/mlp/c_fc/w", "h/mlp/c_proj/w"}
    assert {name for name, label in labels.items() if label == "adamw"} == {
        "wte", "wpe", "ln_f/g", "ln_f/b", "h/ln_1/g", "h/ln_1/b", "h/ln_2/g", "h/ln_2/b", "h/attn/c_attn/b",
        "h/attn/c_proj/b", "h/mlp/c_fc/b", "h/mlp/c_proj/b"}
    adapters = jax.eval_shape(lambda: gpt.init_adapters(jax.random.PRNGKey(0), gpt.init_params(
        jax.random.PRNGKey(0), hparams), 2, ("attn/c_attn", "mlp/c_proj")))
    assert outdir.flat_names(optim.muon_labels(adapters), "") == {
        "h/attn/c_attn/lora_a": "muon", "h/attn/c_attn/lora_b": "muon", "h/mlp/c_proj/lora_a": "muon",
        "h/mlp/c_proj/lora_b": "muon"}


def test_optim_wsd_schedule_at_its_corners():
    config = train_config.resolve_config({"lr_schedule": "wsd", "learning_rate": 1e-2, "min_lr": 1e-3,
                                          "muon_learning_rate": 0.04, "warmup_iters": 10, "lr_decay_iters": 50,
                                          "decay_fraction": 0.2})
    corners = {0: 1e-2 / 11, 9: 1e-2 * 10 / 11, 10: 1e-2, 25: 1e-2, 40: 1e-2, 45: 5.5e-3, 49: 1e-2 - 0.9 * 9e-3,
               50: 1e-3, 1000: 1e-3}
    traced = jax.jit(jax.vmap(lambda it: optim.learning_rate(it, config)))(np.array(list(corners)))
    for (it, want), got in zip(corners.items(), np.asarray(traced)):
        assert got == pytest.approx(want, rel=1e-6), it
        assert float(optim.learning_rate(it, config, np)) == pytest.approx(want, rel=1e-6), it
        assert float(optim.muon_learning_rate(it, config, np)) == pytest.approx(4 * want, rel=1e-6), it
    whole = {**config, "decay_fraction": 1.0}  # the decay starts where the warmup ends
    assert float(optim.learning_rate(30, whole, np)) == pytest.approx(1e-2 - 0.5 * 9e-3, rel=1e-6)
    assert float(optim.muon_learning_rate(7, {**config, "learning_rate": 0.0}, np)) == pytest.approx(0.04 * 8 / 11)


@pytest.mark.slow
def test_train_muon_resumes_bitwise_and_keeps_its_optimizer(train_data_dir, tmp_path):
    # Muon with gradient accumulation and a wsd schedule: a run stopped at 4 and resumed equals one that never
    # stopped, its momentum included; the checkpoint's optimizer cannot be swapped on resume
    extra = {"eval_interval": 4, "optimizer": "muon", "lr_schedule": "wsd", "muon_learning_rate": 0.02,
             "lr_decay_iters": 8}
    straight = train.train(run_config(train_data_dir, tmp_path / "a", max_iters=8, **extra))
    train.train(run_config(train_data_dir, tmp_path / "b", max_iters=4, **extra))
    with pytest.raises(cli.UsageError, match="optimizer=adamw differs from the checkpoint's muon"):
        train.train({"init_from": "resume", "out_dir": str(tmp_path / "b"), "max_iters": 8, "optimizer": "adamw"})
    train.train({"init_from": "resume", "out_dir": str(tmp_path / "b"), "max_iters": 8})
    a, b = ckpt_tensors(tmp_path / "a"), ckpt_tensors(tmp_path / "b")
    assert a.keys() == b.keys() and any(".mu" in name for name in a)  # Muon's momentum is saved
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    assert straight["losses"][7] < straight["losses"][0]


# ---------------------------------------------------------------------- the step: micro-batches, dropout, remat, memory

@pytest.mark.slow
def test_train_step_draws_each_micro_batch_and_step_its_own_dropout_masks():
    # train_step with dropout, in float64, against numpy's GPT-2 with documented_dropout and the keys train.py
    # documents: fold_in(fold_in(PRNGKey(seed), it), m) for micro-batch m of iteration it. Its loss is the mean of the
    # micro-batches' losses; its update (SGD at learning rate 1) is minus the mean of their gradients.
    with jax.enable_x64(True):
        hparams = {"n_vocab": 13, "n_ctx": 8, "n_embd": 8, "n_head": 2, "n_layer": 2}
        params = gpt_init(jax.random.PRNGKey(0), hparams, jnp.float64)
        x = jax.random.randint(jax.random.PRNGKey(1), (3, 2, 8), 0, 13)  # 3 micro-batches of 2 rows
        y = jax.random.randint(jax.random.PRNGKey(2), (3, 2, 8), 0, 13)
        optimizer = optax.sgd(1.0)
        step = jax.jit(partial(train.train_step, optimizer=optimizer, seed=7, n_head=2, dropout=0.2,
                               dtype=jnp.float64))
        grad = jax.jit(jax.grad(gpt.lm_loss), static_argnums=(3, 4))
        for it in (0, 5):
            new_params, _, loss = step(params, optimizer.init(params), x, y, it)
            keys = [jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(7), it), m) for m in range(3)]
            losses = []
            for m, key in enumerate(keys):
                logits = numpy_gpt2(flat_params(params), np.asarray(x[m]), 2, drop=documented_dropout(key, 0.2))
                logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
                losses.append(-np.take_along_axis(logprobs, np.asarray(y[m])[..., None], -1).mean())
            assert float(loss) == pytest.approx(np.mean(losses), rel=1e-9), it
            grads = [grad(params, x[m], y[m], 2, 0.2, key) for m, key in enumerate(keys)]
            mean_grad = jax.tree.map(lambda *g: sum(g) / 3, *grads)
            before, mean_grad = outdir.flat_names(params, ""), outdir.flat_names(mean_grad, "")
            for name, p in outdir.flat_names(new_params, "").items():
                np.testing.assert_allclose(p, before[name] - mean_grad[name], rtol=1e-9, atol=1e-12, err_msg=name)


def test_train_gradient_accumulation_equals_one_bigger_batch(train_data_dir, tmp_path):
    # 2 micro-batches of 4 sequences and 1 batch of 8: the same 8 sequences (batch_starts draws n * rows), the same
    # mean gradient, so the same params after each step (to float rounding), without dropout
    config = dict(max_iters=3, eval_interval=3, dropout=0.0)
    two = train.train(run_config(train_data_dir, tmp_path / "two", batch_size=4, gradient_accumulation_steps=2,
                                   **config))
    one = train.train(run_config(train_data_dir, tmp_path / "one", batch_size=8, gradient_accumulation_steps=1,
                                   **config))
    np.testing.assert_allclose([two["losses"][i] for i in range(3)], [one["losses"][i] for i in range(3)], rtol=1e-5)
    a, b = ckpt_tensors(tmp_path / "two"), ckpt_tensors(tmp_path / "one")
    for name in a:
        if name.startswith("params/"):
            np.testing.assert_allclose(a[name], b[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.slow
def test_train_remat_gives_the_same_losses(train_data_dir, tmp_path):
    plain = train.train(run_config(train_data_dir, tmp_path / "plain", max_iters=4, eval_interval=4))
    remat = train.train(run_config(train_data_dir, tmp_path / "remat", max_iters=4, eval_interval=4, remat=True))
    np.testing.assert_allclose([remat["losses"][i] for i in range(4)], [plain["losses"][i] for i in range(4)],
                               rtol=1e-5)
    np.testing.assert_allclose(remat["evals"][-1]["val_loss"], plain["evals"][-1]["val_loss"], rtol=1e-5)


@pytest.mark.slow
def test_train_memory_plan_and_a_run_that_cannot_fit(train_data_dir, tmp_path, monkeypatch, capsys):
    hparams = {"n_vocab": 65, "n_ctx": 256, "n_embd": 64, "n_head": 4, "n_layer": 4}
    config = train_config.resolve_config({**TINY_RUN, "block_size": 256, "batch_size": 8,
                                          "gradient_accumulation_steps": 1})
    params = gpt_init(jax.random.PRNGKey(0), hparams)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    optimizer = optim.make_optimizer(config, params)
    mesh = train.Mesh(np.array(jax.devices()[:1]), ("data",))
    opt_shapes = jax.eval_shape(optimizer.init, params)
    opt_shardings = devices.tree_shardings(mesh, opt_shapes, False)
    batch = jax.ShapeDtypeStruct((1, 8, 256), jnp.int32, sharding=train.NamedSharding(mesh, train.P()))
    plans = {}
    for remat in (False, True):
        step = jax.jit(train.step_function({**config, "remat": remat}, optimizer, 4), donate_argnums=(0, 1))
        plans[remat], _ = devices.memory_plan(step, params, opt_shapes, opt_shardings, (batch, batch))
    plan = plans[False]
    assert plan["params"] == 4 * n_params  # float32
    assert 8 * n_params <= plan["optimizer"] <= 8 * n_params + 64  # AdamW's two moments and its step counts
    assert plan["step"] >= 4 * n_params  # the gradients at least
    assert plan["total"] == plan["params"] + plan["optimizer"] + plan["step"]
    assert plans[True]["step"] < 0.8 * plan["step"]  # --remat plans fewer bytes of activations
    # with LoRA the frozen base model is held beside the adapters that train: the plan's params count both
    adapters = gpt.init_adapters(jax.random.PRNGKey(1), params, 4)
    lora = {**config, "lora_rank": 4, "lora_alpha": 8}
    lora_optimizer = optim.make_optimizer(lora, adapters)
    lora_opt_shapes = jax.eval_shape(lora_optimizer.init, adapters)
    step = jax.jit(train.step_function(lora, lora_optimizer, 4), donate_argnums=(0, 1))
    lora_plan, _ = devices.memory_plan(step, adapters, lora_opt_shapes,
                                       devices.tree_shardings(mesh, lora_opt_shapes, False), (batch, batch), params)
    assert lora_plan["params"] == 4 * (n_params + sum(x.size for x in jax.tree.leaves(adapters)))
    # a run whose plan exceeds the device stops at once, in one line, with the ways to bring it under
    monkeypatch.setattr(devices, "available_memory", lambda: (10**6, "this machine has"))
    out = tmp_path / "out"
    assert train.main([f"--data_dir={train_data_dir}", f"--out_dir={out}", "--max_iters=2"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: this run needs params") and "this machine has 1 MB" in err
    assert all(w in err for w in ("--remat", "batch_size", "gradient_accumulation_steps", "block_size")), err
    assert not (out / "ckpt.safetensors").exists()
    # when it fits: the plan is printed, and each evaluation records the peak
    monkeypatch.undo()
    result = train.train(run_config(train_data_dir, tmp_path / "fits", max_iters=2, eval_interval=2))
    assert "memory: params" in capsys.readouterr().err
    assert all(e["peak_memory_gb"] > 0 for e in result["evals"])
    # the plan against what a fresh train.py process measures after its first step: the peak is the plan plus the
    # process itself (the JAX runtime and Python: 0.3-0.8 GB here), within a stated 1 GB
    proc = run_train_cli(f"--data_dir={train_data_dir}", f"--out_dir={tmp_path / 'cli'}", "--max_iters=2",
                         "--eval_interval=2", "--eval_iters=1", "--block_size=256", "--batch_size=8")
    found = re.search(r"memory: peak ([\d.]+) (GB|MB) after the first step \(planned ([\d.]+) (GB|MB)", proc.stdout)
    assert proc.returncode == 0 and found, proc.stdout[-2000:]
    peak, planned = (float(found.group(i)) * (1e9 if found.group(i + 1) == "GB" else 1e6) for i in (1, 3))
    assert planned < peak < planned + 1e9, (planned, peak)


def test_train_checks_memory_before_making_a_new_model(train_data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(devices, "available_memory", lambda: (10**6, "this machine has"))
    monkeypatch.setattr(train, "init_params", lambda *a: pytest.fail("the model was made before the memory check"))
    code = train.main([f"--out_dir={tmp_path / 'out'}", f"--data_dir={train_data_dir}", "--max_iters=2"])
    assert code == 1 and "this machine has 1 MB" in capsys.readouterr().err
    # --overwrite of a trained run with a run that does not fit: refused before the old run is cleared
    out = tmp_path / "trained"
    monkeypatch.undo()
    train.train(run_config(train_data_dir, out, max_iters=2, eval_interval=2))
    before = folder_state(out)
    monkeypatch.setattr(devices, "available_memory", lambda: (10**6, "this machine has"))
    args = [f"--{k}={v}" for k, v in run_config(train_data_dir, out, max_iters=2, overwrite=True).items()]
    assert train.main(args) == 1 and "this machine has 1 MB" in capsys.readouterr().err
    assert folder_state(out) == before


def test_train_cpu_settings_leave_a_users_xla_flags_alone(monkeypatch):
    monkeypatch.setenv("XLA_FLAGS", "--xla_dump_to=/tmp/x")
    cli.prefer_eigen_dots_on_cpu()
    assert os.environ["XLA_FLAGS"] == "--xla_dump_to=/tmp/x --xla_cpu_experimental_ynn_fusion_type=-individual_dot"
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=dot")
    cli.prefer_eigen_dots_on_cpu()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=dot"  # the user's choice stands
    monkeypatch.delenv("XLA_FLAGS")
    cli.prefer_eigen_dots_on_cpu()
    assert os.environ["XLA_FLAGS"] == "--xla_cpu_experimental_ynn_fusion_type=-individual_dot"
    cli.keep_freed_memory()  # malloc tuning: must not fail, whatever the platform
    assert np.ones(10**6).sum() == 10**6


# ---------------------------------------------------------------------------------------- runs, checkpoints and resumes

@pytest.mark.slow
def test_train_keeps_the_model_of_the_best_val_loss(train_data_dir, tmp_path, monkeypatch):
    # params.safetensors is the model at the evaluation with the lowest val loss, the checkpoint the latest state
    # (val losses scripted: 4.0 at iteration 2, then higher); always_save_checkpoint makes the model the latest too.
    # max_iters 7 is no multiple of eval_interval: the run still evaluates and checkpoints its last iteration.
    real = train.estimate_losses
    scripted = {0: 5.0, 2: 4.0, 4: 4.5, 6: 4.2, 7: 4.3}
    monkeypatch.setattr(train, "estimate_losses", lambda compiled, state, *args: {**real(compiled, state, *args),
                                                                             "val": scripted[state.iter]})
    runs = {name: train.train(run_config(train_data_dir, tmp_path / name, max_iters=max_iters, eval_interval=2,
                                         always_save_checkpoint=always))
            for name, max_iters, always in (("best", 2, False), ("run", 7, False), ("latest", 7, True))}
    assert [record["iter"] for record in runs["run"]["evals"]] == [0, 2, 4, 6, 7]
    assert [record["iter"] for record in outdir.read_metrics(tmp_path / "run")] == [0, 2, 4, 6, 7]
    meta = outdir.read_checkpoint_meta(tmp_path / "run" / outdir.CKPT_NAME)
    assert (meta["iter"], meta["best_val_loss"]) == (7, 4.0)
    model = {name: read_safetensors(tmp_path / name / "params.safetensors") for name in runs}
    for key, value in model["best"].items():  # training is deterministic: the params of iteration 2
        np.testing.assert_array_equal(model["run"][key], value, err_msg=key)
    assert any(not np.array_equal(model["latest"][key], value) for key, value in model["best"].items())
    latest = ckpt_tensors(tmp_path / "run")
    for key, value in model["latest"].items():  # the latest is iteration 7's, as the run's checkpoint holds
        np.testing.assert_array_equal(latest["params/" + key], value, err_msg=key)


def test_train_resume_repeats_the_uninterrupted_run_bitwise(train_data_dir, tmp_path):
    extra = {"eval_interval": 6}
    straight = train.train(run_config(train_data_dir, tmp_path / "a", max_iters=12, **extra))
    first = train.train(run_config(train_data_dir, tmp_path / "b", max_iters=6, **extra))
    assert outdir.read_checkpoint_meta(tmp_path / "b" / "ckpt.safetensors")["iter"] == 6
    second = train.train({"init_from": "resume", "out_dir": str(tmp_path / "b"), "max_iters": 12})
    assert sorted(second["losses"]) == list(range(6, 12))
    resumed = {**first["losses"], **second["losses"]}
    assert [resumed[i] for i in range(12)] == [straight["losses"][i] for i in range(12)]  # bitwise equal floats
    assert straight["losses"][11] < straight["losses"][0]  # and it learns
    a, b = ckpt_tensors(tmp_path / "a"), ckpt_tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # the evaluation records continue the same way
    assert straight["evals"][-1]["val_loss"] == second["evals"][-1]["val_loss"]
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iter"] for line in lines] == [0, 6, 12]
    assert set(json.loads(lines[-1])) == {"iter", "train_loss", "val_loss", "lr", "tokens_per_s", "mfu", "elapsed_s",
                                         "peak_memory_gb"}


@pytest.mark.slow
def test_train_eval_only_and_bias(train_data_dir, tmp_path):
    out = tmp_path / "e"
    with pytest.raises(ValueError, match="eval_only evaluates a trained model: add --init_from=resume"):
        train.train(run_config(train_data_dir, out, eval_only=True))  # a random model, by accident
    assert not out.exists()
    trained = train.train(run_config(train_data_dir, out, bias=True, max_iters=2, eval_interval=2))
    # an untrained model with 65 characters is close to uniform: ln 65
    assert trained["evals"][0]["iter"] == 0
    assert trained["evals"][0]["val_loss"] == pytest.approx(math.log(65), abs=0.1)
    before = folder_state(out)
    result = train.train({"init_from": "resume", "out_dir": str(out), "eval_only": True})
    assert [e["iter"] for e in result["evals"]] == [2] and result["losses"] == {}
    assert result["evals"][0]["val_loss"] == trained["evals"][-1]["val_loss"]  # the same batches, the same model
    assert folder_state(out) == before  # metrics.jsonl, loss.png, the checkpoints: untouched
    # each split's loss: the mean over eval_iters batches drawn from that split (data.batch_starts at the evaluation's
    # iteration) of the checkpoint's model, recomputed with numpy's float64 GPT-2
    flat = {name[len("params/"):]: x for name, x in ckpt_tensors(out).items() if name.startswith("params/")}
    seed = outdir.read_checkpoint_meta(out / outdir.CKPT_NAME)["config"]["seed"]
    for split in ("train", "val"):
        tokens = data.load_split(train_data_dir / "shakespeare_char", split)
        x, y = data.get_batch(tokens, data.batch_starts(len(tokens), 32, 2 * 4, seed, 2, split), 32)
        logits = numpy_gpt2(flat, x, 2)
        logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll = -np.take_along_axis(logprobs, y[..., None], -1)[..., 0]  # [2 batches * 4 rows, 32]
        assert result["evals"][0][f"{split}_loss"] == pytest.approx(nll.mean(), rel=1e-5), split
    hparams = {"n_vocab": 5, "n_ctx": 4, "n_embd": 4, "n_head": 1, "n_layer": 1}
    without = jax.eval_shape(lambda: gpt.init_params(jax.random.PRNGKey(0), hparams, bias=False))
    assert sorted(outdir.flat_names(without, "")) == ["h/attn/c_attn/w", "h/attn/c_proj/w", "h/ln_1/g", "h/ln_2/g",
                                                     "h/mlp/c_fc/w", "h/mlp/c_proj/w", "ln_f/g", "wpe", "wte"]


def test_train_checkpoint_survives_a_crash_mid_write(train_data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    train.train(run_config(train_data_dir, out, max_iters=2, eval_interval=2))
    good = (out / "ckpt.safetensors").read_bytes()
    good_model = (out / "params.safetensors").read_bytes()

    fsync = os.fsync

    def disk_full(fd):  # the checkpoint's bytes were written but cannot reach the disk
        if "ckpt.safetensors" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(28, "No space left on device")
        return fsync(fd)
    monkeypatch.setattr(os, "fsync", disk_full)
    with pytest.raises(OSError, match=f"cannot write {re.escape(str(out / 'ckpt.safetensors'))}: No space left on "
                                      f"device \\(its previous version is intact\\)"):
        train.train({"init_from": "resume", "out_dir": str(out), "max_iters": 4})
    assert (out / "ckpt.safetensors").read_bytes() == good
    assert not [p.name for p in out.iterdir() if p.name.endswith(".part")]  # no partial file left to mistake
    monkeypatch.undo()

    def crash_at_rename(src, dst):
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(os, "replace", crash_at_rename)
    with pytest.raises(OSError, match="Input/output error"):
        train.train({"init_from": "resume", "out_dir": str(out), "max_iters": 4, "always_save_checkpoint": True})
    monkeypatch.undo()
    assert (out / "ckpt.safetensors").read_bytes() == good
    assert (out / "params.safetensors").read_bytes() == good_model
    assert not [p.name for p in out.iterdir() if p.name.endswith(".part")]
    # what a kill -9 mid-write leaves (a temporary file named after its dead writer) goes at the next start; a live
    # writer's file stays
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = out / f".ckpt.safetensors.{int(dead.stdout)}.part"
    stale.write_bytes(good[:1000])
    live = out / f".notes.txt.{os.getpid()}.part"
    live.write_bytes(b"being written")
    # and the intact checkpoint resumes as if nothing had happened
    result = train.train({"init_from": "resume", "out_dir": str(out), "max_iters": 4})
    assert sorted(result["losses"]) == [2, 3]
    assert not stale.exists() and live.exists()
    straight = train.train(run_config(train_data_dir, tmp_path / "straight", max_iters=4, eval_interval=2))
    assert [result["losses"][i] for i in (2, 3)] == [straight["losses"][i] for i in (2, 3)]


@pytest.mark.slow
def test_train_checkpoints_by_time_between_evaluations(train_data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    train.train(run_config(train_data_dir, out, max_iters=2, eval_interval=2))
    saved, models = [], []
    save_checkpoint, save_model = outdir.save_checkpoint, outdir.save_model
    monkeypatch.setattr(outdir, "save_checkpoint", lambda d, state, *a: (saved.append(state.iter),
                                                                         save_checkpoint(d, state, *a)))
    monkeypatch.setattr(outdir, "save_model", lambda *a: (models.append(len(saved)), save_model(*a)))
    # every 6 µs, so after each step; evaluations only at the end
    train.train({"init_from": "resume", "out_dir": str(out), "max_iters": 6, "eval_interval": 100,
                 "checkpoint_interval_minutes": 1e-7})
    assert saved[:3] == [3, 4, 5] and saved[-1] == 6  # by time, then the final evaluation's
    assert all(at > 3 for at in models)  # params.safetensors (the best model) only from an evaluation
    saved.clear()
    train.train({"init_from": "resume", "out_dir": str(out), "max_iters": 9, "eval_interval": 100,
                 "checkpoint_interval_minutes": 0})
    assert saved == [9]
    # the interval is in minutes, and its clock restarts at each checkpoint: a clock read once before the loop, once
    # an iteration and once after each checkpoint, 40 s apart, with 1 minute between checkpoints -> every other step
    saved.clear()
    seconds = iter(range(0, 10**6, 40))
    monkeypatch.setattr(train, "CLOCK", lambda: next(seconds))
    train.train({"init_from": "resume", "out_dir": str(out), "max_iters": 15, "eval_interval": 100,
                 "checkpoint_interval_minutes": 1})
    assert saved == [10, 12, 14, 15], saved  # 15: the final evaluation's


@pytest.mark.slow
def test_train_auto_resume_continues_this_run_and_refuses_another(train_data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    straight = train.train(run_config(train_data_dir, tmp_path / "straight", max_iters=8, eval_interval=4))
    command = [f"--{k}={v}" for k, v in run_config(train_data_dir, out, eval_interval=4).items()] + ["--auto_resume"]
    assert train.main([*command, "--max_iters=4"]) == 0  # nothing there: it starts
    assert train.main([*command, "--max_iters=8"]) == 0  # the same command line, requeued: it continues
    assert [r["iter"] for r in outdir.read_metrics(out)] == [0, 4, 8]
    assert outdir.read_metrics(out)[-1]["val_loss"] == straight["evals"][-1]["val_loss"]
    capsys.readouterr()
    before = (out / outdir.CKPT_NAME).stat().st_mtime_ns
    assert train.main([*command, "--max_iters=8"]) == 0  # requeued once more after it finished: it ends, saying so
    assert "this run has finished" in capsys.readouterr().err
    assert (out / outdir.CKPT_NAME).stat().st_mtime_ns == before and len(outdir.read_metrics(out)) == 3
    assert train.main([*command, "--max_iters=12", "--learning_rate=0.01"]) == 2
    err = capsys.readouterr().err
    assert "is of another run (learning_rate=0.003 there, 0.01 here)" in err and err.count("\n") == 1, err
    # a finetune of a model folder, requeued with the same command line, continues too (not a new finetune)
    model = copy_folder(tmp_path, TINY_TF)
    tuned = tmp_path / "tuned"
    command = [f"--init_from={model}", f"--out_dir={tuned}", f"--data_dir={train_data_dir}", "--dataset=shakespeare",
               "--batch_size=2", "--block_size=32", "--eval_interval=2", "--eval_iters=2", "--auto_resume"]
    assert train.main([*command, "--max_iters=2"]) == 0
    assert train.main([*command, "--max_iters=4"]) == 0
    assert f"resuming from iteration 2 of {tuned / 'ckpt.safetensors'}" in capsys.readouterr().err
    assert [r["iter"] for r in outdir.read_metrics(tuned)] == [0, 2, 4]


def test_train_metrics_are_not_recorded_twice_after_a_crash(train_data_dir, tmp_path, monkeypatch):
    # killed between an evaluation's metrics line and its checkpoint: the resumed run repeats that evaluation, and
    # metrics.jsonl holds it once; a checkpoint with a flipped bit is refused
    out = tmp_path / "out"
    train.train(run_config(train_data_dir, out, max_iters=2, eval_interval=2))
    save_checkpoint = outdir.save_checkpoint

    def crash_at_4(out_dir, state, *args):
        if state.iter == 4:
            raise OSError(5, "the machine went down")
        return save_checkpoint(out_dir, state, *args)
    monkeypatch.setattr(outdir, "save_checkpoint", crash_at_4)
    with pytest.raises(OSError):
        train.train({"init_from": "resume", "out_dir": str(out), "max_iters": 6})
    monkeypatch.undo()
    assert [r["iter"] for r in outdir.read_metrics(out)] == [0, 2, 4]
    train.train({"init_from": "resume", "out_dir": str(out), "max_iters": 6})
    assert [r["iter"] for r in outdir.read_metrics(out)] == [0, 2, 4, 6]
    blob = bytearray((out / "ckpt.safetensors").read_bytes())
    blob[-3] ^= 0x10
    (out / "ckpt.safetensors").write_bytes(bytes(blob))
    with pytest.raises(ValueError, match="fails its checksum"):
        train.train({"init_from": "resume", "out_dir": str(out), "max_iters": 8})


@pytest.mark.slow
def test_train_a_checkpoint_cannot_steer_a_resume_elsewhere(train_data_dir, tmp_path, release_server, monkeypatch,
                                                            capsys):
    out = tmp_path / "out"
    train.train(run_config(train_data_dir, out, max_iters=2, eval_interval=2))
    saved = outdir.read_checkpoint_meta(out / "ckpt.safetensors")["config"]
    assert all(pathlib.Path(saved[key]).is_absolute() for key in ("data_dir", "models_dir", "out_dir"))
    tensors = ckpt_tensors(out)

    def rewrite(**metadata):  # the checkpoint with some of its metadata replaced, as a hostile copy could be
        with open(out / "ckpt.safetensors", "rb") as f:
            _, meta, _ = weights.safetensors_header(f, out / "ckpt.safetensors")
        weights.write_safetensors(out / "ckpt.safetensors", tensors, {**meta, **metadata})
    # a LoRA base that a checkpoint names is never downloaded by a resume (it once started a 1558M download)
    text = tmp_path / "sonnets.txt"
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    lora = {"init_from": "124M", "models_dir": str(tmp_path / "m"), "dataset": str(text), "block_size": 32,
            "data_dir": str(tmp_path / "data"), "batch_size": 4, "max_iters": 2, "eval_interval": 2, "eval_iters": 2,
            "lora_rank": 4, "out_dir": str(tmp_path / "lora")}
    train.train(lora)  # the release fetched from the test server
    shutil.rmtree(tmp_path / "m")
    release_server.log.clear()
    code = train.main(["--init_from=resume", f"--out_dir={tmp_path / 'lora'}", "--max_iters=4"])
    err = capsys.readouterr().err
    assert code == 1 and "lacks" in err and "--lora_base" in err and not release_server.log, err
    # hparams that disagree with its tensors: refused, not trained on and saved as a model main.py calls damaged
    rewrite(hparams=json.dumps({**json.loads(json.dumps(outdir.read_checkpoint_meta(out / "ckpt.safetensors")
                                                        ["hparams"])), "n_embd": 64, "n_head": 2}))
    code = train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=4"])
    assert code == 1 and "where its hparams give" in capsys.readouterr().err
    rewrite(hparams="[1, 2]")
    code = train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=4"])
    assert code == 1 and "damaged metadata" in capsys.readouterr().err
    # a dataset it names is read where it was prepared, never prepared anew from a path it holds
    rewrite(hparams=json.dumps({"n_vocab": 65, "n_ctx": 32, "n_embd": 32, "n_head": 2, "n_layer": 2}),
            config=json.dumps({**saved, "dataset": str(tmp_path / "elsewhere.txt"), "data_dir": str(tmp_path / "x")}))
    (tmp_path / "elsewhere.txt").write_text("some other text " * 100)
    code = train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=4"])
    assert code == 1 and "is not prepared" in capsys.readouterr().err and not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------ devices and processes

@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["adamw", "muon"])  # Muon's orthogonalisation of sharded matrices
def test_train_four_devices_match_one(train_data_dir, tmp_path, optimizer):
    config = run_config(train_data_dir, tmp_path / "one", max_iters=6, eval_interval=6, optimizer=optimizer)
    one = train.train(config)
    one = [one["losses"][i] for i in range(6)]
    proc = run_program("train_four_devices.py", json.dumps({**config, "out_dir": str(tmp_path / "four")}),
                       timeout=300, env=FOUR_CPU_DEVICES)
    assert proc.returncode == 0, proc.stderr[-3000:]
    four = json.loads(proc.stdout.strip().splitlines()[-1])
    assert four.pop("fsdp_share") == 0.25  # each of the 4 devices holds a quarter of the params, not all of them
    for fsdp, losses in four.items():
        np.testing.assert_allclose(losses, one, rtol=1e-5, atol=1e-5, err_msg=f"fsdp={fsdp}")
    # and they end with the same params as one device
    ref = ckpt_tensors(tmp_path / "one")
    for fsdp in ("False", "True"):
        got = ckpt_tensors(str(tmp_path / "four") + fsdp)
        for name in ref:
            if name.startswith("params/"):
                np.testing.assert_allclose(got[name], ref[name], rtol=1e-4, atol=1e-6, err_msg=f"{fsdp} {name}")


def train_processes(config, cwds, port):  # train.py as 2 processes of 2 CPU devices each
    procs = []
    for process_id, cwd in enumerate(cwds):
        env = {**os.environ, "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}", "JAX_NUM_PROCESSES": "2",
               "JAX_PROCESS_ID": str(process_id), "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
               "JAX_PLATFORMS": "cpu", "GPTJAX_HEARTBEAT_TIMEOUT": "5"}  # a dead process is noticed in 5 s
        args = [f"--{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in config.items()]
        procs.append(subprocess.Popen([sys.executable, str(HERE / "train.py"), *args], cwd=cwd, env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    return procs


@pytest.mark.slow
def test_train_two_processes_match_one_and_only_one_writes(train_data_dir, tmp_path):
    one = train.train(run_config(train_data_dir, tmp_path / "one", max_iters=4, eval_interval=2))
    cwds = [tmp_path / "p0", tmp_path / "p1"]
    for cwd in cwds:
        cwd.mkdir()
    config = {k: v for k, v in run_config(train_data_dir, "out", max_iters=4, eval_interval=2).items()}
    procs = train_processes(config, cwds, free_port())  # out_dir "out": each process's own, if it wrote
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    records = [json.loads(line) for line in (cwds[0] / "out" / "metrics.jsonl").read_text().splitlines()]
    np.testing.assert_allclose([r["val_loss"] for r in records], [e["val_loss"] for e in one["evals"]], rtol=1e-5)
    assert not (cwds[1] / "out").exists()  # process 1 wrote nothing
    # a process that dies takes the other down in bounded time, and the last checkpoint stays good
    shutil.rmtree(cwds[0] / "out")  # so that the checkpoint waited for below is the new run's
    procs = train_processes({**config, "max_iters": 100000}, cwds, free_port())
    deadline = time.monotonic() + 120
    while not (cwds[0] / "out" / "ckpt.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    procs[1].kill()
    t = time.monotonic()
    procs[0].communicate(timeout=150)
    assert procs[0].returncode != 0 and time.monotonic() - t < 30  # GPTJAX_HEARTBEAT_TIMEOUT: 5 s, not jax's 100
    procs[1].communicate()
    assert outdir.read_checkpoint_meta(cwds[0] / "out" / "ckpt.safetensors")["iter"] >= 2


@pytest.mark.slow
def test_train_processes_agree_on_the_step_a_signal_stops(train_data_dir, tmp_path):
    # SIGTERM reaches one process of two: both stop at the same step and one whole checkpoint results
    cwds = [tmp_path / "p0", tmp_path / "p1"]
    for cwd in cwds:
        cwd.mkdir()
    config = run_config(train_data_dir, "out", max_iters=100000, eval_interval=5, checkpoint_interval_minutes=0)
    procs = train_processes(config, cwds, free_port())
    deadline = time.monotonic() + 120
    while not (cwds[0] / "out" / "ckpt.safetensors").exists() and time.monotonic() < deadline:
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGTERM)  # the process that does not write
    outs = [proc.communicate(timeout=120) for proc in procs]
    assert [proc.returncode for proc in procs] == [143, 143], [err[-2000:] for _, err in outs]
    meta = outdir.read_checkpoint_meta(cwds[0] / "out" / "ckpt.safetensors")
    assert meta["iter"] % 5 != 0 or "stopped by SIGTERM" in outs[0][0]
    assert f"stopped by SIGTERM at iteration {meta['iter']}" in outs[0][0]


# ------------------------------------------------------------------------------- pretrained models, finetuning and LoRA

@pytest.mark.slow
def test_train_lora_trains_adapters_only_resumes_bitwise_and_merges_into_out_dir(tmp_path, capsys):
    model = tmp_path / "gpt2-tiny"
    shutil.copytree(TINY_TF, model, ignore=shutil.ignore_patterns(weights.CACHE_NAME))
    text = tmp_path / "sonnets.txt"
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    config = {"init_from": str(model), "dataset": str(text), "data_dir": str(tmp_path / "data"), "block_size": 32,
              "batch_size": 4, "max_iters": 8, "eval_interval": 4, "eval_iters": 2, "learning_rate": 1e-2,
              "decay_lr": False, "dropout": 0.1, "lora_rank": 4, "lora_targets": "attn.c_attn,mlp.c_fc"}
    straight = train.train({**config, "out_dir": str(tmp_path / "a")})
    val = [e["val_loss"] for e in straight["evals"]]
    assert val[-1] < val[0] - 0.1, val
    _, base = weights.load_hparams_and_params(model)
    plain = train.train({**config, "out_dir": str(tmp_path / "base"), "lora_rank": 0, "max_iters": 0})
    assert straight["evals"][0]["val_loss"] == pytest.approx(plain["evals"][0]["val_loss"], rel=1e-6)  # B = 0
    # the checkpoint holds the adapters and their optimizer state only, and names the base model
    ckpt = ckpt_tensors(tmp_path / "a")
    assert {n.split("/")[-1] for n in ckpt if n.startswith("params/")} == {"lora_a", "lora_b"}
    n_adapters = 2 * (16 * 4 + 4 * 48 + 16 * 4 + 4 * 64)  # 2 layers
    assert sum(x.size for n, x in ckpt.items() if n.startswith("params/")) == n_adapters
    assert outdir.read_checkpoint_meta(tmp_path / "a" / "ckpt.safetensors")["base"] == str(model.resolve())
    # out_dir's model is the base with the adapters merged: untargeted weights bitwise the base's
    _, merged = weights.load_hparams_and_params(tmp_path / "a")
    merged, base = flat_params(merged), flat_params(base)
    for name in base:
        if name.endswith("c_attn/w") or name.endswith("c_fc/w"):
            a = ckpt[f"params/h/{name[2:-2]}/lora_a"].astype(np.float64)
            b = ckpt[f"params/h/{name[2:-2]}/lora_b"].astype(np.float64)
            np.testing.assert_allclose(merged[name], base[name] + (16 / 4) * a @ b, atol=1e-6, err_msg=name)
            assert not np.array_equal(merged[name], base[name])
        else:
            np.testing.assert_array_equal(merged[name], base[name], err_msg=name)
    # resume is bitwise
    train.train({**config, "out_dir": str(tmp_path / "b"), "max_iters": 4})
    train.train({"init_from": "resume", "out_dir": str(tmp_path / "b"), "max_iters": 8})
    resumed = ckpt_tensors(tmp_path / "b")
    assert resumed.keys() == ckpt.keys()
    for name in ckpt:
        np.testing.assert_array_equal(resumed[name], ckpt[name], err_msg=name)
    # frozen weights held in bfloat16: trains as well, to bfloat16's rounding of the base
    low = train.train({**config, "out_dir": str(tmp_path / "bf16"), "lora_base_dtype": "bfloat16"})
    assert [e["val_loss"] for e in low["evals"]] == pytest.approx(val, rel=2e-3)
    # main.py generates from it as from any model folder
    capsys.readouterr()
    assert main.main(["--model_dir", str(tmp_path / "a"), "--prompt", "ROMEO:", "--greedy",
                      "--n_tokens_to_generate", "5"]) == 0
    assert capsys.readouterr().out.strip()


def test_train_finetunes_a_character_model_in_its_own_vocabulary(train_data_dir, tmp_path, capsys):
    # a character model of train.py's, given as --init_from=FOLDER: its vocabulary is read from the folder (it was
    # taken for GPT-2's tokens and refused); the finetune starts from its weights and stays a character model
    base, tuned = tmp_path / "base", tmp_path / "tuned"
    train.train(run_config(train_data_dir, base, max_iters=2, eval_interval=2))
    result = train.train(run_config(train_data_dir, tuned, init_from=str(base), max_iters=2, eval_interval=2))
    base_hparams, _ = weights.load_hparams_and_params(base)
    hparams, _ = weights.load_hparams_and_params(tuned)
    assert hparams == base_hparams and json.loads((tuned / "meta.json").read_text()) == json.loads(
        (base / "meta.json").read_text())
    # from the base model's weights, not new ones: its first evaluation is the base model's
    base_eval = train.train({"init_from": str(base), "out_dir": str(tmp_path / "e"), "eval_only": True,
                             "data_dir": str(train_data_dir), "eval_iters": TINY_RUN["eval_iters"],
                             "batch_size": TINY_RUN["batch_size"], "block_size": TINY_RUN["block_size"]})
    assert result["evals"][0]["val_loss"] == base_eval["evals"][0]["val_loss"]
    # text of other characters: refused in one line
    (tmp_path / "other.txt").write_text("0123456789 " * 400)
    capsys.readouterr()
    code = train.main([f"--init_from={base}", f"--out_dir={tmp_path / 'o'}", f"--data_dir={tmp_path / 'data'}",
                       f"--dataset={tmp_path / 'other.txt'}", "--max_iters=1"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1, err
    assert "another character vocabulary (11 characters) than the model (65)" in err


def test_train_finetune_gpt2_fixture_lowers_the_loss(tmp_path):
    model = tmp_path / "gpt2-tiny"
    shutil.copytree(TINY_TF, model)  # weights.py writes its converted cache beside the checkpoint
    text = tmp_path / "sonnets.txt"
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    result = train.train({"init_from": str(model), "dataset": str(text), "data_dir": str(tmp_path / "data"),
                          "out_dir": str(tmp_path / "out"), "block_size": 32, "batch_size": 4, "max_iters": 16,
                          "eval_interval": 8, "eval_iters": 4, "learning_rate": 3e-3, "decay_lr": False,
                          "dropout": 0.0})
    val = [e["val_loss"] for e in result["evals"]]
    assert val[0] > 10 and val[-1] < val[0] - 0.5, val  # the random fixture predicts badly; training helps
    # the dataset was tokenized with the model's vocabulary (auto: gpt2 when finetuning)
    assert json.loads((tmp_path / "data" / "sonnets_gpt2" / "meta.json").read_text()) == {"kind": "gpt2"}
    # out_dir is a model folder: the fixture's hparams, biases kept, GPT-2's vocabulary
    enc, hparams, params = weights.load_encoder_hparams_and_params(str(tmp_path / "out"))
    assert hparams == json.loads((TINY_TF / "hparams.json").read_text())
    assert enc.n_vocab == 50257 and "b" in params["h"]["attn"]["c_attn"]
    initial = weights.load_hparams_and_params(model)[1]
    assert not np.allclose(params["wte"], initial["wte"])


def test_train_lora_resume_needs_its_own_base(tmp_path, capsys):
    model = tmp_path / "gpt2-tiny"
    shutil.copytree(TINY_TF, model, ignore=shutil.ignore_patterns(weights.CACHE_NAME))
    text = tmp_path / "sonnets.txt"
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    out = tmp_path / "out"
    config = {"init_from": str(model), "dataset": str(text), "data_dir": str(tmp_path / "data"), "block_size": 32,
              "batch_size": 4, "max_iters": 2, "eval_interval": 2, "eval_iters": 2, "lora_rank": 4,
              "out_dir": str(out)}
    train.train(config)
    # the base replaced by another model of the same shape: refused (training on would adapt the wrong model)
    flat = reference_params()
    flat["h/mlp/c_fc/w"] = flat["h/mlp/c_fc/w"] + np.float32(0.01)
    write_bundle(model / "model.ckpt", tf_tensors(flat))
    code = train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=4"])
    err = capsys.readouterr().err
    assert code == 1 and "is not the LoRA base" in err and "--lora_base" in err, err
    # the original, moved: pointed to with --lora_base, and from then on found there
    moved = tmp_path / "moved"
    shutil.copytree(TINY_TF, moved, ignore=shutil.ignore_patterns(weights.CACHE_NAME))
    shutil.rmtree(model)
    code = train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=4"])
    assert code == 1 and "--lora_base=FOLDER" in capsys.readouterr().err
    assert train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=4", f"--lora_base={moved}"]) == 0
    assert outdir.read_checkpoint_meta(out / "ckpt.safetensors")["base"] == str(moved.resolve())
    assert train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=6"]) == 0


def test_train_token_ids_must_be_the_models(train_data_dir, tmp_path, capsys):
    # an id past the model's vocabulary would train silently (a gather is clamped): refused at start, naming the file
    out = tmp_path / "out"
    train.train(run_config(train_data_dir, out, max_iters=2, eval_interval=2))
    wide = tmp_path / "data" / "wide"
    shutil.copytree(train_data_dir / "shakespeare_char", wide)
    tokens = np.fromfile(wide / "train.bin", np.uint16)
    tokens[1234] = 60000
    tokens.tofile(wide / "train.bin")
    for init_from in ("scratch", "resume"):
        code = train.main([f"--out_dir={out}", "--dataset=wide", f"--data_dir={tmp_path / 'data'}", "--max_iters=4",
                           f"--init_from={init_from}", "--overwrite"])
        err = capsys.readouterr().err.strip().splitlines()[-1]
        assert code == 1 and f"{wide / 'train.bin'} holds token id 60000" in err and "65 tokens" in err, err
    # a copied checkpoint (no meta.json beside it) resumed on a dataset of another vocabulary is refused too
    other = tmp_path / "other.txt"
    other.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:50_000] + "é€")
    data.prepare(str(other), tmp_path / "data", "char")
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(out / "ckpt.safetensors", copy)
    code = train.main(["--init_from=resume", f"--out_dir={copy}", f"--dataset={other}", "--max_iters=4",
                       f"--data_dir={tmp_path / 'data'}"])
    err = capsys.readouterr().err
    assert code == 1 and "another character vocabulary" in err, err
    assert sorted(p.name for p in copy.iterdir()) == [".gptjax-run", ".lock", "ckpt.safetensors"]


@pytest.mark.slow
def test_train_char_model_folder_samples(train_data_dir, tmp_path):
    out = tmp_path / "out"
    train.train(run_config(train_data_dir, out, max_iters=2, eval_interval=2))
    assert json.loads((out / "meta.json").read_text()) == {"kind": "char",
                                                         "chars": sorted(set(SHAKESPEARE.read_text()))}
    enc, hparams, params = weights.load_encoder_hparams_and_params(str(out))
    assert hparams == {"n_vocab": 65, "n_ctx": 32, "n_embd": 32, "n_head": 2, "n_layer": 2}
    assert enc.decode(enc.encode("ROMEO:")) == "ROMEO:"
    if (HERE / "main.py").exists():
        proc = subprocess.run([sys.executable, str(HERE / "main.py"), "--model_dir", str(out), "--prompt", "ROMEO:",
                               "--n_tokens_to_generate", "12", "--seed", "1"], capture_output=True, text=True,
                              cwd=HERE, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert len(proc.stdout.strip()) > 0


# ------------------------------------------------------------- stopping: NaN, Ctrl-C, a scheduler's signal, a full disk

def test_train_nan_loss_stops_and_keeps_the_last_good_checkpoint(train_data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    train.train(run_config(train_data_dir, out, max_iters=2, eval_interval=2))
    good = (out / "ckpt.safetensors").read_bytes()
    code = train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=50", "--eval_interval=50",
                       "--learning_rate=1e9", "--warmup_iters=0", "--grad_clip=0"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and err.startswith("error: loss is nan at iteration") and "last good checkpoint" in err, err
    assert (out / "ckpt.safetensors").read_bytes() == good


def test_train_ctrl_c_saves_a_checkpoint_and_resumes(train_data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    get_batch, calls = data.get_batch, []

    def get_batch_then_ctrl_c(*args):  # Ctrl-C arrives while iteration 3's batch is being drawn
        calls.append(1)
        if len(calls) == 2 + 4:  # 2 evaluation batches (train, val) at iteration 0, then iterations 0..3
            signal.raise_signal(signal.SIGINT)
        return get_batch(*args)
    monkeypatch.setattr(data, "get_batch", get_batch_then_ctrl_c)
    result = train.train(run_config(train_data_dir, out, max_iters=100, eval_interval=50))
    monkeypatch.undo()
    assert result["interrupted"] and result["iter"] == 4
    assert outdir.read_checkpoint_meta(out / "ckpt.safetensors")["iter"] == 4
    assert (out / "params.safetensors").is_file()  # samplable even before the first evaluation
    resumed = train.train({"init_from": "resume", "out_dir": str(out), "max_iters": 6})
    assert sorted(resumed["losses"]) == [4, 5]
    straight = train.train(run_config(train_data_dir, tmp_path / "straight", max_iters=6, eval_interval=50))
    interrupted_then_resumed = {**result["losses"], **resumed["losses"]}
    assert [interrupted_then_resumed[i] for i in range(6)] == [straight["losses"][i] for i in range(6)]


def test_train_ctrl_c_is_acknowledged_and_a_second_one_stops_at_once(train_data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    train.train(run_config(train_data_dir, out, max_iters=2, eval_interval=2))
    good = (out / "ckpt.safetensors").read_bytes()
    get_batch, calls, said = data.get_batch, [], []

    def get_batch_then_two_ctrl_c(*args):
        calls.append(1)
        if len(calls) == 3:  # iteration 3's batch
            signal.raise_signal(signal.SIGINT)
            said.append(capsys.readouterr())
            assert "Ctrl-C: stopping after this step" in said[-1].out  # said at once
            signal.raise_signal(signal.SIGINT)
        return get_batch(*args)
    monkeypatch.setattr(data, "get_batch", get_batch_then_two_ctrl_c)
    code = train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=50", "--eval_interval=50"])
    err = capsys.readouterr().err.strip().splitlines()
    assert f"resuming from iteration 2 of {out / 'ckpt.safetensors'}\n" in said[0].err
    assert code == 130 and err[-1] == (f"error: stopped at once by a second Ctrl-C; nothing was saved (the last good "
                                       f"checkpoint is {out / 'ckpt.safetensors'})"), err
    assert not [line for line in err if "Traceback" in line]
    assert (out / "ckpt.safetensors").read_bytes() == good
    calls.clear()  # a new run stopped so before its first checkpoint claims none
    fresh = tmp_path / "fresh"
    assert train.main([f"--{k}={v}" for k, v in run_config(train_data_dir, fresh, max_iters=50).items()]) == 130
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].endswith("nothing was saved (no checkpoint had been saved yet)"), err
    assert "resuming" not in said[-1].err
    assert not (fresh / "ckpt.safetensors").exists()


@pytest.mark.slow
def test_train_a_ctrl_c_after_the_save_is_let_pass(train_data_dir, tmp_path):
    # train.py as users run it: Ctrl-C, and again as soon as it says it saved: the run closes as it was closing
    # (exit 130, the checkpoint whole), without a traceback from wherever the second one landed (tqdm's clean-up)
    args = [f"--{k}={v}" for k, v in run_config(train_data_dir, tmp_path / "out", max_iters=10**6,
                                                  eval_interval=10**6).items()]
    proc = subprocess.Popen([sys.executable, str(HERE / "train.py"), *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=HERE, env={**os.environ, "PYTHONUNBUFFERED": "1"})

    def read_until(words, out, pause):  # stdout so far, read without blocking, until it holds words
        while words not in out and time.monotonic() < deadline:
            try:
                out += os.read(proc.stdout.fileno(), 1 << 16).decode()
            except BlockingIOError:
                time.sleep(pause)
        return out
    try:
        os.set_blocking(proc.stdout.fileno(), False)
        deadline = time.monotonic() + 120
        out = read_until("after the first step", "", 0.05)  # training has begun
        proc.send_signal(signal.SIGINT)
        out = read_until("saved", out, 0.0005)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
        err = err.decode()
    finally:
        proc.kill()
    assert proc.returncode == 130 and "stopped by Ctrl-C" in out, err[-2000:]
    assert "Traceback" not in err and "Exception ignored" not in err, err[-2000:]
    assert outdir.read_checkpoint_meta(tmp_path / "out" / "ckpt.safetensors")["iter"] > 0


@pytest.mark.slow
def test_train_a_schedulers_signal_saves_and_the_resume_is_the_uninterrupted_run(train_data_dir, tmp_path,
                                                                                monkeypatch, capsys):
    # SIGTERM (SLURM, Kubernetes, spot machines), SIGUSR1 or SIGHUP: the step finishes, a checkpoint is saved, the
    # exit code is 128 + the signal; resuming gives the losses of a run that never stopped, bitwise
    straight = train.train(run_config(train_data_dir, tmp_path / "straight", max_iters=8, eval_interval=8))
    get_batch = data.get_batch
    for signum in (signal.SIGTERM, signal.SIGUSR1, signal.SIGHUP):
        out, calls = tmp_path / signal.Signals(signum).name, []

        def get_batch_then_signal(*args, signum=signum, calls=calls):
            calls.append(1)
            if len(calls) == 2 + 4:  # the evaluation's two batches at iteration 0, then iteration 3's batch
                signal.raise_signal(signum)
            return get_batch(*args)
        monkeypatch.setattr(data, "get_batch", get_batch_then_signal)
        args = [f"--{k}={v}" for k, v in run_config(train_data_dir, out, max_iters=8, eval_interval=8).items()]
        assert train.main(args) == 128 + signum
        monkeypatch.undo()
        captured = capsys.readouterr()
        assert f"{signal.Signals(signum).name}: stopping after this step" in captured.out
        assert "continue with --init_from=resume" in captured.out
        assert outdir.read_checkpoint_meta(out / "ckpt.safetensors")["iter"] == 4
    resumed = train.train({"init_from": "resume", "out_dir": str(tmp_path / "SIGTERM"), "max_iters": 8})
    assert [resumed["losses"][i] for i in range(4, 8)] == [straight["losses"][i] for i in range(4, 8)]
    assert resumed["evals"][-1]["val_loss"] == straight["evals"][-1]["val_loss"]
    # a second signal stops at once, saving nothing, with 128 + that signal
    calls.clear()

    def get_batch_then_two_signals(*args):
        calls.append(1)
        if len(calls) == 3:
            signal.raise_signal(signal.SIGTERM)
            signal.raise_signal(signal.SIGTERM)
        return get_batch(*args)
    monkeypatch.setattr(data, "get_batch", get_batch_then_two_signals)
    good = (tmp_path / "SIGTERM" / "ckpt.safetensors").read_bytes()
    assert train.main(["--init_from=resume", f"--out_dir={tmp_path / 'SIGTERM'}", "--max_iters=20"]) == 143
    assert "stopped at once by a second SIGTERM; nothing was saved" in capsys.readouterr().err
    assert (tmp_path / "SIGTERM" / "ckpt.safetensors").read_bytes() == good


@pytest.mark.slow
def test_train_a_stop_during_an_evaluation_saves_and_the_resume_redoes_it(train_data_dir, tmp_path, monkeypatch,
                                                                          capsys):
    # a signal during an evaluation, the final one included, ends like any other stop: a checkpoint at that iteration
    # and exit 128 + the signal; the same command line again (a requeued job) redoes the evaluation, records it once
    # and judges the model by it: the metrics, the best val loss and the model are the uninterrupted run's
    config = dict(max_iters=4, eval_interval=2, auto_resume=True)
    straight = train.train(run_config(train_data_dir, tmp_path / "straight", **config))
    scores = lambda out: [(r["iter"], r["train_loss"], r["val_loss"]) for r in outdir.read_metrics(out)]
    get_batch = data.get_batch
    # get_batch's calls: the evaluation at 0 (train, then val), steps 0 and 1, the evaluation at 2, steps 2 and 3, ...
    for at, nth_call in ((2, 5), (2, 6), (4, 9)):  # during the evaluation at 2 (its train, its val batches), at 4
        out, calls = tmp_path / f"{at}-{nth_call}", []

        def get_batch_then_signal(*args, calls=calls, nth_call=nth_call):
            calls.append(1)
            if len(calls) == nth_call:
                signal.raise_signal(signal.SIGTERM)
            return get_batch(*args)
        monkeypatch.setattr(data, "get_batch", get_batch_then_signal)
        args = [f"--{k}={v}" for k, v in run_config(train_data_dir, out, **config).items()]
        assert train.main(args) == 143
        monkeypatch.undo()
        assert f"stopped by SIGTERM at iteration {at}: saved" in capsys.readouterr().out
        meta = outdir.read_checkpoint_meta(out / "ckpt.safetensors")
        assert (meta["iter"], meta["eval_pending"]) == (at, True)
        assert [r[0] for r in scores(out)] == [i for i in (0, 2) if i < at]  # the cut evaluation recorded nothing
        assert train.main(args) == 0
        said = f"resuming from iteration {at} of {out / 'ckpt.safetensors'}, redoing its evaluation at iteration {at}"
        assert said in capsys.readouterr().err
        assert scores(out) == scores(tmp_path / "straight")
        meta = outdir.read_checkpoint_meta(out / "ckpt.safetensors")
        assert (meta["iter"], meta["eval_pending"]) == (4, False)
        assert meta["best_val_loss"] == min(e["val_loss"] for e in straight["evals"])
        assert (out / "params.safetensors").read_bytes() == (tmp_path / "straight" / "params.safetensors").read_bytes()
        assert train.main(args) == 0 and "this run has finished" in capsys.readouterr().err


def test_train_full_disk_is_one_line_and_keeps_the_checkpoint(train_data_dir, tmp_path):
    out = tmp_path / "out"
    train.train(run_config(train_data_dir, out, max_iters=2, eval_interval=2))
    good = (out / "ckpt.safetensors").read_bytes()
    proc = run_program("train_disk_full.py", len(good) // 2, "--init_from=resume", f"--out_dir={out}",
                       "--max_iters=4", timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert lines[-1] == (f"error: cannot write {out / 'ckpt.safetensors'}: File too large (its previous version is "
                         f"intact)"), lines[-1]
    assert (out / "ckpt.safetensors").read_bytes() == good
    assert not [p.name for p in out.iterdir() if p.name.endswith(".part")]


# --------------------------------------------------- out_dir: what a run writes, refuses and leaves alone; what it says

def test_train_refuses_to_replace_a_trained_model(train_data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    train.train(run_config(train_data_dir, out, max_iters=2, eval_interval=2))
    before = folder_state(out)
    capsys.readouterr()
    for init_from in ("scratch", str(TINY_TF)):
        code = train.main([f"--out_dir={out}", f"--data_dir={train_data_dir}", f"--init_from={init_from}"])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1, err
        assert all(w in err for w in ("already holds a trained model", "--init_from=resume", "--out_dir",
                                      "--overwrite"))
    assert folder_state(out) == before
    # a run's folder holding its model but no checkpoint (removed to save space, say) is a trained model all the same
    model_only = tmp_path / "model-only"
    shutil.copytree(out, model_only)
    (model_only / "ckpt.safetensors").unlink()
    kept = folder_state(model_only)
    assert train.main([f"--out_dir={model_only}", f"--data_dir={train_data_dir}"]) == 1
    assert "already holds a trained model (params.safetensors)" in capsys.readouterr().err
    assert folder_state(model_only) == kept
    # asked to, a new run replaces the old one whole: none of its files mixes with the new run's
    (out / "loss.png").write_bytes(b"the old run's plot")
    result = train.train(run_config(train_data_dir, out, max_iters=1, eval_interval=1, overwrite=True, seed=7))
    assert [json.loads(line)["iter"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [0, 1]
    assert not (out / "loss.png").exists() or (out / "loss.png").read_bytes() != b"the old run's plot"
    assert outdir.read_checkpoint_meta(out / "ckpt.safetensors")["iter"] == 1 and result["iter"] == 1


def test_train_out_dir_holds_only_the_runs_vocabulary(tmp_path, train_data_dir):
    # a character run in a folder that once held a GPT-2 run (and the other way round) leaves one vocabulary there
    out, chars = tmp_path / "out", tmp_path / "chars"
    out.mkdir()
    for name in encoder.GPT2_FILES:
        shutil.copy(TINY_TF / name, out / name)
    chars.mkdir()
    data.write_meta(chars, {"kind": "char", "chars": ["a", "b"]})
    outdir.write_vocabulary(out, chars)
    assert sorted(p.name for p in out.iterdir()) == ["meta.json"]
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    data.copy_gpt2_vocab(TINY_TF, gpt2)
    data.write_meta(gpt2, {"kind": "gpt2"})
    outdir.write_vocabulary(out, gpt2)
    assert sorted(p.name for p in out.iterdir()) == ["encoder.json", "vocab.bpe"]


def test_train_a_second_run_on_the_same_out_dir_is_refused(train_data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    holder = subprocess.Popen([sys.executable, str(PROGRAMS / "lock_holder.py"), str(out / ".lock")], cwd=HERE,
                              stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(HERE)})
    try:
        assert holder.stdout.readline() == "locked\n"
        code = train.main([f"--out_dir={out}", f"--data_dir={train_data_dir}", "--max_iters=1"])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and "in use by another train.py" in err, err
        assert f"process {holder.pid}" in err and not (out / "metrics.jsonl").exists()
    finally:
        holder.kill()  # as a crash would: the system drops the lock with the process
        holder.wait()
    result = train.train(run_config(train_data_dir, out, max_iters=1, eval_interval=1))
    assert result["iter"] == 1


def test_train_never_writes_through_a_link_planted_in_out_dir(train_data_dir, tmp_path):
    out, victim = tmp_path / "out", tmp_path / "victim.txt"
    train.train(run_config(train_data_dir, out, max_iters=2, eval_interval=2))
    victim.write_text("someone else's file")
    checkpoint = (out / "ckpt.safetensors").read_bytes()
    for name in (".lock", "metrics.jsonl", "loss.png", f".ckpt.safetensors.{os.getpid()}.part"):
        planted = out / name
        planted.unlink(missing_ok=True)
        planted.symlink_to(victim)
        try:
            train.train({"init_from": "resume", "out_dir": str(out), "max_iters": 4, "eval_interval": 2})
        except OSError as e:  # a link where gptjax writes is refused at the start, in one line that names it
            assert f"{planted} is a symbolic link" in str(e) and "\n" not in str(e), e
            assert (out / "ckpt.safetensors").read_bytes() == checkpoint  # refused before it trained
        else:  # a stale temporary's name is replaced, not followed
            assert name.endswith(".part") and not planted.exists()
        assert victim.read_text() == "someone else's file", name
        planted.unlink(missing_ok=True)


def test_train_a_plot_that_cannot_be_written_is_a_warning(train_data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    train.train(run_config(train_data_dir, out, max_iters=2, eval_interval=2))
    (out / "loss.png").unlink(missing_ok=True)
    (out / "loss.png").mkdir()  # what the picture cannot replace, as a full disk cannot be written
    assert train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=4", "--eval_interval=2"]) == 0
    err = capsys.readouterr().err
    assert err.count("warning: loss.png was not updated") == 1 and "Traceback" not in err, err
    assert outdir.read_checkpoint_meta(out / "ckpt.safetensors")["iter"] == 4


def test_train_leaves_alone_files_it_did_not_write(train_data_dir, tmp_path, monkeypatch, capsys):
    # a folder of the user's (GPT-2's vocabulary, say) is not a run's out_dir; an empty out_dir is none; a run that
    # cannot start (a mistyped dataset) leaves the model it was to replace intact
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("encoder.json", "vocab.bpe", "notes.txt"):
        (mine / name).write_text(name)
    before = folder_state(mine)
    checkout_like = tmp_path / "testdata"  # files of any name, as testdata/ or corpora/ of the checkout
    (checkout_like / "eval").mkdir(parents=True)
    (checkout_like / "README.md").write_text("mine")
    for out_dir, words in ((mine, "which train.py did not write"), ("", "out_dir is empty"), (" ", "out_dir is empty"),
                           (checkout_like, "holds README.md, eval, which train.py did not write")):
        code = train.main([f"--out_dir={out_dir}", f"--data_dir={train_data_dir}", "--max_iters=1", "--overwrite"])
        err = capsys.readouterr().err
        assert code in (1, 2) and err.count("\n") == 1 and words in err, err
    assert folder_state(mine) == before and sorted(p.name for p in checkout_like.iterdir()) == ["README.md", "eval"]
    out = tmp_path / "out"
    train.train(run_config(train_data_dir, out, max_iters=2, eval_interval=2))
    model = folder_state(out)
    code = train.main([f"--out_dir={out}", f"--data_dir={train_data_dir}", "--overwrite", "--dataset=shakespear_char"])
    assert code == 2 and "no dataset 'shakespear_char'" in capsys.readouterr().err
    assert folder_state(out) == model


def test_train_an_unwritable_out_dir_fails_at_start(train_data_dir, tmp_path, monkeypatch, capsys):
    # resuming into an out_dir that can no longer be written fails before any step, not an eval interval later
    out = tmp_path / "out"
    train.train(run_config(train_data_dir, out, max_iters=2, eval_interval=2))
    open_fd = files.open_fd

    def read_only(path, flags):  # as a read-only file system answers (root writes through chmod, so not that)
        if pathlib.Path(path).parent == out and flags & os.O_CREAT and not str(path).endswith(".lock"):
            raise PermissionError(13, "Read-only file system")
        return open_fd(path, flags)
    monkeypatch.setattr(files, "open_fd", read_only)
    monkeypatch.setattr(data, "get_batch", lambda *a: pytest.fail("a step ran"))
    capsys.readouterr()
    code = train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=4"])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"error: cannot write {out / outdir.MARKER}: Read-only file system"), err
    assert err.count("\n") == 1


@pytest.mark.slow
def test_train_says_only_what_is_true(train_data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    # a NaN before any checkpoint: no "last good checkpoint" that does not exist
    code = train.main([f"--out_dir={out}", f"--data_dir={train_data_dir}", "--learning_rate=1e9", "--warmup_iters=0",
                       "--grad_clip=0", "--max_iters=20", "--eval_interval=50", "--n_layer=1", "--n_embd=16"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert code == 1 and "no checkpoint had been saved yet" in err and "last good" not in err, err
    # Ctrl-C before the first step: it says nothing was saved, and saves nothing
    shutil.rmtree(out)

    def ctrl_c_at_once(*args):
        signal.raise_signal(signal.SIGINT)
        return get_batch(*args)
    get_batch = data.get_batch
    monkeypatch.setattr(data, "get_batch", ctrl_c_at_once)
    code = train.main([f"--out_dir={out}", f"--data_dir={train_data_dir}", "--max_iters=5"])
    assert code == 130 and "before any step: nothing to save" in capsys.readouterr().out
    assert not (out / "ckpt.safetensors").exists()
    monkeypatch.undo()
    # Ctrl-C while starting: one line that says so, no "second Ctrl-C"
    monkeypatch.setattr(data, "prepare", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    code = train.main([f"--out_dir={out}", f"--data_dir={train_data_dir}", "--max_iters=5"])
    assert code == 130 and capsys.readouterr().err == "error: interrupted (Ctrl-C)\n"
    monkeypatch.undo()
    # max_iters=0 writes the model as it starts; a finished run says where it is; a resume with nothing to do says so
    shutil.rmtree(out)
    assert train.main([f"--out_dir={out}", f"--data_dir={train_data_dir}", "--max_iters=0"]) == 0
    assert (out / "params.safetensors").is_file() and outdir.read_checkpoint_meta(out / "ckpt.safetensors")["iter"] == 0
    assert "done: best val loss" in capsys.readouterr().out
    code = train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=0"])
    assert code == 2 and "nothing to train; give a larger --max_iters" in capsys.readouterr().err
    # config files take finite numbers only, as flags do
    for value in ("nan", "inf", "1e400"):
        (tmp_path / "c.toml").write_text(f"learning_rate = {value}\n")
        with pytest.raises(cli.UsageError, match="finite"):
            train_config.parse_args([str(tmp_path / "c.toml")])


# -------------------------------------------------------------------------------------- tracking: wandb and TensorBoard

def tensorboard_scalars(logdir, tag):  # (step, value) pairs, read by TensorBoard's own reader
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(logdir))
    events.Reload()
    return [(e.step, e.value) for e in events.Scalars(tag)]


def wandb_history(out_dir):  # the history records of every offline W&B run file under out_dir, read back
    from wandb.proto import wandb_internal_pb2
    rows, run_ids = [], set()
    for path in sorted(pathlib.Path(out_dir).glob("wandb/offline-run-*/run-*.wandb")):
        blob = path.read_bytes()  # a LevelDB-style log after a 7-byte header (":W&B", magic, version)
        assert blob[:4] == b":W&B"
        pos, pending = 7, b""
        while pos + 7 <= len(blob):
            if 32768 - pos % 32768 < 7:  # a block's tail too short for a record header is padding
                pos += 32768 - pos % 32768
                continue
            length, kind = int.from_bytes(blob[pos + 4:pos + 6], "little"), blob[pos + 6]
            pending += blob[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):  # a whole record, or the last piece of one
                record = wandb_internal_pb2.Record()
                record.ParseFromString(pending)
                pending = b""
                if record.WhichOneof("record_type") == "history":
                    rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                 for item in record.history.item})
                elif record.WhichOneof("record_type") == "run":
                    run_ids.add(record.run.run_id)
    return rows, run_ids


@pytest.mark.slow
def test_train_logs_to_wandb_and_tensorboard_across_a_resume(train_data_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    config = run_config(train_data_dir, out, max_iters=4, eval_interval=2, wandb_log=True, tensorboard_log=True,
                        wandb_run_name="tiny")
    # the resume starts within the same second, as fast runs do (tensorboardX's file names count whole seconds)
    import tensorboardX.event_file_writer
    monkeypatch.setattr(tensorboardX.event_file_writer, "time", type("Clock", (), {"time": lambda: 1.7e9}))
    train.train(config)
    train.train({"init_from": "resume", "out_dir": str(out), "max_iters": 6})
    metrics = outdir.read_metrics(out)
    for tag, key in (("train/loss", "train_loss"), ("val/loss", "val_loss"), ("lr", "lr")):
        assert tensorboard_scalars(out / "tensorboard", tag) == [(r["iter"], pytest.approx(r[key], rel=1e-6))
                                                                 for r in metrics], tag
    rows, run_ids = wandb_history(out)
    assert len(run_ids) == 1  # the resumed run continues the same W&B run
    assert [(row["_step"], row["val/loss"]) for row in rows] == [(r["iter"], r["val_loss"]) for r in metrics], rows
    # a tracker that fails mid-run warns once, and training goes on
    import tensorboardX
    monkeypatch.setattr(tensorboardX.SummaryWriter, "add_scalar", lambda *a, **k: (_ for _ in ()).throw(
        OSError(28, "No space left on device")))
    result = train.train({"init_from": "resume", "out_dir": str(out), "max_iters": 10, "wandb_log": False})
    assert result["iter"] == 10 and capsys.readouterr().err.count("warning: tensorboard failed") == 1
    # asking for a tracker that is not installed fails at start, naming the extra
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    assert train.main([f"--out_dir={tmp_path / 'w'}", f"--data_dir={train_data_dir}", "--wandb_log"]) == 2
    assert 'wandb_log needs wandb: pip install -e ".[track]"' in capsys.readouterr().err


@pytest.mark.slow
def test_trackers_that_cannot_start_warn_and_the_run_goes_on(train_data_dir, tmp_path, capsys):
    # W&B online without an API key (a fresh process: wandb keeps its settings in the process), a file or a link
    # where TensorBoard's folder goes: one warning line each, naming the tracker, and the run trains and saves;
    # nothing is written through the link
    env = {"WANDB_MODE": "online", "WANDB_API_KEY": "", "WANDB_CONFIG_DIR": str(tmp_path / "wandb-config"),
           "WANDB_SILENT": "true"}
    out = tmp_path / "file"
    train.train(run_config(train_data_dir, out, max_iters=2, eval_interval=2))
    (out / "tensorboard").write_text("mine")
    proc = run_train_cli("--init_from=resume", f"--out_dir={out}", "--max_iters=4", "--wandb_log", "--tensorboard_log",
                         env=env)
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert proc.returncode == 0 and len(warnings) == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert warnings[0] == ("warning: wandb could not start (No API key configured. Use `wandb login` to log in.); "
                           "training goes on without it")
    assert warnings[1].startswith("warning: tensorboard could not start (") and "Not a directory" in warnings[1]
    assert (out / "tensorboard").read_text() == "mine"
    elsewhere, out = tmp_path / "elsewhere", tmp_path / "link"
    elsewhere.mkdir()
    train.train(run_config(train_data_dir, out, max_iters=2, eval_interval=2))
    (out / "tensorboard").symlink_to(elsewhere)
    capsys.readouterr()
    assert train.main(["--init_from=resume", f"--out_dir={out}", "--max_iters=4", "--tensorboard_log"]) == 0
    assert f"warning: tensorboard could not start ({out / 'tensorboard'} is a symbolic link" in capsys.readouterr().err
    assert list(elsewhere.iterdir()) == []
    for out in (tmp_path / "file", tmp_path / "link"):
        assert outdir.read_checkpoint_meta(out / "ckpt.safetensors")["iter"] == 4


def test_trackers_keep_to_wandb_dir_and_overwrite_clears_their_folders(train_data_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "out"
    tracked = run_config(train_data_dir, out, max_iters=2, eval_interval=2, wandb_log=True, tensorboard_log=True)
    train.train(tracked)
    assert (out / "wandb").is_dir() and list((out / "tensorboard").iterdir())
    # --overwrite: a new run, without the old run's charts mixed into its folders
    train.train({**tracked, "overwrite": True, "wandb_log": False, "tensorboard_log": False})
    assert not (out / "wandb").exists() and not (out / "tensorboard").exists()
    # WANDB_DIR, when set, is where W&B writes
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb-dir"))
    train.train({**tracked, "overwrite": True, "tensorboard_log": False})
    assert list((tmp_path / "wandb-dir" / "wandb").glob("offline-run-*")) and not (out / "wandb").exists()


# -------------------------------------------------------- data: llm.c token shards, a dataset too small for the context

def write_llmc_shard(path, tokens):  # llm.c's dev/data/data_common.py write_datafile, written out independently
    header = np.zeros(256, dtype=np.int32)
    header[0], header[1], header[2] = 20240520, 1, len(tokens)
    with open(path, "wb") as f:
        f.write(header.tobytes())
        f.write(np.asarray(tokens, dtype=np.uint16).tobytes())


@pytest.mark.slow
def test_train_on_llmc_token_shards_in_place(tmp_path, capsys):
    rng = np.random.default_rng(0)
    shards = tmp_path / "fineweb10B"
    shards.mkdir()
    pieces = {"train": [rng.integers(0, 50257, n) for n in (3000, 1500, 2500)], "val": [rng.integers(0, 50257, 2000)]}
    for split, arrays in pieces.items():
        for i, tokens in enumerate(arrays):
            write_llmc_shard(shards / f"fineweb_{split}_{i:06d}.bin", tokens)
    # batches across all shards, read in place: the windows of the shards' concatenation
    train_tokens = data.load_split(shards, "train", 50257)
    assert len(train_tokens) == 7000
    starts = data.batch_starts(len(train_tokens), 64, 50, 1337, 3, "train")
    whole = np.concatenate(pieces["train"])
    x, y = data.get_batch(train_tokens, starts, 64)
    assert np.array_equal(x, whole[starts[:, None] + np.arange(64)]) and np.array_equal(y[:, -1], whole[starts + 64])
    result = train.train({**TINY_RUN, "dataset": str(shards), "out_dir": str(tmp_path / "out"), "max_iters": 2,
                          "eval_interval": 2})
    assert result["iter"] == 2 and sorted(p.name for p in shards.iterdir()) == sorted(
        f"fineweb_{s}_{i:06d}.bin" for s, arrays in pieces.items() for i in range(len(arrays)))  # nothing added
    # a damaged header is one line naming the file
    blob = (shards / "fineweb_train_000001.bin").read_bytes()
    for bad, words in ((b"\0" * 4 + blob[4:], "is not an llm.c token shard"),
                       (blob[:4] + b"\2" + blob[5:], "version 2"), (blob[:-10], "it is cut or damaged")):
        (shards / "fineweb_train_000001.bin").write_bytes(bad)
        with pytest.raises(ValueError, match=words):
            data.load_split(shards, "train")
    (shards / "fineweb_train_000001.bin").write_bytes(blob)
    # data.py writes gptjax's own datasets as shards, which llm.c's reader (written out here) reads back
    folder = data.prepare(str(SHAKESPEARE), tmp_path / "data", "gpt2")
    assert data.main([str(SHAKESPEARE), "--tokens=gpt2", f"--data_dir={tmp_path / 'data'}",
                      f"--to_shards={tmp_path / 'shards'}"]) == 0
    for split in data.SPLITS:
        paths = sorted((tmp_path / "shards").glob(f"*_{split}_*.bin"))
        read = []
        for path in paths:
            header = np.fromfile(path, dtype=np.int32, count=256)
            assert header[0] == 20240520 and header[1] == 1
            read.append(np.fromfile(path, dtype=np.uint16, offset=1024))
            assert len(read[-1]) == header[2]
        assert np.array_equal(np.concatenate(read), data.load_split(folder, split)), split


def test_a_shard_folder_is_one_whole_dataset(tmp_path, capsys):
    # shards of another dataset beside them, a shard missing from the numbering, a missing val split: refused in one
    # line naming what is wrong (each was read silently, or the folder taken for text); llm.c's own numbering (val 0,
    # train from 1) is whole
    shards = tmp_path / "fineweb10B"
    shards.mkdir()
    rng = np.random.default_rng(0)
    for name in ("fineweb_val_000000.bin", "fineweb_train_000001.bin", "fineweb_train_000002.bin"):
        write_llmc_shard(shards / name, rng.integers(0, 50257, 1000))
    assert len(data.load_split(shards, "train")) == 2000
    (shards / "notes.txt").write_text("not a shard")  # other files are left alone
    (tmp_path / "empty_train_000000.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty_train_000000.bin is empty \(0 bytes: no tokens"):
        data.read_shard(tmp_path / "empty_train_000000.bin")
    write_llmc_shard(tmp_path / "header_train_000000.bin", [])  # a header and no tokens is empty too
    with pytest.raises(ValueError, match=r"header_train_000000.bin is empty \(1,024 bytes: no tokens"):
        data.read_shard(tmp_path / "header_train_000000.bin")
    for planted, removed, words in (("edu_train_000000.bin", None, "holds the shards of 2 datasets (edu, fineweb)"),
                                    ("fineweb_train_000004.bin", None, "lacks fineweb_train_000003.bin between its "
                                                                       "shards 000001 and 000004"),
                                    (None, "fineweb_val_000000.bin", "holds fineweb's llm.c token shards but no val "
                                                                     "shard (fineweb_val_NNNNNN.bin)")):
        folder = tmp_path / f"case-{planted or removed}"
        shutil.copytree(shards, folder)
        if planted:
            write_llmc_shard(folder / planted, rng.integers(0, 50257, 1000))
        else:
            (folder / removed).unlink()
        code = train.main([f"--dataset={folder}", f"--out_dir={tmp_path / 'out'}", "--max_iters=1"])
        err = capsys.readouterr().err
        assert code == 1 and err.count("\n") == 1 and words in err, err
    # --to_shards writes a folder that is its dataset's only: an earlier, larger preparation's extra shards go, and
    # a folder holding shards data.py did not write is refused, untouched
    data_dir, dest = tmp_path / "data", tmp_path / "shards"
    args = [str(SHAKESPEARE), "--tokens=gpt2", f"--data_dir={data_dir}", f"--to_shards={dest}"]
    folder = data.prepare(str(SHAKESPEARE), data_dir, "gpt2")
    data.write_shards(folder, dest, "older", shard_tokens=30000)  # an earlier preparation: more shards, another name
    assert len(data.shards_of(dest)["train"]) > 1
    assert data.main(args) == 0
    assert sorted(p.name for p in dest.glob("*.bin")) == [f"{folder.name}_train_000000.bin",
                                                          f"{folder.name}_val_000000.bin"]
    for split in data.SPLITS:
        assert np.array_equal(data.load_split(dest, split).windows([0], 100)[0], data.load_split(folder, split)[:100])
    several = tmp_path / "several"  # a split written as several shards reads back whole, each header its own count
    data.write_shards(folder, several, "t", shard_tokens=30000)
    for split in data.SPLITS:
        tokens = data.load_split(several, split, 50257)
        assert len(data.shards_of(several)[split]) == -(-len(data.load_split(folder, split)) // 30000)
        assert np.array_equal(tokens.windows([0], len(tokens))[0], data.load_split(folder, split))
    ids = np.array([5, 50257, 7], np.uint16)  # an id equal to n_vocab is past the vocabulary's end
    with pytest.raises(ValueError, match="holds token id 50257, but the model's vocabulary has 50257 tokens"):
        data.check_token_ids(ids, 50257, "x.bin")
    data.check_token_ids(ids[[0, 2]], 50257, "x.bin")
    capsys.readouterr()
    assert data.main(args[:-1] + [f"--to_shards={shards}"]) == 1
    err = capsys.readouterr().err
    assert "holds shards that data.py did not write (fineweb_train_000001.bin)" in err and err.count("\n") == 1
    assert sorted(p.name for p in shards.iterdir()) == ["fineweb_train_000001.bin", "fineweb_train_000002.bin",
                                                        "fineweb_val_000000.bin", "notes.txt"]


def test_train_block_size_too_large_for_the_data_is_reported_at_start(tmp_path):
    text = tmp_path / "short.txt"
    text.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:3000], encoding="utf-8")  # val: 300 characters
    with pytest.raises(ValueError, match="the val split of .* has 300 tokens, too few for sequences of block_size 512"):
        train.train({"dataset": str(text), "data_dir": str(tmp_path / "data"), "out_dir": str(tmp_path / "out"),
                     "block_size": 512, "n_layer": 1, "n_embd": 8, "n_head": 1})
    assert not (tmp_path / "out" / "metrics.jsonl").exists()


# ==================== harness, eval ===================================================================================
# gptjax as a model of lm-evaluation-harness, against the float64 numpy GPT-2 with the harness's definitions written out

EVAL_TASKS = HERE / "testdata" / "eval"


@pytest.fixture(scope="session")
def local_tasks():  # lm_eval's index of testdata/eval's tasks alone, as eval.py makes it for them
    return eval_cli.task_manager(str(EVAL_TASKS), ["tiny_choice", "tiny_rolling"])


def harness_results(batch_size, task_manager, tasks=("tiny_choice", "tiny_rolling")):
    lm = harness.GptjaxLM(str(TINY["tf"]), batch_size=batch_size)
    return lm_eval.simple_evaluate(model=lm, tasks=list(tasks), task_manager=task_manager, log_samples=False)["results"]


def reference_logprobs(flat, ids, n_head):  # [n] ids -> [n - 1] float64 log P(ids[i + 1] | ids[:i + 1])
    logits = numpy_gpt2(flat, ids[:-1], n_head)
    logits = logits - logits.max(-1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return logprobs[np.arange(len(ids) - 1), ids[1:]]


@pytest.mark.slow
def test_harness_scores_are_the_float64_references(monkeypatch, local_tasks):
    monkeypatch.chdir(HERE)  # the task files name their data relative to the checkout
    flat, n_head, enc = reference_params(), EXPECTED["hparams"]["n_head"], tiktoken_gpt2()
    results = harness_results(8, local_tasks)
    # multiple choice: the continuation is " " + choice; acc takes the most likely choice, acc_norm the most likely
    # per character of the choice (the harness's definitions)
    docs = [json.loads(line) for line in (EVAL_TASKS / "tiny_choice.jsonl").read_text().splitlines()]
    acc, acc_norm = [], []
    for doc in docs:
        context = enc.encode(doc["ctx"], allowed_special="all")
        scores = []
        for ending in doc["endings"]:
            whole = enc.encode(doc["ctx"] + " " + ending, allowed_special="all")
            scores.append(reference_logprobs(flat, whole, n_head)[len(context) - 1:].sum())
        acc.append(np.argmax(scores) == doc["label"])
        acc_norm.append(np.argmax(np.array(scores) / [len(e) for e in doc["endings"]]) == doc["label"])
    choice = results["tiny_choice"]
    assert choice["acc,none"] == pytest.approx(np.mean(acc), abs=1e-12)
    assert choice["acc_norm,none"] == pytest.approx(np.mean(acc_norm), abs=1e-12)
    # rolling perplexity over texts longer than the context: lm_eval's windows (each token predicted once, from the
    # 64 tokens before it, the first ones after <|endoftext|>), summed per document
    texts = [json.loads(line)["text"] for line in (EVAL_TASKS / "tiny_rolling.jsonl").read_text().splitlines()]
    total, words, n_bytes = 0.0, 0, 0
    for text in texts:
        tokens = [50256] + enc.encode(text, allowed_special="all")
        assert len(tokens) > 65  # windows are exercised
        for end in range(1, len(tokens), 64):  # predict tokens[end:end + 64] from the 64 tokens before the last
            stop = min(end + 64, len(tokens))
            window = tokens[max(0, stop - 65):stop]
            total += reference_logprobs(flat, window, n_head)[-(stop - end):].sum()
        words += len(re.split(r"\s+", text))
        n_bytes += len(text.encode("utf-8"))
    rolling = results["tiny_rolling"]
    assert rolling["word_perplexity,none"] == pytest.approx(math.exp(-total / words), rel=1e-4)
    assert rolling["byte_perplexity,none"] == pytest.approx(math.exp(-total / n_bytes), rel=1e-4)
    assert rolling["bits_per_byte,none"] == pytest.approx(-total / n_bytes / math.log(2), rel=1e-4)
    # batching, padding, bucketing and shared contexts do not change a score: the same requests at batch 1 and 8
    from lm_eval.api.instance import Instance
    requests = [Instance("loglikelihood", {}, (doc["ctx"], " " + ending), 0) for doc in docs[:6]
                for ending in doc["endings"]]
    rolling_requests = [Instance("loglikelihood_rolling", {}, (text,), 0) for text in texts]
    scores = {}
    for batch_size in (1, 8):
        lm = harness.GptjaxLM(str(TINY["tf"]), batch_size=batch_size)
        scores[batch_size] = (lm.loglikelihood(requests, disable_tqdm=True),
                              lm.loglikelihood_rolling(rolling_requests, disable_tqdm=True))
    for (a, greedy_a), (b, greedy_b) in zip(scores[1][0], scores[8][0]):
        assert a == pytest.approx(b, rel=1e-6) and greedy_a == greedy_b
    assert scores[1][1] == pytest.approx(scores[8][1], rel=1e-6)


@pytest.mark.slow
def test_harness_requests_directly(monkeypatch):
    # loglikelihood: a context longer than n_ctx is cut from the left; is_greedy against the float64 argmax;
    # generate_until: the greedy continuation (the fixture's reference tokens), cut before its stop string
    from lm_eval.api.instance import Instance
    lm = harness.GptjaxLM(str(TINY["tf"]), batch_size=4)
    flat, n_head = reference_params(), EXPECTED["hparams"]["n_head"]
    long_context = " ".join(["the old town"] * 40)
    greedy_text = lm.tok_decode(PROMPTS[0]["greedy_new_ids"][:4])  # the fixture's greedy tokens, as text
    requests = [Instance("loglikelihood", {}, (ctx, cont), 0) for ctx, cont in
                ((PROMPTS[0]["text"], greedy_text), (PROMPTS[0]["text"], " the old town"),
                 (long_context, " and the river"))]
    assert lm._encode_pair(PROMPTS[0]["text"], greedy_text) == (PROMPTS[0]["ids"], PROMPTS[0]["greedy_new_ids"][:4])
    got = lm.loglikelihood(requests, disable_tqdm=True)
    for request, (logprob, greedy) in zip(requests, got):
        context, continuation = lm._encode_pair(*request.args)
        whole = (context + continuation)[-65:]
        ref = reference_logprobs(flat, whole, n_head)[-len(continuation):]
        assert logprob == pytest.approx(ref.sum(), rel=1e-5)
        argmax = numpy_gpt2(flat, whole[:-1], n_head).argmax(-1)[-len(continuation):]
        assert greedy == bool(np.all(argmax == whole[-len(continuation):]))
    assert got[0][1] and not got[1][1]  # the fixture's greedy tokens are greedy, others are not
    low = harness.GptjaxLM(str(TINY["tf"]), batch_size=4, dtype="bfloat16")  # bfloat16 weights and compute
    assert low.params["wte"].dtype == jnp.bfloat16
    for (logprob, _), (low_logprob, _) in zip(got, low.loglikelihood(requests, disable_tqdm=True)):
        assert low_logprob == pytest.approx(logprob, rel=5e-3)  # measured: 1e-4 to 4e-4
    prompt = PROMPTS[0]
    stop = prompt["greedy_text"][10:14]
    out = lm.generate_until([Instance("generate_until", {}, (prompt["text"], {"until": [stop], "max_gen_toks": 20}),
                                      0)], disable_tqdm=True)
    assert out == [prompt["greedy_text"][:prompt["greedy_text"].index(stop)]]
    # several stop strings: cut before the earliest in the text, whatever their order in the list
    text = prompt["greedy_text"]
    stops = [text[12:16], text[5:8], text[15:19]]
    out = lm.generate_until([Instance("generate_until", {}, (prompt["text"], {"until": stops, "max_gen_toks": 20}),
                                      0)], disable_tqdm=True)
    assert out == [text[:min(text.index(s) for s in stops)]]
    # a context longer than n_ctx - max_gen_toks keeps its tail: the continuation of the last 64 - 20 tokens
    long_ids = lm.tok_encode(SHAKESPEARE.read_text(encoding="utf-8")[:1000])[:60]
    head, tail = long_ids[:64 - 20], long_ids[-(64 - 20):]
    want, other = (lm.tok_decode(sampling.generate(lm.params, lm.hparams, [ids], 20, greedy=True)[0])
                   for ids in (tail, head))
    assert want != other  # the two ends of the context continue differently
    out = lm.generate_until([Instance("generate_until", {}, (lm.tok_decode(long_ids),
                                                             {"until": ["never said"], "max_gen_toks": 20}), 0)],
                            disable_tqdm=True)
    assert lm.tok_encode(lm.tok_decode(long_ids)) == long_ids and out == [want]


@pytest.mark.slow
def test_harness_batches_hold_no_more_rows_than_their_requests(monkeypatch):
    # three requests at --batch_size 64 are scored as 3 rows, not padded to 64 (the same scores as at batch size 8)
    rows = []
    for name, arg in (("target_scores", 1), ("shared_prefix_scores", 4)):  # ids, tails: [rows, ...]
        monkeypatch.setattr(harness, name, partial(lambda f, arg, *a, **k: rows.append(a[arg].shape[0]) or f(*a, **k),
                                                   getattr(harness, name), arg))
    whole = [(list(range(1, 10 + i)), 3) for i in range(3)]
    shared = [(list(range(1, 12)), continuation) for continuation in ([5, 6], [7], [8, 9, 10])]
    scores = {}
    for batch_size in (64, 8):
        lm = harness.GptjaxLM(str(TINY["tf"]), batch_size=batch_size)
        scores[batch_size] = lm.score_rows(whole, True) + lm.score_shared(shared, True)
    assert rows == [3, 3, 3, 3], rows
    np.testing.assert_allclose([s for s, _ in scores[64]], [s for s, _ in scores[8]], atol=1e-5)


@pytest.mark.slow
def test_eval_cli_runs_a_local_task_and_refuses_bad_input(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(HERE)
    output = tmp_path / "results.json"
    assert eval_cli.main(["--model_dir", str(TINY["tf"]), "--tasks", "tiny_choice", "--include_path", str(EVAL_TASKS),
                          "--limit", "8", "--output_path", str(output)]) == 0
    out = capsys.readouterr().out
    assert "tiny_choice" in out and "acc_norm" in out
    assert json.loads(output.read_text())["results"]["tiny_choice"]["acc,none"] >= 0
    # into a folder: the harness's results_<date>.json there
    assert eval_cli.main(["--model_dir", str(TINY["tf"]), "--tasks", "tiny_choice", "--include_path", str(EVAL_TASKS),
                          "--limit", "2", "--output_path", str(tmp_path), "--num_fewshot", "2"]) == 0
    written = list(tmp_path.glob("results_*.json"))
    assert len(written) == 1 and json.loads(written[0].read_text())["results"]["tiny_choice"]["acc,none"] >= 0
    assert json.loads(written[0].read_text())["n-shot"] == {"tiny_choice": 2}  # --num_fewshot reached the harness
    assert f"wrote {written[0]}" in capsys.readouterr().out
    missing = tmp_path / "tasks"  # a local task whose data file is not there
    missing.mkdir()
    task = (EVAL_TASKS / "tiny_choice.yaml").read_text().replace("task: tiny_choice", "task: tiny_missing")
    task = task.replace("testdata/eval/tiny_choice.jsonl", str(tmp_path / "no.jsonl"))
    (missing / "tiny_missing.yaml").write_text(task)
    (tmp_path / "victim.json").write_text("someone else's")
    (tmp_path / "link.json").symlink_to(tmp_path / "victim.json")
    model = ["--model_dir", str(TINY["tf"]), "--include_path", str(EVAL_TASKS)]
    # the harness's library of tasks is indexed (slowly) only when include_path lacks one asked for; then both count
    assert "hellaswag" not in eval_cli.task_manager(str(EVAL_TASKS), ["tiny_choice"]).all_tasks
    for args, code, words in ((["--tasks", "tiny_choice,hellaswag,no_such_task"], 2, "unknown task 'no_such_task'"),
                              (["--tasks", "tiny_choice", "--limit", "0"], 2, "--limit must be a positive number"),
                              (["--tasks", "tiny_choice", "--limit", "nan"], 2, "--limit must be a positive number"),
                              (["--tasks", "tiny_choice", "--limit", "inf"], 2, "--limit must be a positive number"),
                              (["--tasks", "tiny_choice", "--limit", "2.5"], 2, "give a whole number"),
                              (["--tasks", "tiny_choice", "--num_fewshot", "-1"], 2, "--num_fewshot must be 0 or"),
                              (["--tasks", "tiny_choice", "--batch_size", "0"], 2, "--batch_size must be at least 1"),
                              (["--tasks", "tiny_choice", "--output_path", str(tmp_path / "no" / "r.json")], 2,
                               f"{tmp_path / 'no'} is not a folder"),
                              (["--tasks", "tiny_choice", "--output_path", str(tmp_path / "link.json")], 1,
                               "is a symbolic link"),
                              (["--tasks", "tiny_choice", "--model_dir", str(tmp_path / "nowhere")], 2,
                               "not a folder"),
                              (["--tasks", "tiny_missing", "--include_path", str(missing)], 1,
                               f"a task's data file is missing (Unable to find '{tmp_path / 'no.jsonl'}')")):
        assert eval_cli.main([*model, *args]) == code, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, err
    assert (tmp_path / "victim.json").read_text() == "someone else's"
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "lm_eval" else find_spec(name, *a))
    assert eval_cli.main(["--tasks", "hellaswag"]) == 2
    assert 'pip install -e ".[eval]"' in capsys.readouterr().err


# ==================== bench, cli ======================================================================================
# the benchmark's guard, the process settings, bad input across the tools

def test_bench_vs_hf_without_the_extra_says_what_to_install():
    proc = run_program("bench_without_torch.py", timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert 'pip install -e ".[bench]" --extra-index-url https://download.pytorch.org/whl/cpu' in proc.stderr


def test_misuse_gets_one_line_not_a_traceback(train_data_dir, tmp_path, monkeypatch, capsys):
    # a GPT-2-token folder given by name trains from scratch in its own vocabulary (it once raised KeyError 'chars')
    data.prepare(str(SHAKESPEARE), tmp_path / "data", "gpt2")
    result = train.train(run_config(tmp_path / "data", tmp_path / "gpt2-scratch", dataset="tinyshakespeare_gpt2",
                                    max_iters=1, eval_interval=1))
    assert result["iter"] == 1 and weights.load_hparams_and_params(tmp_path / "gpt2-scratch")[0]["n_vocab"] == 50257
    cases = []
    broken = tmp_path / "data" / "broken"
    data.prepare("shakespeare_char", train_data_dir)  # whichever test ran first: a prepared dataset to break
    shutil.copytree(train_data_dir / "shakespeare_char", broken)
    (broken / "meta.json").write_text('{"kind": "char"}')
    cases.append(([f"--data_dir={tmp_path / 'data'}", "--dataset=broken"], 1, 'should hold {"kind": "char"'))
    listed = copy_folder(tmp_path, TINY_TF)
    (listed / "hparams.json").write_text("[1, 2]")
    cases.append(([f"--init_from={listed}", f"--data_dir={train_data_dir}"], 1, "should hold a JSON object, not a"))
    cases.append(([f"--init_from={TINY_TF}", f"--data_dir={train_data_dir}"], 1, "--dataset=shakespeare"))
    (tmp_path / "train_shakespeare_char.py").write_text("n_layer = 6\n")
    cases.append(([str(tmp_path / "train_shakespeare_char.py")], 2, "configs/shakespeare_char.toml"))
    for args, code, words in cases:
        assert train.main([*args, f"--out_dir={tmp_path / 'o'}", "--max_iters=1", "--overwrite"]) == code, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("error: ") and words in err[-1] and "Traceback" not in "".join(err), (args, err)
    # Ctrl-C in main.py and weights.py: one line, exit 130
    monkeypatch.setattr(weights, "load_model", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main.main(["--model_dir", str(TINY["tf"]), "--prompt", "a"]) == 130
    assert weights.main(["to_hf", str(TINY["tf"]), str(tmp_path / "hf")]) == 130
    assert capsys.readouterr().err == "error: interrupted (Ctrl-C)\n" * 2
    # data.py: a cut .tar.xz and an empty split are one line or a summary, not a traceback
    docs = tmp_path / "docs"
    write_documents(docs, 3, words=2000)
    with tarfile.open(tmp_path / "cut.tar.xz", "w:xz") as archive:
        archive.add(docs, arcname="docs")
    blob = (tmp_path / "cut.tar.xz").read_bytes()
    (docs / "cut.tar.xz").write_bytes(blob[:len(blob) // 2])
    assert data.main([str(docs), f"--data_dir={tmp_path / 'd'}", "--num_proc=1"]) == 1
    assert "cut.tar.xz" in capsys.readouterr().err
    # bench.py's values are checked by argparse: exit 2, one line of error
    import bench
    for args in (["generate", "--repeats", "0"], ["generate", "--batches", "1,x"], ["train", "--rounds", "-1"]):
        with pytest.raises(SystemExit) as e:
            bench.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and "at least 1" in err.splitlines()[-1], (args, err)


# ==================== serve ===========================================================================================
# the OpenAI-compatible server as users meet it: started on a free local port, called by the openai client, plain
# HTTP (httpx) and lm-evaluation-harness; its answers against sampling.generate and the float64 model

SERVED = "gpt2-tiny"


def start_server(log_path, *args):  # serve.py on the tiny model, on a free port -> (process, base url)
    log = open(log_path, "w")
    proc = subprocess.Popen([sys.executable, str(HERE / "serve.py"), "--model_dir", str(TINY["tf"]), "--port", "0",
                             "--name", SERVED, *args], stdout=log, stderr=subprocess.STDOUT, cwd=HERE,
                            env={**os.environ, "JAX_LOG_COMPILES": "1"})
    deadline = time.time() + 300
    while time.time() < deadline:
        if m := re.search(r"serving \S+ at (http://\S+/v1)", log_path.read_text()):
            return proc, m.group(1)
        if proc.poll() is not None:
            raise AssertionError(log_path.read_text())
        time.sleep(0.2)
    proc.kill()
    raise AssertionError("the server did not start in 300 s:\n" + log_path.read_text())


@pytest.fixture(scope="module")
def server(tmp_path_factory):  # (base url, log path) of a server with 4 slots, shared by the tests below
    log_path = tmp_path_factory.mktemp("serve") / "serve.log"
    proc, url = start_server(log_path, "--slots", "4")
    yield url, log_path
    proc.terminate()
    proc.wait(timeout=60)


def openai_client(url):
    import openai
    return openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=120)


@pytest.mark.xdist_group("server")
@pytest.mark.slow
def test_server_completions_are_generate_s(server, tiny_tf):
    # greedy completions of a batch of prompts are the fixture's; sampled ones (n = 2, a seed, top_k as vLLM takes
    # it) are sampling.generate's rows with that seed; a stream's pieces join into the same text
    url, _ = server
    hparams, params = tiny_tf
    client, enc = openai_client(url), encoder.get_encoder(TINY["tf"])
    r = client.completions.create(model=SERVED, prompt=[p["text"] for p in PROMPTS], max_tokens=20, temperature=0)
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [p["greedy_text"] for p in PROMPTS]
    assert {c.finish_reason for c in r.choices} == {"length"} and r.model == SERVED
    assert (r.usage.prompt_tokens, r.usage.completion_tokens) == (sum(len(p["ids"]) for p in PROMPTS), 60)
    options = {"temperature": 0.8, "top_p": 0.9, "top_k": 20, "seed": 7}
    want = sampling.generate(params, hparams, [PROMPTS[1]["ids"]] * 2, 12, eot_token=enc.eot_token, **options)
    r = client.completions.create(model=SERVED, prompt=PROMPTS[1]["text"], max_tokens=12, n=2, temperature=0.8,
                                  top_p=0.9, seed=7, extra_body={"top_k": 20})
    assert [c.text for c in sorted(r.choices, key=lambda c: c.index)] == [enc.decode(ids) for ids in want]
    chunks = list(client.completions.create(model=SERVED, prompt=PROMPTS[2]["text"], max_tokens=20, temperature=0,
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == PROMPTS[2]["greedy_text"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 20 and len([c for c in chunks if c.choices]) >= 10


@pytest.mark.xdist_group("server")
@pytest.mark.slow
def test_server_logprobs_are_the_float64_model_s(server):
    # echo + logprobs as the harness asks (token ids, max_tokens 1, temperature 0): the prompt's log probabilities,
    # its greedy next token; and the log probabilities of generated tokens, both against the float64 GPT-2
    url, _ = server
    client, flat, n_head = openai_client(url), reference_params(), EXPECTED["hparams"]["n_head"]
    ids, want_next = PROMPTS[1]["ids"], PROMPTS[1]["greedy_new_ids"]
    r = client.completions.create(model=SERVED, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=2)
    lp = r.choices[0].logprobs
    assert lp.token_logprobs[0] is None and len(lp.token_logprobs) == len(ids) + 1
    np.testing.assert_allclose(lp.token_logprobs[1:], reference_logprobs(flat, np.array(ids + want_next[:1]), n_head),
                               atol=2e-4)
    assert all(max(top.values()) >= logprob - 1e-6 and len(top) <= 2
               for top, logprob in zip(lp.top_logprobs[1:], lp.token_logprobs[1:]))
    assert r.choices[0].text == PROMPTS[1]["text"] + encoder.get_encoder(TINY["tf"]).decode(want_next[:1])
    r = client.completions.create(model=SERVED, prompt=ids, max_tokens=6, temperature=0, logprobs=1)
    np.testing.assert_allclose(r.choices[0].logprobs.token_logprobs,
                               reference_logprobs(flat, np.array(ids + want_next[:6]), n_head)[len(ids) - 1:],
                               atol=2e-4)


@pytest.mark.xdist_group("server")
@pytest.mark.slow
def test_server_stop_strings_penalties_and_logit_bias(server, tiny_tf):
    url, _ = server
    hparams, params = tiny_tf
    client, enc = openai_client(url), encoder.get_encoder(TINY["tf"])
    text = PROMPTS[0]["greedy_text"]
    first, second = text[12:16], text[4:8]
    r = client.completions.create(model=SERVED, prompt=PROMPTS[0]["text"], max_tokens=20, temperature=0,
                                  stop=[first, second])
    assert (r.choices[0].text, r.choices[0].finish_reason) == (text[:text.find(second)], "stop")
    options = {"presence_penalty": 0.4, "frequency_penalty": -0.7, "repetition_penalty": 1.3,
               "logit_bias": {PROMPTS[0]["greedy_new_ids"][0]: -100.0, 11: 1.5}}
    want = sampling.generate(params, hparams, [PROMPTS[0]["ids"]], 20, greedy=True, eot_token=enc.eot_token,
                             **options)[0]
    r = client.completions.create(model=SERVED, prompt=PROMPTS[0]["text"], max_tokens=20, temperature=0,
                                  presence_penalty=0.4, frequency_penalty=-0.7,
                                  logit_bias={str(t): b for t, b in options["logit_bias"].items()},
                                  extra_body={"repetition_penalty": 1.3})
    assert r.choices[0].text == enc.decode(want) and want != PROMPTS[0]["greedy_new_ids"]


@pytest.mark.xdist_group("server")
@pytest.mark.slow
def test_server_bad_requests_get_400_and_it_keeps_serving(server):
    import httpx
    url, log_path = server
    cases = [(b"{bad", "not valid JSON", 400), ({"prompt": "a", "max_tokens": "x"}, "max_tokens", 400),
             ({"prompt": "a", "max_tokens": -1}, "max_tokens", 400),
             (b'{"prompt": "a", "temperature": NaN}', "temperature", 400),
             ({"prompt": "a", "top_p": 0}, "top_p", 400), ({"prompt": "a", "n": 0}, "n must", 400),
             ({"prompt": PROMPTS[2]["text"], "max_tokens": 30}, "maximum context length is 64", 400),
             ({"prompt": ["a", "b", "c"], "n": 2}, "4 slots", 400), ({"prompt": "a", "foo": 1}, "foo", 400),
             ({"prompt": "a", "logprobs": 6}, "logprobs", 400), ({"prompt": "a", "stop": list("abcde")}, "stop", 400),
             ({"prompt": "a", "logit_bias": {"x": 1}}, "logit_bias", 400),
             ({"prompt": "a", "logit_bias": {"5": 200}}, "logit_bias", 400),
             ({"prompt": [50257]}, "token id 50257", 400), ({"prompt": "a", "presence_penalty": 3}, "presence", 400),
             ({"prompt": "a", "echo": "yes"}, "echo", 400), ({}, "prompt", 400), ([1, 2], "JSON object", 400),
             ({"prompt": "a", "seed": -1}, "seed", 400)]
    with httpx.Client(timeout=60) as http:
        for body, words, status in cases:
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = http.post(f"{url}/completions", content=content, headers={"Content-Type": "application/json"})
            error = r.json()["error"]
            assert r.status_code == status and words in error["message"] and error["type"], (body, r.text)
        r = http.post(f"{url}/chat/completions", json={"model": SERVED, "messages": []})
        assert r.status_code == 400 and "not a chat model" in r.json()["error"]["message"]
        r = http.get(f"{url}/nothing")
        assert r.status_code == 404 and "error" in r.json()
        r = http.post(f"{url}/completions", json={"prompt": "a", "max_tokens": 3, "temperature": 0})
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 3
    log = log_path.read_text()
    assert "Traceback" not in log and log.count("WARNING 400 ") >= len(cases)


@pytest.mark.xdist_group("server")
@pytest.mark.slow
def test_server_routes_health_models_metrics_and_tokenizer(server):
    import httpx
    url, _ = server
    root = url.removesuffix("/v1")
    enc = encoder.get_encoder(TINY["tf"])
    assert [m.id for m in openai_client(url).models.list().data] == [SERVED]
    with httpx.Client(timeout=60) as http:
        assert http.get(f"{root}/health").json() == {"status": "ok"}
        ids = http.post(f"{root}/tokenize", json={"prompt": PROMPTS[0]["text"]}).json()["tokens"]
        assert ids == PROMPTS[0]["ids"] == enc.encode(PROMPTS[0]["text"])
        assert http.post(f"{root}/detokenize", json={"tokens": ids}).json()["prompt"] == PROMPTS[0]["text"]
        assert http.get(f"{root}/tokenizer_info").json()["eos_token"] == "<|endoftext|>"
        metrics = http.get(f"{root}/metrics").text
    generated = float(re.search(r"^gptjax_generation_tokens_total (\S+)", metrics, re.M).group(1))
    assert generated > 0 and "gptjax_time_to_first_token_seconds_bucket" in metrics
    assert re.search(r"^gptjax_slots_in_use 0\.0", metrics, re.M) and "gptjax_queue_depth" in metrics


@pytest.mark.xdist_group("server")
@pytest.mark.slow
def test_server_concurrent_streams_each_get_the_lone_response(server):
    # 10 streaming clients at once on 4 slots (some wait in the queue): each gets what the same request gets alone
    url, _ = server
    client = openai_client(url)
    requests = [dict(prompt=PROMPTS[i % 3]["text"][:20 + 7 * i], max_tokens=8 + i, temperature=0.9, seed=i)
                for i in range(10)]

    def streamed(request):
        return "".join(c.choices[0].text for c in client.completions.create(model=SERVED, stream=True, **request))

    results = [None] * len(requests)
    threads = [threading.Thread(target=lambda i=i: results.__setitem__(i, streamed(requests[i])))
               for i in range(len(requests))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert None not in results
    alone = [client.completions.create(model=SERVED, **request).choices[0].text for request in requests]
    assert results == alone


@pytest.mark.xdist_group("server")
@pytest.mark.slow
def test_server_frees_the_slot_of_a_client_that_goes_away(server):
    import httpx
    url, _ = server
    root = url.removesuffix("/v1")
    with httpx.Client(timeout=60) as http:
        with http.stream("POST", f"{url}/completions", json={"prompt": "a", "max_tokens": 60, "stream": True}) as r:
            next(r.iter_lines())  # the first token has come: the request holds a slot
        deadline = time.time() + 10
        while not re.search(r"^gptjax_slots_in_use 0\.0", http.get(f"{root}/metrics").text, re.M):
            assert time.time() < deadline, "the slot was not freed"
            time.sleep(0.05)


@pytest.mark.xdist_group("server")
@pytest.mark.slow
def test_harness_through_the_server_equals_eval(server, monkeypatch, local_tasks):
    # lm-evaluation-harness's own OpenAI-completions model (local-completions, tokenizing through the server) gives
    # the numbers of gptjax's harness model (eval.py) on the local tasks. The API model keeps one position of
    # max_length for a generated token and feeds each rolling window with its context token: at max_length 64 it
    # scores the windows that a model fed 62 tokens at a time scores.
    monkeypatch.chdir(HERE)
    url, _ = server
    args = f"base_url={url}/completions,model={SERVED},tokenizer_backend=remote,max_length=64,max_retries=1"
    through = lm_eval.simple_evaluate(model="local-completions", model_args=args, tasks=["tiny_choice", "tiny_rolling"],
                                      task_manager=local_tasks, log_samples=False)
    lm = harness.GptjaxLM(str(TINY["tf"]), batch_size=8, max_length=62)
    direct = lm_eval.simple_evaluate(model=lm, tasks=["tiny_choice", "tiny_rolling"], log_samples=False,
                                     task_manager=local_tasks)["results"]
    for task, metrics in direct.items():
        for name, value in metrics.items():
            if isinstance(value, float) and "stderr" not in name:
                assert through["results"][task][name] == pytest.approx(value, rel=1e-4), (task, name)


@pytest.mark.xdist_group("server")
@pytest.mark.slow
def test_server_compiled_nothing_after_warm_up(server):  # runs after the tests above have used every route
    _, log_path = server
    after = log_path.read_text().split("serving ", 1)[1]
    assert "Compiling" not in after, [line for line in after.splitlines() if "Compiling" in line][:3]


@pytest.mark.slow
def test_server_queue_bound_and_sigterm_drain(tmp_path):
    # 1 slot, 1 place in the queue: of 12 requests sent at once some are answered 429 (rate_limit_error), the others
    # in full; SIGTERM while a stream runs lets it finish, then the server exits 0. Its KV cache is bfloat16's
    import httpx
    proc, url = start_server(tmp_path / "serve.log", "--slots", "1", "--max_queue", "1", "--kv_cache", "bfloat16")
    assert "(1 slots of 64 positions, bfloat16 KV cache)" in (tmp_path / "serve.log").read_text()
    try:
        with httpx.Client(timeout=120, limits=httpx.Limits(max_connections=20)) as http:
            answers = [None] * 12
            burst = [threading.Thread(target=lambda i=i: answers.__setitem__(i, http.post(
                f"{url}/completions", json={"prompt": "b", "max_tokens": 60}))) for i in range(12)]
            for t in burst:
                t.start()
            for t in burst:
                t.join(timeout=120)
            codes = sorted(r.status_code for r in answers)
            assert set(codes) == {200, 429} and codes.count(200) >= 2, codes
            assert all(r.json()["error"]["type"] == "rate_limit_error" for r in answers if r.status_code == 429)
            assert all(r.json()["usage"]["completion_tokens"] >= 1 for r in answers if r.status_code == 200)
            with http.stream("POST", f"{url}/completions", json={"prompt": "a", "max_tokens": 60, "stream": True,
                                                                  "temperature": 0}) as streaming:
                lines = streaming.iter_lines()
                next(lines)
                proc.send_signal(signal.SIGTERM)
                events = [line for line in lines if line.startswith("data: ")]
            assert events[-1] == "data: [DONE]" and json.loads(events[-2][6:])["choices"][0]["finish_reason"]
        assert proc.wait(timeout=60) == 0
        assert "stopped" in (tmp_path / "serve.log").read_text()
    finally:
        proc.kill()


@pytest.mark.slow
def test_serve_cli_errors_are_one_line(tmp_path, capsys):
    import serve
    busy = socket.create_server(("127.0.0.1", 0))
    port = busy.getsockname()[1]
    for args, words in ((["--slots", "0"], "--slots"), (["--port", str(port)], f"cannot listen on 127.0.0.1:{port}"),
                        (["--slot_ctx", "65"], "--slot_ctx"), (["--model_dir", tmp_path / "none"], "not a folder")):
        assert serve.main(["--model_dir", str(TINY["tf"]), *map(str, args)]) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and words in err, (args, err)
    busy.close()


# ==================== properties ======================================================================================
# generated inputs (hypothesis) against independent references: tiktoken, float64 numpy, the float64 model

TEXTS = st.text(st.characters(codec="utf-8"), max_size=60) | st.lists(st.sampled_from(
    ["<|endoftext|>", "<|endo", "text|>", " ", "  ", "\n", "\n\n", "\t", "'s", "'ll", "a", "é", "日本", "🦜", "123",
     " \n ", "\r\n", "\u00a0", "x" * 30]), max_size=14).map("".join)


@pytest.mark.slow
@given(text=TEXTS)
def test_property_encoder_agrees_with_tiktoken_and_round_trips(encoder_gpt2, text):
    ids = encoder_gpt2.encode(text)
    assert ids == tiktoken_gpt2().encode(text, allowed_special="all")
    assert encoder_gpt2.decode(ids) == text


N_PROPERTY_VOCAB = 16  # one shape: each example reuses the compiled functions
# no subnormal logits: XLA:CPU flushes them to zero (a property test saw 1e-45 come back as 0.0)
LOGIT_VECTORS = st.lists(st.floats(-20, 20, width=32, allow_subnormal=False), min_size=N_PROPERTY_VOCAB,
                         max_size=N_PROPERTY_VOCAB).map(lambda v: np.array(v, np.float32))


def reference_kept(logits, k, p):  # float64: top-k (ties with the k-th kept), then the smallest top-p set of those
    x = logits.astype(np.float64)
    keep = x >= np.sort(x)[::-1][min(k, len(x)) - 1]
    probs = np.where(keep, np.exp(x - x.max()), 0.0)
    probs /= probs.sum()
    cuts = np.unique(x[keep])[::-1]  # candidate thresholds, most likely first
    mass = [probs[x >= c].sum() for c in cuts]
    assume(min(abs(m - p) for m in mass) > 1e-5)  # float32 may round a sum this close to p either way
    return x >= next(c for c, m in zip(cuts, mass) if m >= p)


@given(logits=LOGIT_VECTORS, k=st.integers(1, N_PROPERTY_VOCAB + 4), p=st.floats(0.01, 1.0))
def test_property_top_k_and_top_p_keep_the_sets_they_define(logits, k, p):
    kept = np.isfinite(np.asarray(jax.jit(sampling.filter_logits)(jnp.asarray(logits), k, p)))
    want = reference_kept(logits, k, p)
    np.testing.assert_array_equal(kept, want)
    assert kept.sum() >= 1


@pytest.mark.slow
@given(logits=LOGIT_VECTORS, banned=st.sets(st.integers(0, N_PROPERTY_VOCAB - 1), max_size=N_PROPERTY_VOCAB - 1),
       seed=st.integers(0, 2**63 - 1), temperature=st.floats(0.1, 5.0))
def test_property_a_minus_inf_logit_is_never_drawn_and_a_seed_repeats(logits, banned, seed, temperature):
    logits = logits.copy()
    logits[list(banned)] = -np.inf
    drawn = draws(logits, 64, seed, temperature=temperature)
    assert not set(drawn.tolist()) & banned
    np.testing.assert_array_equal(drawn, draws(logits, 64, seed, temperature=temperature))


@given(logits=LOGIT_VECTORS, seed=st.integers(0, 2**31))
def test_property_temperature_near_zero_is_greedy(logits, seed):
    top2 = np.sort(logits)[-2:]
    assume(top2[1] - top2[0] > 0.01)  # at temperature 1e-4 a gap of 100: no draw crosses it
    assert set(draws(logits, 16, seed, temperature=1e-4).tolist()) == {int(np.argmax(logits))}


@given(logits=LOGIT_VECTORS, counts=st.lists(st.integers(0, 3), min_size=N_PROPERTY_VOCAB,
                                             max_size=N_PROPERTY_VOCAB),
       in_prompt=st.lists(st.booleans(), min_size=N_PROPERTY_VOCAB, max_size=N_PROPERTY_VOCAB),
       repetition=st.floats(0.5, 2.0), presence=st.floats(-2, 2), frequency=st.floats(-2, 2),
       bias=st.dictionaries(st.integers(0, N_PROPERTY_VOCAB - 1), st.floats(-100, 100), max_size=3))
def test_property_penalties_and_bias_change_exactly_the_logits_they_define(logits, counts, in_prompt, repetition,
                                                                          presence, frequency, bias):
    options = {"repetition_penalty": repetition, "presence_penalty": presence, "frequency_penalty": frequency,
               "logit_bias": bias}
    controls = sampling.request_controls({"n_vocab": N_PROPERTY_VOCAB}, 1, **options)
    state = {"counts": np.array([counts], np.int32), "in_prompt": np.array([in_prompt])}
    got = np.asarray(jax.jit(sampling.adjusted_logits)(logits[None], controls, state))[0]
    want = numpy_adjusted(logits, np.array(counts), np.array(in_prompt), **options)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-5)
    untouched = ~(np.array(in_prompt) | (np.array(counts) > 0)) & ~np.isin(np.arange(N_PROPERTY_VOCAB), list(bias))
    np.testing.assert_array_equal(got[untouched], logits[untouched])


@settings(max_examples=8 if os.environ.get("GPTJAX_HYPOTHESIS", "quick") == "quick" else 100)
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=3), n_new=st.integers(1, 20),
       seed=st.integers(0, 2**32 - 1))
def test_property_kv_cache_decoding_follows_the_model(tiny_tf, lengths, n_new, seed):
    # prompts of generated lengths and tokens, decoded together greedily: each new token is the float64 model's most
    # likely after its own prompt and the tokens before it, whatever the batch's other rows and padding
    hparams, params = tiny_tf
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, hparams["n_vocab"], n).tolist() for n in lengths]
    flat = reference_params()
    for prompt, new in zip(prompts, sampling.generate(params, hparams, prompts, n_new, greedy=True)):
        logits = numpy_gpt2(flat, np.array(prompt + new[:-1]), hparams["n_head"])[len(prompt) - 1:]
        chosen = logits[np.arange(len(new)), new]
        assert np.all(chosen >= logits.max(-1) - 1e-4)


SPLIT_LENGTHS = st.fixed_dictionaries({"train": st.integers(1, 60), "val": st.integers(1, 60)})


@given(lengths=SPLIT_LENGTHS, shard_tokens=st.integers(1, 25), seed=st.integers(0, 2**32 - 1))
def test_property_llmc_shards_round_trip(tmp_path_factory, lengths, shard_tokens, seed):
    # a prepared dataset of generated GPT-2 tokens -> data.write_shards at a generated shard size -> read back by
    # llm.c's reader (written out: header of 256 int32, magic, version, count; then uint16 tokens) and by
    # data.load_split: each split whole and in order, every shard but a split's last full, each header its own count
    tmp = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(seed)
    tokens = {split: rng.integers(0, 50257, n).astype(np.uint16) for split, n in lengths.items()}
    folder = tmp / "prepared"
    folder.mkdir()
    for split, ids in tokens.items():
        (folder / f"{split}.bin").write_bytes(ids.tobytes())
    data.write_meta(folder, {"kind": "gpt2", "vocab_size": 50257})
    data.write_shards(folder, tmp / "shards", "gen", shard_tokens)
    for split, ids in tokens.items():
        paths = sorted((tmp / "shards").glob(f"gen_{split}_*.bin"))
        assert [p.name for p in paths] == [f"gen_{split}_{i:06d}.bin" for i in range(-(-len(ids) // shard_tokens))]
        read = []
        for path in paths:
            header = np.fromfile(path, dtype="<i4", count=256)
            read.append(np.fromfile(path, dtype="<u2", offset=1024))
            assert header[0] == 20240520 and header[1] == 1 and header[2] == len(read[-1]), path.name
        assert all(len(r) == shard_tokens for r in read[:-1]) and 1 <= len(read[-1]) <= shard_tokens
        np.testing.assert_array_equal(np.concatenate(read), ids)
        loaded = data.load_split(tmp / "shards", split, 50257)
        assert len(loaded) == len(ids)
        np.testing.assert_array_equal(loaded.windows([0], len(ids))[0], ids)
