"""Tests of sampling.py and main.py against the fixtures' references (HF transformers' greedy decoding in float64,
tiktoken ids) and float64 numpy math, on the tiny fixture model."""
import io
import json
import os
import pathlib
import shutil
import subprocess
import sys
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import encoder
import main
import sampling
import weights

HERE = pathlib.Path(__file__).parent
SAMPLING_TINY = {"tf": HERE / "testdata" / "gpt2-tiny", "hf": HERE / "testdata" / "gpt2-tiny-hf"}
SAMPLING_EXPECTED = json.loads((SAMPLING_TINY["tf"] / "expected.json").read_text())
SAMPLING_PROMPTS = SAMPLING_EXPECTED["prompts"]


@pytest.fixture(scope="module", params=["tf", "hf"])
def sampling_model(request):  # (hparams, params) of the tiny model, read from each of the two layouts
    return weights.load_hparams_and_params(SAMPLING_TINY[request.param])


@pytest.fixture(scope="module")
def sampling_tf_model():
    return weights.load_hparams_and_params(SAMPLING_TINY["tf"])


def sampling_softmax64(logits):
    p = np.exp(np.asarray(logits, np.float64) - np.max(logits))
    return p / p.sum()


def sampling_draws(logits, n, seed, top_k=None, top_p=1.0):  # n draws from next_tokens on one logit vector
    rows = jnp.tile(jnp.asarray(logits, jnp.float32), (n, 1))
    controls = {"key": jax.random.key(seed), "temperature": 1.0, "top_k": top_k or len(logits), "top_p": top_p}
    return np.asarray(jax.jit(partial(sampling.next_tokens, greedy=False))(rows, controls, 0))


def sampling_filtered_probs(logits, top_k=None, top_p=1.0):  # softmax of filter_logits, as float64
    filtered = jax.jit(sampling.filter_logits)(jnp.asarray(logits, jnp.float32), top_k or len(logits), top_p)
    return np.asarray(jax.nn.softmax(filtered), np.float64)


# -------------------------------------------------------------------------------- greedy against the references


def test_greedy_matches_reference(sampling_model):
    hparams, params = sampling_model
    for prompt in SAMPLING_PROMPTS:
        out = sampling.generate(params, hparams, [prompt["ids"]], 20, greedy=True)
        assert out == [prompt["greedy_new_ids"]]


def test_batched_greedy_matches_separate_runs(sampling_model):
    hparams, params = sampling_model
    pair = [SAMPLING_PROMPTS[i]["ids"] for i in SAMPLING_EXPECTED["batch"]["prompt_indices"]]
    assert sampling.generate(params, hparams, pair, 20, greedy=True) == SAMPLING_EXPECTED["batch"]["greedy_new_ids"]
    # three lengths (10, 6, 40 tokens): the short rows are padded to the long one's bucket and still match
    out = sampling.generate(params, hparams, [p["ids"] for p in SAMPLING_PROMPTS], 20, greedy=True)
    assert out == [p["greedy_new_ids"] for p in SAMPLING_PROMPTS]


def test_unstacked_params_give_the_same_tokens(sampling_tf_model):
    hparams, params = sampling_tf_model
    layers = sampling.unstack_layers(params)
    assert len(layers["h"]) == hparams["n_layer"]
    stacked, layer_1 = params["h"]["mlp"]["c_fc"]["w"], layers["h"][1]["mlp"]["c_fc"]["w"]
    np.testing.assert_array_equal(layer_1, stacked[1])
    if jax.default_backend() == "cpu":  # views into the stacked weights, not copies: generation needs no more memory
        assert layer_1.unsafe_buffer_pointer() == stacked.unsafe_buffer_pointer() + layer_1.nbytes
    prompt = SAMPLING_PROMPTS[0]
    assert sampling.generate(layers, hparams, [prompt["ids"]], 20, greedy=True) == [prompt["greedy_new_ids"]]


# -------------------------------------------------------------------------------- sampling controls


def test_top_k_draws_only_the_k_most_likely():
    logits = np.random.default_rng(0).normal(0, 2, 1000)
    top5 = set(np.argsort(-logits)[:5])
    draws = sampling_draws(logits, 4000, seed=1, top_k=5)
    assert set(draws) == top5  # never outside, and every one of the five is drawn
    # and in proportion to their renormalised probabilities (4000 draws: a standard error of <= 0.008)
    p = sampling_softmax64(logits[sorted(top5)])
    freq = np.array([np.mean(draws == t) for t in sorted(top5)])
    np.testing.assert_allclose(freq, p, atol=0.04)


