"""Tests of data.py and train.py: dataset preparation against the text and nanoGPT's published token counts, batches
against the memmap, the learning-rate schedule against a float formula, weight decay, exact resume, 4 devices against
1, finetuning the GPT-2 fixture, atomic checkpoints under a simulated crash, the NaN stop, Ctrl-C, config errors, and
that a trained folder is a model folder main.py samples from. Tiny models and few iterations, all offline."""
import json
import math
import os
import pathlib
import shutil
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import safetensors.numpy

import data
import encoder
import sampling
import train
import weights

sampling.enable_compilation_cache()  # at collection, before anything compiles: repeated tiny runs compile once

HERE = pathlib.Path(__file__).parent
TRAIN_SHAKESPEARE = HERE / "testdata" / "tinyshakespeare" / "input.txt"
TRAIN_GPT2_TINY = HERE / "testdata" / "gpt2-tiny"
# dropout and gradient accumulation on, so that the random streams and micro-batches are always covered
TRAIN_TINY = {"n_layer": 2, "n_head": 2, "n_embd": 32, "block_size": 32, "batch_size": 4, "eval_iters": 2,
              "learning_rate": 3e-3, "warmup_iters": 2, "lr_decay_iters": 12, "min_lr": 3e-4, "log_interval": 1,
              "dropout": 0.1, "gradient_accumulation_steps": 2}


@pytest.fixture(scope="module")
def train_data_dir(tmp_path_factory):
    """A data_dir holding tiny Shakespeare, placed by hand as a user without network would."""
    data_dir = tmp_path_factory.mktemp("data")
    (data_dir / "shakespeare_char").mkdir()
    shutil.copy(TRAIN_SHAKESPEARE, data_dir / "shakespeare_char" / "input.txt")
    return data_dir


def train_config(data_dir, out_dir, **overrides):
    return {**TRAIN_TINY, "data_dir": str(data_dir), "out_dir": str(out_dir), **overrides}


def train_run_cli(*args, env=None):
    return subprocess.run([sys.executable, str(HERE / "train.py"), *args], capture_output=True, text=True,
                          cwd=HERE, env={**os.environ, **(env or {})}, timeout=300)


# ------------------------------------------------------------------------------------------------------- data.py

def test_train_prepare_char_dataset(train_data_dir):
    text = TRAIN_SHAKESPEARE.read_text(encoding="utf-8")
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
    text = TRAIN_SHAKESPEARE.read_text(encoding="utf-8")
    folder = data.prepare("shakespeare", train_data_dir, vocab_dir=TRAIN_GPT2_TINY)
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
    folder = data.prepare(str(docs), tmp_path / "data", "gpt2", vocab_dir=TRAIN_GPT2_TINY)
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
    with pytest.raises(FileNotFoundError, match="no dataset 'nothing'"):
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


# ----------------------------------------------------------------------------------------------- optimizer parts

def test_train_learning_rate_schedule_matches_formula():
    config = train.resolve_config({"learning_rate": 6e-4, "min_lr": 6e-5, "warmup_iters": 10, "lr_decay_iters": 50})

    def reference(it):  # nanoGPT's get_lr, in float64
        if it < 10:
            return 6e-4 * (it + 1) / 11
        if it > 50:
            return 6e-5
        return 6e-5 + 0.5 * (1 + math.cos(math.pi * (it - 10) / 40)) * (6e-4 - 6e-5)
    iters = np.array([0, 1, 5, 9, 10, 11, 25, 30, 49, 50, 51, 100])
    in_optimizer = jax.jit(jax.vmap(lambda it: train.learning_rate(it, config)))(iters)  # as optax calls it
    for it, traced in zip(iters, np.asarray(in_optimizer)):
        assert traced == pytest.approx(reference(it), rel=1e-6), it
        assert float(train.learning_rate(it, config, np)) == pytest.approx(reference(it), rel=1e-6), it
    assert train.learning_rate(30, config, np) == pytest.approx((6e-4 + 6e-5) / 2)  # half way down the cosine
    constant = {**config, "decay_lr": False}
    assert float(train.learning_rate(0, constant, np)) == float(train.learning_rate(10**6, constant, np)) == \
        pytest.approx(6e-4)