def test_top_p_keeps_the_smallest_set_reaching_p():
    rng = np.random.default_rng(1)
    handmade = np.log(np.array([0.04, 0.4, 0.1, 0.25, 0.06, 0.15]))  # sorted: .4 .25 .15 .1 .06 .04
    cases = [(handmade, 0.5, {1, 3}), (handmade, 0.7, {1, 3, 5}), (handmade, 0.01, {1}),
             (handmade, 0.93, {1, 3, 5, 2, 4}), (handmade, 1.0, set(range(6)))]
    random_logits = rng.normal(0, 3, 500)
    for p in (0.3, 0.8, 0.95):  # numpy reference: the most likely tokens until their float64 mass reaches p
        probs = sampling_softmax64(random_logits)
        order = np.argsort(-probs)
        n = int(np.searchsorted(np.cumsum(probs[order]), p)) + 1
        cases.append((random_logits, p, set(order[:n])))
    for logits, p, kept in cases:
        probs = sampling_softmax64(logits)
        want = np.where(np.isin(np.arange(len(logits)), list(kept)), probs, 0)
        np.testing.assert_allclose(sampling_filtered_probs(logits, top_p=p), want / want.sum(), atol=1e-6)
    draws = sampling_draws(handmade, 2000, seed=2, top_p=0.7)
    assert set(draws) == {1, 3, 5}


def test_top_k_then_top_p():
    logits = np.log(np.array([0.3, 0.05, 0.25, 0.2, 0.15, 0.05]))
    # top_k 3 keeps .3 .25 .2 (renormalised: .4, .333, .267); top_p .6 then keeps the first two (mass .733)
    np.testing.assert_allclose(sampling_filtered_probs(logits, top_k=3, top_p=0.6), [0.3 / 0.55, 0, 0.25 / 0.55, 0, 0, 0],
                               atol=1e-6)
    # top_k alone
    np.testing.assert_allclose(sampling_filtered_probs(logits, top_k=2), [0.3 / 0.55, 0, 0.25 / 0.55, 0, 0, 0], atol=1e-6)


def test_top_k_1_and_low_temperature_are_greedy(sampling_tf_model):
    hparams, params = sampling_tf_model
    prompt = SAMPLING_PROMPTS[0]
    # the smallest top-1/top-2 logit gap on the way is 0.01: at temperature 1e-4 a gap of 100, beyond any noise draw
    assert sampling.generate(params, hparams, [prompt["ids"]], 20, temperature=1e-4, seed=3) == \
        [prompt["greedy_new_ids"]]
    assert sampling.generate(params, hparams, [prompt["ids"]], 20, top_k=1, seed=4) == [prompt["greedy_new_ids"]]


def test_seed_reproducible_and_rows_independent_of_batch(sampling_tf_model):
    hparams, params = sampling_tf_model
    p1, p2 = SAMPLING_PROMPTS[0]["ids"], SAMPLING_PROMPTS[1]["ids"]
    a = sampling.generate(params, hparams, [p1, p2], 20, seed=5, top_p=0.9)
    assert a == sampling.generate(params, hparams, [p1, p2], 20, seed=5, top_p=0.9)
    assert a != sampling.generate(params, hparams, [p1, p2], 20, seed=6, top_p=0.9)
    assert a[0] != a[1] and all(len(row) == 20 for row in a)
    # a row's random numbers depend on (seed, row, token index) only: row 0 alone draws what it draws in a batch
    assert sampling.generate(params, hparams, [p1], 20, seed=5, top_p=0.9) == [a[0]]
    # num_samples: the same prompt twice gives two different samples
    twice = sampling.generate(params, hparams, [p1, p1], 20, seed=5, top_p=0.9)
    assert twice[0] == a[0] and twice[1] != twice[0]


def test_eot_token_ends_each_row(sampling_tf_model):
    hparams, params = sampling_tf_model
    prompts = [SAMPLING_PROMPTS[0]["ids"], SAMPLING_PROMPTS[1]["ids"]]
    eot = 18903  # "Photograph": greedy emits it at step 3 for prompt 1 and step 13 for prompt 2
    want = [g[:g.index(eot)] for g in (SAMPLING_PROMPTS[0]["greedy_new_ids"], SAMPLING_PROMPTS[1]["greedy_new_ids"])]
    assert [len(w) for w in want] == [3, 13]
    assert sampling.generate(params, hparams, prompts, 20, greedy=True, eot_token=eot) == want
    # once every row has ended, no more chunks are computed: 20 tokens take 3 chunks (1 + 16 + 3), the 2nd ends both
    chunks = list(sampling.generate_stream(params, hparams, prompts, 20, greedy=True, eot_token=eot))
    assert chunks == [[want[0][:1], want[1][:1]], [want[0][1:], want[1][1:]]]


def test_stream_chunks_join_into_generate(sampling_tf_model):
    hparams, params = sampling_tf_model
    prompts = [SAMPLING_PROMPTS[0]["ids"], SAMPLING_PROMPTS[1]["ids"]]
    chunks = list(sampling.generate_stream(params, hparams, prompts, 20, top_k=50, seed=7))
    assert [[len(row) for row in chunk] for chunk in chunks] == [[1, 1], [16, 16], [3, 3]]
    joined = [sum((chunk[row] for chunk in chunks), []) for row in range(2)]
    assert joined == sampling.generate(params, hparams, prompts, 20, top_k=50, seed=7)


def test_no_recompilation_within_a_bucket(sampling_tf_model):
    hparams, params = sampling_tf_model
    sizes = lambda: np.array([sampling.prefill._cache_size(), sampling.decode._cache_size()])
    before = sizes()
    # at most one compile of each (none if another test compiled this case already), though the 20 tokens are
    # decoded in two chunks of different lengths (16 and 3)
    sampling.generate(params, hparams, [SAMPLING_PROMPTS[0]["ids"]] * 2, 20, top_k=3)
    after_first = sizes()
    assert set(after_first - before) <= {0, 1}
    # other prompt lengths, token counts and sampling settings in the same buckets (prompt <= 16, prompt + new
    # <= 32) reuse them
    for prompt, n, options in (([5] * 16, 16, {"top_p": 0.5}), ([7, 8], 15, {}), ([9] * 11, 21, {"eot_token": 3})):
        sampling.generate(params, hparams, [prompt, prompt[:1]], n, seed=n, temperature=0.5, **options)
    assert (sizes() == after_first).all()


def test_bfloat16_params_generate(sampling_tf_model):
    hparams, params = sampling_tf_model
    out = sampling.generate(jax.tree.map(lambda p: p.astype(jnp.bfloat16), params), hparams,
                            [SAMPLING_PROMPTS[1]["ids"]], 12, greedy=True)
    assert len(out[0]) == 12 and all(0 <= t < hparams["n_vocab"] for t in out[0])


def test_bad_requests_raise_one_line_errors(sampling_tf_model):
    hparams, params = sampling_tf_model
    ids = SAMPLING_PROMPTS[0]["ids"]  # 10 tokens
    cases = [([], {}, "no prompts"), ([ids, []], {}, "prompt 2 is empty"),
             ([ids], {"n_tokens": 55}, "10 tokens plus 55 new tokens is 65, more than the model's context of n_ctx=64"),
             ([ids], {"n_tokens": 0}, "at least 1"), ([[50257]], {}, "token id 50257"),
             ([ids], {"top_k": 0}, "top_k"), ([ids], {"top_p": 0.0}, "top_p"), ([ids], {"top_p": 1.5}, "top_p"),
             ([ids], {"temperature": 0.0}, "temperature"), ([ids], {"temperature": -1.0}, "temperature")]
    for prompts, options, message in cases:
        n_tokens = options.pop("n_tokens", 5)
        with pytest.raises(ValueError, match=message) as e:
            sampling.generate(params, hparams, prompts, n_tokens, **options)
        assert "\n" not in str(e.value)
    assert len(sampling.generate(params, hparams, [ids], 54, greedy=True, temperature=0.0)[0]) == 54  # 64 in all


# -------------------------------------------------------------------------------- main.py


def test_stream_text_holds_back_characters_split_between_tokens():
    enc = encoder.get_encoder(SAMPLING_TINY["tf"])
    text = " naïve café: 日本語の文章 🎉🦜 done"
    ids = enc.encode(text)
    assert any(enc.decode(ids[:i]).endswith("\ufffd") for i in range(len(ids)))  # some token splits a character
    pieces = list(main.stream_text(([i] for i in ids), enc.decode))
    assert "".join(pieces) == text and not any("\ufffd" in piece for piece in pieces)