def test_train_weight_decay_only_on_matrices_and_embeddings():
    hparams = {"n_vocab": 11, "n_ctx": 8, "n_embd": 8, "n_head": 2, "n_layer": 2}
    shapes = jax.eval_shape(lambda: train.gpt.init_params(jax.random.PRNGKey(0), hparams))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: 1 + rng.random(s.shape, np.float32), shapes)
    config = train.resolve_config({"learning_rate": 0.1, "weight_decay": 0.5, "decay_lr": False})
    optimizer = train.make_optimizer(config, params)

    def zero_grad_update(params):  # Adam's step is 0 for zero gradients: what moves is the decay alone
        zero_grads = jax.tree.map(jnp.zeros_like, params)
        return optimizer.update(zero_grads, optimizer.init(params), params)[0]
    updates = jax.jit(zero_grad_update)(params)
    flat = train.flat_names(updates, "")
    decayed = {"wte", "wpe", "h/attn/c_attn/w", "h/attn/c_proj/w", "h/mlp/c_fc/w", "h/mlp/c_proj/w"}
    for name, update in flat.items():
        p = train.flat_names(params, "")[name]
        expected = -0.1 * 0.5 * p if name in decayed else np.zeros_like(p)
        np.testing.assert_allclose(update, expected, rtol=1e-6, err_msg=name)
    assert {n for n in flat if n.endswith(("/b", "/g"))} == set(flat) - decayed  # biases and LayerNorm: no decay


# ---------------------------------------------------------------------------------------------------- training

def train_ckpt_tensors(out_dir):
    return safetensors.numpy.load_file(pathlib.Path(out_dir) / "ckpt.safetensors")