def sampling_run_main(args, tmp_path, stdin=None):  # main.py in a fresh process -> (exit code, stdout, stderr)
    env = {**os.environ, "GPTJAX_COMPILATION_CACHE": str(tmp_path / "jax-cache")}
    proc = subprocess.run([sys.executable, str(HERE / "main.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, input=stdin, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def test_main_prints_the_greedy_continuation(tmp_path):
    prompt = SAMPLING_PROMPTS[0]
    code, out, err = sampling_run_main(["--model_dir", SAMPLING_TINY["tf"], "--greedy", "--n_tokens_to_generate", "20",
                                        "--prompt", prompt["text"]], tmp_path)
    assert (code, out) == (0, prompt["greedy_text"] + "\n"), err


def test_main_bad_input_exits_2_with_one_line(tmp_path):
    code, out, err = sampling_run_main(["--model_dir", SAMPLING_TINY["tf"], "--prompt", SAMPLING_PROMPTS[0]["text"],
                                        "--n_tokens_to_generate", "60"], tmp_path)
    assert code == 2 and out == "" and "Traceback" not in err
    assert err.count("\n") == 1 and err.startswith("error: ") and "10" in err and "60" in err and "64" in err


@pytest.fixture
def sampling_main_inprocess(monkeypatch):  # main.main in this process, its compilation cache setting left alone
    monkeypatch.setattr(sampling, "enable_compilation_cache", lambda path=None: None)

    def run(*args):
        try:
            main.main([str(a) for a in args])
        except SystemExit as e:
            return e.code
        return 0
    return run


def test_main_errors(sampling_main_inprocess, capsys, tmp_path, monkeypatch):
    tiny = SAMPLING_TINY["tf"]
    broken = tmp_path / "broken"  # the release layout without its checkpoint index
    broken.mkdir()
    for name in ("hparams.json", "encoder.json", "vocab.bpe", "model.ckpt.data-00000-of-00001"):
        shutil.copy(tiny / name, broken / name)
    monkeypatch.setenv("GPTJAX_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: a refused connection
    monkeypatch.setattr(weights, "BACKOFF_S", 0.0)
    cases = [(["--model_dir", tiny, "--prompt", ""], "empty"),
             (["--model_dir", tiny], "--prompt"),
             (["--model_dir", tiny, "--prompt", "a", "--prompt_file", tmp_path / "p.txt"], "--prompt"),
             (["--model_dir", tiny, "--prompt_file", tmp_path / "missing.txt"], "missing.txt"),
             (["--model_dir", broken, "--prompt", "a"], "model.ckpt.index"),
             (["--model_dir", tmp_path / "nowhere", "--prompt", "a"], "nowhere"),
             (["--models_dir", tmp_path / "models", "--prompt", "a"], "127.0.0.1:9"),
             (["--model_dir", tiny, "--prompt", "a", "--top_k", "0"], "top_k"),
             (["--model_dir", tiny, "--prompt", "a", "--top_p", "2"], "top_p"),
             (["--model_dir", tiny, "--prompt", "a", "--temperature", "0"], "temperature"),
             (["--model_dir", tiny, "--prompt", "a", "--num_samples", "0"], "num_samples"),
             (["--model_dir", tiny, "--prompt", "a", "--num_samples", "2", "--stream"], "--stream")]
    for args, words in cases:
        assert sampling_main_inprocess(*args) == 2, args
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and str(words) in err, (args, err)


def test_main_prompt_file_and_interactive(sampling_main_inprocess, capsys, tmp_path, monkeypatch):
    p1, p2 = SAMPLING_PROMPTS[0], SAMPLING_PROMPTS[1]
    models = tmp_path / "models" / "124M"  # the HF folder has no tokenizer: main takes GPT-2's from models/124M
    models.mkdir(parents=True)
    for name in ("encoder.json", "vocab.bpe"):
        shutil.copy(SAMPLING_TINY["tf"] / name, models / name)
    (tmp_path / "prompts.txt").write_text(f"{p1['text']}\n\n{p2['text']}\n")
    common = ["--greedy", "--n_tokens_to_generate", "20", "--models_dir", tmp_path / "models"]
    assert sampling_main_inprocess("--model_dir", SAMPLING_TINY["hf"], "--prompt_file", tmp_path / "prompts.txt",
                                   *common) == 0
    want = f"--- prompt 1 ---\n{p1['greedy_text']}\n--- prompt 2 ---\n{p2['greedy_text']}\n"
    assert capsys.readouterr().out == want
    too_long = "x " * 70  # 70 tokens: with 20 new ones over n_ctx 64
    monkeypatch.setattr(sys, "stdin", io.StringIO(f"{p1['text']}\n\n{too_long}\n{p2['text']}\n"))
    assert sampling_main_inprocess("--model_dir", SAMPLING_TINY["tf"], "--interactive", "--stream", *common) == 0
    out, err = capsys.readouterr()
    assert out == f"{p1['greedy_text']}\n{p2['greedy_text']}\n"
    assert err.startswith("error: a prompt of") and err.count("\n") == 1  # the long prompt, and it went on


def test_main_num_samples(sampling_main_inprocess, capsys):
    assert sampling_main_inprocess("--model_dir", SAMPLING_TINY["tf"], "--prompt", SAMPLING_PROMPTS[1]["text"],
                                   "--num_samples", "2", "--top_k", "40", "--n_tokens_to_generate", "20") == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0::2] == ["--- sample 1 ---", "--- sample 2 ---"] and out[1] != out[3]