def test_train_resume_repeats_the_uninterrupted_run_bitwise(train_data_dir, tmp_path):
    extra = {"eval_interval": 6}
    straight = train.train(train_config(train_data_dir, tmp_path / "a", max_iters=12, **extra))
    first = train.train(train_config(train_data_dir, tmp_path / "b", max_iters=6, **extra))
    assert train.read_checkpoint_meta(tmp_path / "b" / "ckpt.safetensors")["iter"] == 6
    second = train.train({"init_from": "resume", "out_dir": str(tmp_path / "b"), "max_iters": 12})
    assert sorted(second["losses"]) == list(range(6, 12))
    resumed = {**first["losses"], **second["losses"]}
    assert [resumed[i] for i in range(12)] == [straight["losses"][i] for i in range(12)]  # bitwise equal floats
    assert straight["losses"][11] < straight["losses"][0]  # and it learns
    a, b = train_ckpt_tensors(tmp_path / "a"), train_ckpt_tensors(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
    # the evaluation records continue the same way
    assert straight["evals"][-1]["val_loss"] == second["evals"][-1]["val_loss"]
    lines = (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["iter"] for line in lines] == [0, 6, 12]
    assert set(json.loads(lines[-1])) == {"iter", "train_loss", "val_loss", "lr", "tokens_per_s", "mfu", "elapsed_s"}


TRAIN_DEVICES_SCRIPT = """
import json, sys
import jax, sampling, train
sampling.enable_compilation_cache()
assert jax.device_count() == 4, jax.devices()
config = json.loads(sys.argv[1])
out = {}
for fsdp in (False, True):
    result = train.train({**config, "fsdp": fsdp, "out_dir": config["out_dir"] + str(fsdp)})
    out[str(fsdp)] = [result["losses"][i] for i in sorted(result["losses"])]
print(json.dumps(out))
"""


def test_train_four_devices_match_one(train_data_dir, tmp_path):
    config = train_config(train_data_dir, tmp_path / "one", max_iters=6, eval_interval=6)
    one = train.train(config)
    one = [one["losses"][i] for i in range(6)]
    proc = subprocess.run([sys.executable, "-c", TRAIN_DEVICES_SCRIPT, json.dumps({**config, "out_dir":
                                                                                  str(tmp_path / "four")})],
                          capture_output=True, text=True, cwd=HERE, timeout=300,
                          env={**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
                               "JAX_PLATFORMS": "cpu"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    four = json.loads(proc.stdout.strip().splitlines()[-1])
    for fsdp, losses in four.items():
        np.testing.assert_allclose(losses, one, rtol=1e-5, atol=1e-5, err_msg=f"fsdp={fsdp}")


def test_train_finetune_gpt2_fixture_lowers_the_loss(tmp_path):
    model = tmp_path / "gpt2-tiny"
    shutil.copytree(TRAIN_GPT2_TINY, model)  # weights.py writes its converted cache beside the checkpoint
    text = tmp_path / "sonnets.txt"
    text.write_text(TRAIN_SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
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
    assert hparams == json.loads((TRAIN_GPT2_TINY / "hparams.json").read_text())
    assert enc.n_vocab == 50257 and "b" in params["h"]["attn"]["c_attn"]
    initial = weights.load_hparams_and_params(model)[1]
    assert not np.allclose(params["wte"], initial["wte"])


def test_train_checkpoint_survives_a_crash_mid_write(train_data_dir, tmp_path, monkeypatch):
    out = tmp_path / "out"
    train.train(train_config(train_data_dir, out, max_iters=2, eval_interval=2))
    good = (out / "ckpt.safetensors").read_bytes()
    good_model = (out / "params.safetensors").read_bytes()

    def crash_mid_write(tensors, path, metadata=None):  # half the bytes reach the disk, then the process "dies"
        blob = safetensors.numpy.save(tensors, metadata)
        pathlib.Path(path).write_bytes(blob[:len(blob) // 2])
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(safetensors.numpy, "save_file", crash_mid_write)
    with pytest.raises(OSError, match="No space left"):
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
    # and the intact checkpoint resumes
    result = train.train({"init_from": "resume", "out_dir": str(out), "max_iters": 4})
    assert sorted(result["losses"]) == [2, 3]


def test_train_nan_loss_stops_and_keeps_the_last_good_checkpoint(train_data_dir, tmp_path, capsys):
    out = tmp_path / "out"
    train.train(train_config(train_data_dir, out, max_iters=2, eval_interval=2))
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
    result = train.train(train_config(train_data_dir, out, max_iters=100, eval_interval=50))
    monkeypatch.undo()
    assert result["interrupted"] and result["iter"] == 4
    assert train.read_checkpoint_meta(out / "ckpt.safetensors")["iter"] == 4
    assert (out / "params.safetensors").is_file()  # samplable even before the first evaluation
    resumed = train.train({"init_from": "resume", "out_dir": str(out), "max_iters": 6})
    assert sorted(resumed["losses"]) == [4, 5]


def test_train_eval_only_and_bias(train_data_dir, tmp_path):
    result = train.train(train_config(train_data_dir, tmp_path / "e", eval_only=True, bias=True))
    assert [e["iter"] for e in result["evals"]] == [0] and result["losses"] == {}
    assert not (tmp_path / "e" / "ckpt.safetensors").exists()
    # an untrained model with 65 characters is close to uniform: ln 65
    assert result["evals"][0]["val_loss"] == pytest.approx(math.log(65), abs=0.1)
    hparams = {"n_vocab": 5, "n_ctx": 4, "n_embd": 4, "n_head": 1, "n_layer": 1}
    without = train.drop_biases(jax.eval_shape(lambda: train.gpt.init_params(jax.random.PRNGKey(0), hparams)))
    assert sorted(train.flat_names(without, "")) == ["h/attn/c_attn/w", "h/attn/c_proj/w", "h/ln_1/g", "h/ln_2/g",
                                                     "h/mlp/c_fc/w", "h/mlp/c_proj/w", "ln_f/g", "wpe", "wte"]


def test_train_char_model_folder_samples(train_data_dir, tmp_path):
    out = tmp_path / "out"
    train.train(train_config(train_data_dir, out, max_iters=2, eval_interval=2))
    assert json.loads((out / "meta.json").read_text()) == {"kind": "char",
                                                         "chars": sorted(set(TRAIN_SHAKESPEARE.read_text()))}
    enc, hparams, params = weights.load_encoder_hparams_and_params(str(out))
    assert hparams == {"n_vocab": 65, "n_ctx": 32, "n_embd": 32, "n_head": 2, "n_layer": 2}
    assert enc.decode(enc.encode("ROMEO:")) == "ROMEO:"
    if (HERE / "main.py").exists():
        proc = subprocess.run([sys.executable, str(HERE / "main.py"), "--model_dir", str(out), "--prompt", "ROMEO:",
                               "--n_tokens_to_generate", "12", "--seed", "1"], capture_output=True, text=True,
                              cwd=HERE, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert len(proc.stdout.strip()) > 0


# ------------------------------------------------------------------------------------------------------- config

def test_train_config_file_and_flags(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text('n_layer = 3\nlearning_rate = 1\ndataset = "x"\nbias = true\n')
    overrides = train.parse_args([str(toml), "--n_layer=5", "--eval_only", "--min_lr=2e-5"])
    assert overrides == {"n_layer": 5, "learning_rate": 1.0, "dataset": "x", "bias": True, "eval_only": True,
                         "min_lr": 2e-5}
    as_json = tmp_path / "c.json"
    as_json.write_text('{"max_iters": 7}')
    assert train.parse_args([str(as_json)]) == {"max_iters": 7}
    for path in sorted((HERE / "configs").glob("*.toml")):  # the shipped recipes parse and validate
        train.resolve_config(train.parse_args([str(path)]))
    bad_cases = {
        ("--n_layr=3",): "unknown config key 'n_layr' on the command line; did you mean n_layer?",
        ("--n_layer=three",): "--n_layer takes an integer, not 'three'",
        ("--dropout=nan",): "--dropout takes a finite number",
        ("--bias=maybe",): "--bias takes true or false",
        ("--max_iters",): "--max_iters needs a value",
    }
    for args, message in bad_cases.items():
        with pytest.raises(ValueError, match=message.replace("?", r"\?")):
            train.parse_args(list(args))
    (tmp_path / "bad.toml").write_text("n_layer = \n")
    (tmp_path / "typo.toml").write_text("n_embed = 3\n")
    (tmp_path / "type.toml").write_text('n_layer = "4"\n')
    (tmp_path / "c.py").write_text("n_layer = 4\n")
    with pytest.raises(ValueError, match="bad.toml is not valid TOML"):
        train.parse_args([str(tmp_path / "bad.toml")])
    with pytest.raises(ValueError, match="unknown config key 'n_embed' in .*typo.toml; did you mean n_embd"):
        train.parse_args([str(tmp_path / "typo.toml")])
    with pytest.raises(ValueError, match="n_layer should be int, got '4'"):
        train.parse_args([str(tmp_path / "type.toml")])
    with pytest.raises(ValueError, match="should end in .toml or .json"):
        train.parse_args([str(tmp_path / "c.py")])
    for overrides, message in [({"n_embd": 30, "n_head": 4}, "multiple of n_head"), ({"dtype": "float16"},
                               "float16 needs loss scaling"), ({"dropout": 1.0}, "dropout must be in"),
                               ({"warmup_iters": 50, "lr_decay_iters": 50}, "must exceed warmup_iters")]:
        with pytest.raises(ValueError, match=message):
            train.resolve_config(overrides)


def test_train_cli_errors_are_one_line(tmp_path):
    (tmp_path / "bad.toml").write_text("[[[")
    for args, needle in [(["--n_layr=3"], "did you mean n_layer"), ([str(tmp_path / "bad.toml")], "not valid TOML"),
                         (["--init_from=resume", f"--out_dir={tmp_path}"], "cannot resume")]:
        proc = train_run_cli(*args)
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], proc.stderr
    proc = train_run_cli("--help")
    assert proc.returncode == 0
    for name, default in train.DEFAULTS.items():
        assert f"--{name}=" in proc.stdout, name
    assert "--n_layer=4" in proc.stdout and "--dataset=shakespeare_char" in proc.stdout
