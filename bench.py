"""Benchmarks for gptjax, side by side with the implementation users would otherwise pick, in one run.

    python bench.py generate                  # decode tok/s (batch 1, 8), prefill, compile, load, memory
    python bench.py generate --vs_hf          # ... and the same with Hugging Face transformers on PyTorch, with ratios
    python bench.py generate --model_dir models/124M
    python bench.py train                     # training ms/iter and tokens/s for the small and baby-GPT configs
    python bench.py train --vs_hf             # ... and the same models trained by HF transformers on PyTorch
    python bench.py train --vs_nanogpt ../nanoGPT --nanogpt_python ../venv/bin/python      # ... and by nanoGPT
    python bench.py full_run --vs_nanogpt ../nanoGPT --nanogpt_python ../venv/bin/python   # the default run, whole
    python bench.py finetune                  # finetuning GPT-2 124M / 1558M shapes: planned memory, s/step, peak RSS
    python bench.py data --sizes_mb 100,1000  # data.py on one text of each size: peak memory, MB/s vs the tokenizer
    python bench.py eval --vs_hf              # lm_eval requests/s: gptjax's backend beside the harness's own HF one
    python bench.py generate --dtype int8     # the same with int8 weights (quant.py)
    python bench.py llamacpp --peer_script ../shared/peers/llamacpp.sh --peer_python PY   # main.py beside llama.cpp
    python bench.py serve                     # serve.py's 8 streaming clients beside one batch-8 generate call
    python bench.py recipes                   # iterations to val loss 1.909 (small config): AdamW, WSD, Muon; 3 seeds

With no --model_dir the weights are random with GPT-2 124M's shapes (no download). Timings are medians of repeated runs
after a warm-up; compile times are measured in fresh processes, cold (empty compilation cache) and warm. Peers are
timed in turns with gptjax, round after round, in the same run: shared machines drift by 2-3x over minutes.
torch and transformers are needed only for --vs_hf (`pip install -e ".[bench]"`); --vs_nanogpt takes a checkout of
karpathy/nanoGPT, run unmodified by a python that has torch and numpy (a CPU build of torch is enough).

Probes. What must be measured in a fresh process (compile time with a cold cache, load time and peak RSS, a finetuning
step's memory) runs as `python bench.py probe KIND ARG`: the probe does one measurement and prints it as one JSON
object on the last line of its stdout, which the parent parses (probe_json); anything else it prints is ignored.
"""
import argparse
import importlib.util
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

import cli
import data
import devices
import gpt
import optim
import outdir
import quant
import sampling
import train
import train_config
import weights

HERE = os.path.dirname(os.path.abspath(__file__))
GPT2_124M = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}
GPT2_1558M = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 1600, "n_head": 25, "n_layer": 48}


def random_params(hparams, dtype=jnp.float32, seed=0):
    # numpy draws, so that making weights compiles nothing (keeps compile-time measurements clean)
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: gpt.init_params(jax.random.PRNGKey(0), hparams))
    return jax.tree.map(lambda s: jnp.asarray(0.02 * rng.standard_normal(s.shape, np.float32)).astype(dtype), shapes)


def median_time(fn, repeats):
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def copy_bandwidth():  # bytes read + written per second by a large copy in the memory that holds the weights
    if jax.default_backend() == "cpu":  # numpy into a preallocated buffer: XLA would also time fresh page faults
        src = np.ones(2**27, np.float32)
        dst = np.zeros_like(src)
        copy = lambda: np.copyto(dst, src)
    else:
        src = jnp.ones(2**28, jnp.float32)
        add_one = jax.jit(lambda x: x + 1)
        copy = lambda: add_one(src).block_until_ready()
    copy()
    return max(2 * src.nbytes / median_time(copy, 1) for _ in range(5))


def read_bandwidth():  # bytes per second that XLA reads from memory with all its threads (a sum over 512 MB)
    x = jnp.ones(2**27, jnp.float32)
    total = jax.jit(jnp.sum)
    total(x).block_until_ready()
    return max(x.nbytes / median_time(lambda: total(x).block_until_ready(), 1) for _ in range(5))


def depth_rows(layers, hparams, batches, depths, repeats, kv_dtypes=(None,), n_steps=32):
    """Decoding after depth cached positions: ms per step from generate's time for 1 + n_steps and 1 new tokens (the
    prompt's prefill cancels out), the bytes a step must read (the weights once, each row's K and V of depth + n_steps
    / 2 positions) and that as a % of what the read bandwidth allows; for each KV cache dtype (None: the compute
    dtype's), timed in turns."""
    bandwidth, rows = read_bandwidth(), []
    for depth in depths:
        for b in batches:
            prompts = [list((np.arange(depth) + 7 * r) % 50000) for r in range(b)]
            runs = [partial(sampling.generate, layers, hparams, prompts, n, greedy=True, kv_dtype=kv_dtype)
                    for kv_dtype in kv_dtypes for n in (1, 1 + n_steps)]
            for run in runs:
                run()
            times = interleaved_medians(runs, repeats)
            for i, kv_dtype in enumerate(kv_dtypes):
                step = (times[2 * i + 1] - times[2 * i]) / n_steps
                itemsize = jnp.dtype(kv_dtype or gpt.dtype(layers)).itemsize
                read = weight_bytes_per_token(layers) + 2 * hparams["n_layer"] * hparams["n_embd"] * itemsize * (
                    depth + n_steps / 2) * b
                cache = f", {kv_dtype} KV cache" if kv_dtype else ""
                rows.append((f"decode after {depth} cached positions, batch {b}{cache}: ms/step; MB read/step; % of "
                             f"floor", f"{1e3 * step:.2f}; {read / 1e6:.0f}; {100 * read / bandwidth / step:.0f}%",
                             ""))
    return rows, bandwidth


def weight_bytes_per_token(params):
    # decoding one token reads every weight once, except the position table (one row)
    total = sum(p.size * p.dtype.itemsize for p in jax.tree.leaves(params))
    return total - params["wpe"].size * params["wpe"].dtype.itemsize


def decode_prompts(batch, n_prompt):
    return [list(range(1000 + r, 1000 + r + n_prompt)) for r in range(batch)]


def gptjax_decode(params, hparams, batch, n_prompt, n_new):  # -> (a function that decodes, the tokens it decodes)
    run = lambda: sampling.generate(params, hparams, decode_prompts(batch, n_prompt), n_new, greedy=True)
    return run, run()


def gptjax_prefill(params, hparams, n_prompt):
    prompts = [list(np.arange(n_prompt) % 50000)]
    run = lambda: sampling.generate(params, hparams, prompts, 1, greedy=True)
    run()
    return run


def interleaved_medians(fns, repeats):
    # time the functions in turns (ABAB...), so that a machine that speeds up or slows down during the run (shared
    # CPUs do) affects them alike; -> the median seconds of each
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times):
            ts.append(median_time(fn, 1))
    return [float(np.median(ts)) for ts in times]


def hf_model(params, hparams):
    import torch  # here and in the other hf_ functions: the bench extra, needed only with --vs_hf
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=hparams["n_vocab"], n_positions=hparams["n_ctx"], n_embd=hparams["n_embd"],
                        n_layer=hparams["n_layer"], n_head=hparams["n_head"], activation_function="gelu_new",
                        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    model = GPT2LMHeadModel(config).eval()
    state = {name: torch.from_numpy(x) for name, x in weights.hf_tensors(hparams, params).items()}  # HF's layout
    model.load_state_dict(state, strict=False)
    model.tie_weights()
    return model


def hf_decode(model, batch, n_prompt, n_new):  # -> (a function that decodes, the tokens it decodes)
    import torch

    ids = torch.tensor(decode_prompts(batch, n_prompt))

    def run():
        with torch.no_grad():
            return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                  min_new_tokens=n_new, do_sample=False, use_cache=True, pad_token_id=50256)
    return run, run()[:, n_prompt:].tolist()


def hf_prefill(model, n_prompt):
    import torch

    ids = torch.tensor([list(np.arange(n_prompt) % 50000)])

    def run():
        with torch.no_grad():
            return model(ids)
    run()
    return run


TRAIN_CONFIGS = ("configs/shakespeare_char_small.toml", "configs/shakespeare_char.toml")
NANOGPT_WARMUP = 5  # nanoGPT iterations left out of its median: iteration 0 evaluates, the next few warm up


def bench_config(config_file, dtype_name=None):
    overrides = train_config.read_config_file(os.path.join(HERE, config_file))
    if dtype_name:
        overrides["dtype"] = dtype_name
    return train_config.resolve_config(overrides)


def gptjax_trainer(config):
    """A function that runs n training iterations of config's model and batch and returns their seconds each:
    train.py's own compiled step (forward, backward, AdamW) on a fresh batch of random characters every iteration,
    driven as train.py's loop drives it (each loss is read on the host one step late, so the next batch is made while
    the device computes), each timed from one loss read to the next. Compiled here, before any timing."""
    params = train.init_params(config, train.scratch_hparams(config, 65))  # 65: tiny Shakespeare's characters
    optimizer = optim.make_optimizer(config, params)
    state = {"params": params, "opt_state": jax.jit(optimizer.init)(params), "it": 0}
    step = jax.jit(train.step_function(config, optimizer, config["n_head"]), donate_argnums=(0, 1))
    shape = (config["gradient_accumulation_steps"], config["batch_size"], config["block_size"])
    rng = np.random.default_rng(0)

    def run(n):
        times, pending, t = [], None, time.perf_counter()
        for _ in range(n + 1):
            x, y = (jnp.asarray(rng.integers(0, 65, shape, dtype=np.int32)) for _ in range(2))
            state["params"], state["opt_state"], loss = step(state["params"], state["opt_state"], x, y, state["it"])
            state["it"] += 1
            if pending is not None:
                float(pending)
                times.append(time.perf_counter() - t)
                t = time.perf_counter()
            pending = loss
        float(pending)  # the extra step keeps the pipeline full to the last timed one; it is not counted
        return times
    run(2)  # compile and warm up
    return run


FINETUNE_SHAPES = {"124M": GPT2_124M, "1558M": GPT2_1558M}


def finetune_probe(spec):
    """In a fresh process (its peak RSS is its own): one finetuning configuration of GPT-2-shaped random weights,
    "SHAPE,MODE" with MODE plain, remat, lora, lora+remat or lora+remat+bf16 (the frozen weights in bfloat16), block
    1024, batch 1, float32: XLA's memory plan for the step and, when it fits, seconds per step and the process's peak
    RSS. Prints one JSON line."""
    shape, mode = spec.split(",")
    hparams = FINETUNE_SHAPES[shape]
    lora = "lora" in mode
    config = train_config.resolve_config({"n_layer": hparams["n_layer"], "n_head": hparams["n_head"],
                                   "n_embd": hparams["n_embd"], "block_size": 1024, "batch_size": 1,
                                   "gradient_accumulation_steps": 1, "dropout": 0.0, "bias": True,
                                   "remat": "remat" in mode, "init_from": "124M" if lora else "scratch",
                                   "lora_rank": 16 if lora else 0,
                                   "lora_base_dtype": "bfloat16" if "bf16" in mode else "float32"})
    params, frozen = train.init_params(config, hparams), None
    if lora:  # the random weights are the frozen base; the adapters train
        frozen = gpt.cast(params, jnp.dtype(config["lora_base_dtype"]))
        params = gpt.init_adapters(jax.random.PRNGKey(0), frozen, 16)
    optimizer = optim.make_optimizer(config, params)
    mesh = train.Mesh(np.array(jax.devices()[:1]), ("data",))
    step, plan, _ = train.compiled_step(config, optimizer, hparams["n_head"], mesh, params, frozen)
    result = {"plan_gb": plan["total"] / 1e9, "step_gb": plan["step"] / 1e9, "fits": True}
    try:
        train.check_memory(plan, config)
    except MemoryError:
        result["fits"] = False
        print(json.dumps(result))
        return
    opt_state = jax.jit(optimizer.init)(params)
    x = jnp.asarray(np.random.default_rng(0).integers(0, hparams["n_vocab"], (1, 1, 1024), dtype=np.int32))
    times = []
    for it in range(2 if hparams["n_layer"] > 12 else 4):  # compiled above: every call is a plain step
        t = time.perf_counter()
        params, opt_state, loss = step(params, opt_state, x, x, it, frozen)
        float(loss)
        times.append(time.perf_counter() - t)
    result.update(s_per_step=float(np.median(times[1:])), peak_rss_gb=devices.peak_memory() / 1e9)
    print(json.dumps(result))


def finetune_table():
    rows = []
    for shape in FINETUNE_SHAPES:
        for mode in ("plain", "remat", "lora", "lora+remat", "lora+remat+bf16"):
            try:
                r = probe_json("finetune", f"{shape},{mode}")
            except ValueError as e:
                rows.append(f"| {shape} | {mode} | failed: {str(e)[:80]} | | |")
                continue
            timing = (f"{r['s_per_step']:.2f} | {r['peak_rss_gb']:.2f}" if r["fits"] else "does not fit: refused | ")
            rows.append(f"| {shape} | {mode} | {r['plan_gb']:.2f} ({r['step_gb']:.2f} of it the step's) | {timing} |")
    print(f"device: {jax.devices()[0].device_kind}, jax {jax.__version__}; finetuning (all weights, or LoRA rank 16 on "
          f"the attention and MLP matrices), float32, AdamW, block 1024, batch 1, random weights of GPT-2's shapes")
    print("| shape | | planned GB (XLA) | s/step | peak RSS GB |\n|---|---|---|---|---|")
    print("\n".join(rows))


def hf_trainer(config):
    """The same, for the same model in HF transformers on PyTorch (eager, float32, AdamW, gradient clipping): the
    kind of training loop nanoGPT runs, without a checkout of it."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=65, n_positions=config["block_size"], n_embd=config["n_embd"], n_layer=config["n_layer"],
        n_head=config["n_head"], activation_function="gelu_new", resid_pdrop=config["dropout"],
        embd_pdrop=config["dropout"], attn_pdrop=config["dropout"], bos_token_id=0, eos_token_id=0)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["learning_rate"],
                                  betas=(config["beta1"], config["beta2"]), weight_decay=config["weight_decay"])
    shape = (config["gradient_accumulation_steps"], config["batch_size"], config["block_size"])

    def run(n):
        times = []
        for _ in range(n):
            t = time.perf_counter()
            ids = torch.randint(0, 65, shape)
            for micro in ids:
                loss = model(micro, labels=micro).loss / len(ids)
                loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            loss.item()
            times.append(time.perf_counter() - t)
        return times
    run(2)
    return run


# config keys that nanoGPT's train.py takes under the same names and meanings
NANOGPT_KEYS = ("eval_interval", "log_interval", "eval_iters", "always_save_checkpoint", "gradient_accumulation_steps",
                "batch_size", "block_size", "n_layer", "n_head", "n_embd", "dropout", "bias", "learning_rate",
                "max_iters", "weight_decay", "beta1", "beta2", "grad_clip", "decay_lr", "warmup_iters",
                "lr_decay_iters", "min_lr")


def nanogpt_command(args, config, out_dir, **overrides):
    """nanoGPT's train.py, unmodified, on tiny Shakespeare's characters with config's settings (float32 on the CPU,
    no torch.compile: its CPU recipe) -> (argv, cwd)."""
    settings = {**{k: config[k] for k in NANOGPT_KEYS}, **overrides}
    flags = [f"--{k}={v}" for k, v in settings.items()]
    return ([args.nanogpt_python, "train.py", "config/train_shakespeare_char.py", "--device=cpu", "--compile=False",
             "--dtype=float32", "--wandb_log=False", f"--out_dir={out_dir}", *flags], args.vs_nanogpt)


def prepare_nanogpt_data(args):
    """nanoGPT reads data/shakespeare_char/{train,val}.bin from its checkout: made by its own prepare.py from the
    input.txt that gptjax uses (data.py fetches it when missing)."""
    folder = os.path.join(args.vs_nanogpt, "data", "shakespeare_char")
    if not os.path.isfile(os.path.join(folder, "prepare.py")):
        raise ValueError(f"{args.vs_nanogpt} is not a checkout of karpathy/nanoGPT (no data/shakespeare_char/"
                         f"prepare.py)")
    if os.path.isfile(os.path.join(folder, "train.bin")):
        return
    ours = data.prepare("shakespeare_char", args.data_dir)
    shutil.copyfile(os.path.join(ours, "input.txt"), os.path.join(folder, "input.txt"))
    subprocess.run([args.nanogpt_python, "prepare.py"], cwd=folder, check=True, capture_output=True)


def nanogpt_trainer(args, config):
    """A function that runs nanoGPT's train.py for n + NANOGPT_WARMUP iterations in a fresh process and returns the
    seconds of each iteration after the warm-up, as its log prints them."""
    prepare_nanogpt_data(args)

    def run(n):
        with tempfile.TemporaryDirectory() as out_dir:
            argv, cwd = nanogpt_command(args, config, out_dir, max_iters=n + NANOGPT_WARMUP, eval_interval=10**9,
                                        eval_iters=1, log_interval=1, always_save_checkpoint=False)
            proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
        if proc.returncode:
            raise ValueError(f"nanoGPT's train.py failed: {proc.stderr.strip().splitlines()[-1:]}")
        times = [float(ms) / 1e3 for it, ms in re.findall(r"^iter (\d+): loss [0-9.]+, time ([0-9.]+)ms",
                                                           proc.stdout, re.M) if int(it) >= NANOGPT_WARMUP]
        return times
    return run


def train_table(args):
    # each config's trainers are set up first (compiled), then timed in turns, round after round: a machine that
    # speeds up or slows down during the run affects them alike. Medians of the per-iteration times.
    iters = {TRAIN_CONFIGS[0]: args.small_iters, TRAIN_CONFIGS[1]: args.baby_iters}
    peers = (["HF transformers"] if args.vs_hf else []) + (["nanoGPT"] if args.vs_nanogpt else [])
    rows = []
    for config_file in args.configs.split(","):
        config = bench_config(config_file, args.dtype)
        trainers = {"gptjax": gptjax_trainer(config)}
        if args.vs_hf:
            trainers["HF transformers"] = hf_trainer(config)
        if args.vs_nanogpt:
            trainers["nanoGPT"] = nanogpt_trainer(args, config)
        times = {name: [] for name in trainers}
        for _ in range(args.rounds):
            for name, run in trainers.items():
                times[name] += run(iters[config_file])
        ms = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
        tokens = config["batch_size"] * config["block_size"] * config["gradient_accumulation_steps"]
        name = (f"{config['n_layer']} layers, {config['n_embd']} wide, block {config['block_size']}, "
                f"batch {config['batch_size']}, dropout {config['dropout']}")
        cells = [f"{ms['gptjax']:,.1f} ms ({1e3 * tokens / ms['gptjax']:,.0f} tok/s)"]
        for peer in peers:
            cells.append(f"{ms[peer]:,.1f} ms ({1e3 * tokens / ms[peer]:,.0f} tok/s): {ms[peer] / ms['gptjax']:.2f}x")
        rows.append([name] + cells)
    print(f"\ndevice: {jax.devices()[0].device_kind} ({jax.device_count()} x {jax.default_backend()}), jax "
          f"{jax.__version__}, {os.cpu_count()} CPUs; medians of {args.rounds} rounds in turns; ratio = peer time / "
          f"gptjax time (above 1: gptjax faster)")
    print("| training step, per iteration | gptjax | " + " | ".join(peers) + " |\n|" + "---|" * (2 + len(peers)))
    for row in rows:
        print("| " + " | ".join(row) + " |")


def full_run_table(args):
    """Wall time of the default `python train.py` (2000 iterations with its evaluations, startup and compilation,
    into an empty compilation cache) and of nanoGPT's train.py with the same settings, in turns."""
    config = train_config.resolve_config({})
    prepare_nanogpt_data(args)
    seconds = {"gptjax": [], "nanoGPT": []}
    losses = {}
    for _ in range(args.rounds):
        with tempfile.TemporaryDirectory() as tmp:
            env = {**os.environ, "GPTJAX_COMPILATION_CACHE": os.path.join(tmp, "cache")}
            argv = [sys.executable, os.path.join(HERE, "train.py"), f"--out_dir={tmp}/out",
                    f"--data_dir={args.data_dir}"]
            t = time.perf_counter()
            proc = subprocess.run(argv, env=env, capture_output=True, text=True)
            seconds["gptjax"].append(time.perf_counter() - t)
            if proc.returncode:
                raise ValueError(f"train.py failed: {proc.stderr.strip().splitlines()[-1:]}")
            last = json.loads(open(os.path.join(tmp, "out", "metrics.jsonl")).read().splitlines()[-1])
            losses["gptjax"] = last["val_loss"]
            argv, cwd = nanogpt_command(args, config, os.path.join(tmp, "nano"))
            t = time.perf_counter()
            proc = subprocess.run(argv, cwd=cwd, capture_output=True, text=True)
            seconds["nanoGPT"].append(time.perf_counter() - t)
            if proc.returncode:
                raise ValueError(f"nanoGPT's train.py failed: {proc.stderr.strip().splitlines()[-1:]}")
            losses["nanoGPT"] = float(re.findall(r"val loss ([0-9.]+)", proc.stdout)[-1])
    ours, theirs = float(np.median(seconds["gptjax"])), float(np.median(seconds["nanoGPT"]))
    print(f"\ndevice: {jax.devices()[0].device_kind} ({jax.device_count()} x {jax.default_backend()}), jax "
          f"{jax.__version__}, {os.cpu_count()} CPUs; {args.rounds} round(s) in turns, empty compilation cache")
    print("| default run (python train.py, 2000 iterations, evaluations included) | gptjax | nanoGPT | time ratio |\n"
          "|---|---|---|---|")
    print(f"| wall time (s), final val loss | {ours:.1f}, {losses['gptjax']:.4f} | {theirs:.1f}, "
          f"{losses['nanoGPT']:.4f} | {ours / theirs:.2f} (gptjax / nanoGPT) |")


RECIPES = {"adamw, cosine": ("configs/shakespeare_char_small.toml", {}),  # name: (config file, overrides)
           "adamw, wsd": ("configs/shakespeare_char_small.toml", {"lr_schedule": "wsd"}),
           "muon, wsd": ("configs/shakespeare_char_small_muon.toml", {})}


def recipe_evals(config_file, overrides, seed, eval_interval, data_dir):  # train.py's evaluations of one whole run
    with tempfile.TemporaryDirectory() as tmp:
        flags = [f"--{k}={v}" for k, v in {**overrides, "seed": seed, "eval_interval": eval_interval,
                                             "out_dir": f"{tmp}/out", "data_dir": data_dir}.items()]
        proc = subprocess.run([sys.executable, os.path.join(HERE, "train.py"), config_file, *flags],
                              capture_output=True, text=True, cwd=HERE)
        if proc.returncode:
            raise ValueError(f"train.py {config_file} failed: {proc.stderr.strip().splitlines()[-1:]}")
        return outdir.read_metrics(pathlib.Path(tmp) / "out")


def recipes_table(args):
    """Iterations each recipe needs to reach a validation loss (default: 1.909, AdamW's at 2,000 iterations of the
    small config), seed by seed: the first evaluation (every --eval_interval) at or below it; then the step time of
    each optimizer, timed in turns. Iterations do not depend on the machine's speed; step times are ratios."""
    seeds = [int(s) for s in args.seeds.split(",")]
    configs = {name: train_config.resolve_config({**train_config.read_config_file(os.path.join(HERE, config_file)),
                                                  **overrides}) for name, (config_file, overrides) in RECIPES.items()}
    rows = []
    for name, (config_file, overrides) in RECIPES.items():
        reached, finals = [], []
        for seed in seeds:
            evals = recipe_evals(config_file, overrides, seed, args.eval_interval, args.data_dir)
            reached.append(next((e["iter"] for e in evals if e["val_loss"] <= args.target), None))
            finals.append(evals[-1]["val_loss"])
        config = configs[name]
        hits = [r for r in reached if r is not None]
        mean = f"{np.mean(hits):,.0f}" + ("" if len(hits) == len(seeds) else f" ({len(hits)} of {len(seeds)})")
        rows.append([name, f"{config['max_iters']:,}", ", ".join("-" if r is None else f"{r:,}" for r in reached),
                     mean if hits else "-", ", ".join(f"{v:.4f}" for v in finals)])
    trainers = {name: gptjax_trainer(configs[name]) for name in ("adamw, cosine", "muon, wsd")}
    times = {name: [] for name in trainers}
    for _ in range(args.rounds):
        for name, run in trainers.items():
            times[name] += run(args.step_iters)
    ms = {name: 1e3 * float(np.median(t)) for name, t in times.items()}
    print(f"\ndevice: {jax.devices()[0].device_kind} ({jax.device_count()} x {jax.default_backend()}), jax "
          f"{jax.__version__}, {os.cpu_count()} CPUs; seeds {args.seeds}; evaluations every {args.eval_interval}")
    print(f"| recipe | max_iters | iterations to val loss <= {args.target} (by seed) | mean | final val loss |\n"
          "|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    print(f"step time (medians of {args.rounds} rounds in turns): adamw {ms['adamw, cosine']:.1f} ms, muon "
          f"{ms['muon, wsd']:.1f} ms: {ms['muon, wsd'] / ms['adamw, cosine']:.2f}x")


def data_table(args):
    """python data.py on one text of each size, in a fresh process each: its peak RSS (the whole process, jax's import
    included) and its speed, beside the tokenizer's own speed on one 8 MB piece of the same text in this process."""
    rows = []
    with tempfile.TemporaryDirectory(dir=HERE) as tmp:
        words = open(data.SHAKESPEARE, encoding="utf-8").read().split()
        rng = np.random.default_rng(0)
        piece = " ".join(rng.choice(words, 2_000_000)) + "\n"  # ~11 MB of Shakespeare's words in random order
        enc = data.gpt2_encoder(data.encoder.GPT2_VOCAB) if args.tokens == "gpt2" else None
        sample = piece[:8 << 20]
        t = time.perf_counter()
        enc.encode_ordinary(sample) if enc else data.char_encoder(sorted(set(sample)))(sample)
        tokenizer_mb_s = len(sample.encode()) / 1e6 / (time.perf_counter() - t)
        for size in args.sizes_mb:
            path = os.path.join(tmp, f"text{size}.txt")
            with open(path, "w", encoding="utf-8") as f:
                written = 0
                while written < size * 1e6:
                    written += f.write(piece)
            r = probe_json("data", f"{path},{args.tokens},{tmp}/data")
            rows.append(f"| {written / 1e6:,.0f} MB | {r['peak_rss_mib']:,.0f} MiB | {r['seconds']:.1f} s | "
                        f"{written / 1e6 / r['seconds']:.1f} MB/s | {tokenizer_mb_s:.1f} MB/s |")
            os.unlink(path)
    print(f"\ndata.py's preparation of one text, --tokens={args.tokens}, {os.cpu_count()} CPUs, each size in a fresh "
          f"process (its peak RSS includes the imports, jax's among them)")
    print("| text | peak RSS | time | data.py | tokenizer alone |\n|---|---|---|---|---|")
    print("\n".join(rows))


EVAL_SHAPES = {  # name: (words of context, words of each ending) of a synthetic multiple-choice task, 4 endings each
    "shared_context": (60, 12),  # HellaSwag's shape: a long context shared by four short endings
    "long_endings": (6, 60),     # a short question with four long answers: little to share
}


def shaped_requests(shape, n_questions=30):  # four loglikelihood requests per question, words of tiny Shakespeare
    from lm_eval.api.instance import Instance
    context_words, ending_words = EVAL_SHAPES[shape]
    words = open(data.SHAKESPEARE, encoding="utf-8").read().split()
    rng = np.random.default_rng(0)

    def text(n):
        start = int(rng.integers(0, len(words) - n))
        return " ".join(words[start:start + n])
    requests = []
    for _ in range(n_questions):
        context = text(context_words)
        for _choice in range(4):
            requests.append(Instance("loglikelihood", {}, (context, " " + text(ending_words)), len(requests)))
    return requests


def eval_table(args):
    """Loglikelihood requests scored by gptjax's lm_eval backend and, with --vs_hf, by the harness's own HF backend on
    the same random 124M-shaped weights (exported with weights.to_hf), in turns, after a warm-up round, at each
    batch size. Task shapes: tiny_choice (testdata/eval's 120 requests; each backend's accuracy on it through
    simple_evaluate, which must agree) and EVAL_SHAPES' synthetic ones (the backends' log-likelihoods must agree)."""
    from lm_eval.api.registry import get_model  # the eval extra, and (--vs_hf) the bench extra: only for this mode

    import harness
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        weights.save_params(os.path.join(tmp, "own"), GPT2_124M, random_params(GPT2_124M))
        weights.to_hf(os.path.join(tmp, "own"), os.path.join(tmp, "hf"))
        for batch_size in args.batch_sizes:
            backends = {"gptjax": harness.GptjaxLM(os.path.join(tmp, "own"), batch_size=batch_size)}
            if args.vs_hf:
                backends["HF"] = get_model("hf")(pretrained=os.path.join(tmp, "hf"), device="cpu",
                                                 batch_size=batch_size, dtype="float32")
            for shape in args.shapes:
                if shape == "tiny_choice":
                    requests, agree = tiny_choice_requests(backends)
                else:
                    requests = shaped_requests(shape)
                    scores = [np.array([ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True)])
                              for lm in backends.values()]
                    agree = f"max diff {np.abs(scores[-1] - scores[0]).max():.1e}" if args.vs_hf else ""
                fns = [lambda lm=lm, r=requests: lm.loglikelihood(r, disable_tqdm=True) for lm in backends.values()]
                seconds = interleaved_medians(fns, args.rounds)
                cells = [f"{len(requests) / s:.1f}" for s in seconds] + [""]
                ratio = f"{seconds[1] / seconds[0]:.2f}x" if args.vs_hf else ""
                rows.append(f"| {shape} | {batch_size} | {cells[0]} | {cells[1]} | {ratio} | {agree} |")
    print(f"\ndevice: {jax.devices()[0].device_kind}, jax {jax.__version__}, {os.cpu_count()} CPUs; 124M-shaped "
          f"random weights, float32, medians of {args.rounds} rounds in turns; shapes (context / ending words, 4 "
          f"endings): " + ", ".join(f"{name} {c} / {e}" for name, (c, e) in EVAL_SHAPES.items()))
    print("| task shape | batch | gptjax requests/s | HF requests/s | gptjax / HF | agreement |\n"
          "|---|---|---|---|---|---|")
    print("\n".join(rows))


def tiny_choice_requests(backends):  # -> testdata/eval's requests, the backends' accuracies on the task
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=os.path.join(HERE, "testdata", "eval"))
    cwd = os.getcwd()
    os.chdir(HERE)  # the task names its data relative to the checkout
    try:
        task = lm_eval.tasks.get_task_dict(["tiny_choice"], manager)["tiny_choice"]
        task.build_all_requests(limit=None, rank=0, world_size=1)
        accuracy = [lm_eval.simple_evaluate(model=lm, tasks=["tiny_choice"], task_manager=manager,
                                            log_samples=False)["results"]["tiny_choice"]["acc,none"]
                    for lm in backends.values()]
    finally:
        os.chdir(cwd)
    return list(task.instances), "acc " + " / ".join(f"{a:.4f}" for a in accuracy)


def compile_probe(spec):
    # "SHAPE,DTYPE", in a fresh process: time the first generation (compile + run) and a second one (run only)
    hparams_name, dtype = spec.split(",")
    hparams = {"124M": GPT2_124M, "1558M": GPT2_1558M}[hparams_name]
    shapes = jax.eval_shape(lambda: gpt.init_params(jax.random.PRNGKey(0), hparams, jnp.dtype(dtype)))
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
    prompts = [list(range(1000, 1010))]
    t = time.perf_counter()
    sampling.generate(params, hparams, prompts, 64, greedy=True)
    first = time.perf_counter() - t
    t = time.perf_counter()
    sampling.generate(params, hparams, prompts, 64, greedy=True)
    second = time.perf_counter() - t
    print(json.dumps({"compile_s": first - second}))


def compile_time(hparams_name, cache_dir, dtype="float32"):
    return probe_json("compile", f"{hparams_name},{dtype}", GPTJAX_COMPILATION_CACHE=cache_dir)["compile_s"]


def data_probe(spec):  # "PATH,TOKENS,DATA_DIR": prepare the text as data.py does; its time and this process's peak
    path, tokens, data_dir = spec.split(",")
    t = time.perf_counter()
    data.prepare(path, data_dir, tokens)
    seconds = time.perf_counter() - t
    print(json.dumps({"seconds": seconds, "peak_rss_mib": devices.proc_bytes("/proc/self/status", "VmHWM") / 2**20}))


def load_probe(model_dir):
    t = time.perf_counter()
    hparams, params = weights.load_hparams_and_params(model_dir)
    jax.block_until_ready(params)
    seconds = time.perf_counter() - t
    # VmHWM, not ru_maxrss: the latter can carry the parent's peak across fork + exec
    status = open("/proc/self/status").read()
    peak_mib = int(status.split("VmHWM:")[1].split()[0]) / 1024
    print(json.dumps({"load_s": seconds, "peak_rss_mib": peak_mib,
                      "weights_mib": sum(p.nbytes for p in jax.tree.leaves(params)) / 2**20}))


def load_time(model_dir):
    return probe_json("load", str(model_dir))


def probe_json(kind, arg, **env):
    """Run `python bench.py probe KIND ARG` in a fresh process (env: extra environment variables) -> the JSON object
    on the last line of its stdout; ValueError with its last line of stderr when it fails."""
    out = subprocess.run([sys.executable, __file__, "probe", kind, arg], capture_output=True, text=True,
                         env={**os.environ, **env})
    if out.returncode:
        raise ValueError(f"probe {kind} {arg} failed: {(out.stderr.strip().splitlines() or ['?'])[-1]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def positive(text):  # an argparse type: a whole number of at least 1
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"takes a whole number of at least 1, not {text!r}")
    return value


def task_shapes(text):  # an argparse type: "tiny_choice,long_endings" -> the names, each known
    names = text.split(",")
    for name in names:
        if name != "tiny_choice" and name not in EVAL_SHAPES:
            raise argparse.ArgumentTypeError(f"unknown task shape {name!r}: choose from tiny_choice, "
                                             + ", ".join(EVAL_SHAPES))
    return names


def batch_sizes(text):  # "1,8" -> [1, 8]
    return [positive(size) for size in text.split(",")]


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = ap.add_subparsers(dest="command", required=True, metavar="{generate,train,full_run,finetune}")
    gen = commands.add_parser("generate", help="decoding, prefill, compile and load times")
    gen.add_argument("--model_dir", help="a model folder (any layout main.py reads); default: random 124M-shaped "
                                         "weights")
    gen.add_argument("--vs_hf", action="store_true", help="also run HF transformers (PyTorch) on the same weights")
    gen.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "int8"],
                     help="of the weights (int8: quant.py's, with float32 activations)")
    gen.add_argument("--batches", default="1,8", type=batch_sizes, help="decode batch sizes, comma separated")
    gen.add_argument("--n_prompt", type=positive, default=10)
    gen.add_argument("--n_new", type=positive, default=64)
    gen.add_argument("--repeats", type=positive, default=5)
    gen.add_argument("--skip_compile", action="store_true", help="skip the cold/warm compile-time probes")
    gen.add_argument("--depths", default="8,256,880", type=batch_sizes, help="cached positions to decode after "
                                                                              "(comma separated; the floor rows)")
    gen.add_argument("--kv_cache", choices=["float32", "bfloat16"], help="also time the decode-after-depth rows with "
                                                                         "this KV cache dtype, in turns")
    tr = commands.add_parser("train", help="training ms/iter, in turns with the peers")
    tr.add_argument("--vs_hf", action="store_true", help="also train the same models with HF transformers")
    tr.add_argument("--configs", default=",".join(TRAIN_CONFIGS), help="config files to time")
    tr.add_argument("--dtype", help="the compute dtype (default: train.py's auto)")
    tr.add_argument("--small_iters", type=positive, default=30, help="iterations per round, small config")
    tr.add_argument("--baby_iters", type=positive, default=3, help="iterations per round, baby GPT")
    full = commands.add_parser("full_run", help="the default python train.py, start to end, beside nanoGPT's")
    for sub in (tr, full):
        sub.add_argument("--vs_nanogpt", metavar="DIR", required=sub is full,
                         help="also run nanoGPT's train.py from this checkout of karpathy/nanoGPT, unmodified")
        sub.add_argument("--nanogpt_python", default=sys.executable, help="the python (with torch) that runs nanoGPT")
        sub.add_argument("--rounds", type=positive, default=3, help="rounds of timing in turns")
        sub.add_argument("--data_dir", default="data", help="where tiny Shakespeare is (or is fetched to) for nanoGPT")
    dat = commands.add_parser("data", help="data.py on one synthetic text of each size: peak RSS and MB/s, beside "
                                            "the tokenizer's own speed")
    dat.add_argument("--sizes_mb", default="100,1000", type=batch_sizes, help="text sizes in MB, comma separated")
    dat.add_argument("--tokens", default="gpt2", choices=["char", "gpt2"])
    ev = commands.add_parser("eval", help="lm-evaluation-harness requests/s on 124M-shaped weights and a local "
                                          "multiple-choice task, beside the harness's HF backend")
    ev.add_argument("--vs_hf", action="store_true", help="also run the harness's own HF backend (torch)")
    ev.add_argument("--batch_sizes", type=batch_sizes, default="1,8", help="comma separated")
    ev.add_argument("--shapes", default="tiny_choice,shared_context,long_endings", type=task_shapes,
                    help="task shapes, comma separated: tiny_choice (testdata/eval), " + ", ".join(EVAL_SHAPES))
    ev.add_argument("--rounds", type=positive, default=3)
    lc = commands.add_parser("llamacpp", help="main.py's decoding (float32 and int8, as whole processes) in turns "
                                              "with llama.cpp (F32 and Q8_0) on the same 124M-shaped weights")
    lc.add_argument("--peer_script", required=True, help="the script that builds and runs llama.cpp (the project's "
                                                         "peers/llamacpp.sh in the steering repo)")
    lc.add_argument("--peer_python", required=True, help="a python with torch and transformers, for llama.cpp's "
                                                         "converter")
    lc.add_argument("--rounds", type=positive, default=3)
    sv = commands.add_parser("serve", help="serve.py with concurrent streaming clients, in turns with one batched "
                                           "generate call of the same requests; time to first token")
    sv.add_argument("--dtype", default="int8", choices=["float32", "int8"])
    sv.add_argument("--clients", type=positive, default=8)
    sv.add_argument("--n_prompt", type=positive, default=32)
    sv.add_argument("--n_new", type=positive, default=128)
    sv.add_argument("--rounds", type=positive, default=3)
    rc = commands.add_parser("recipes", help="iterations to a validation loss on the small config: AdamW cosine and "
                                             "WSD, Muon WSD, over seeds; Muon's step time beside AdamW's")
    rc.add_argument("--seeds", default="1337,1338,1339", help="comma separated")
    rc.add_argument("--target", type=float, default=1.909, help="the validation loss to reach")
    rc.add_argument("--eval_interval", type=positive, default=50)
    rc.add_argument("--data_dir", default="data", help="where tiny Shakespeare is prepared")
    rc.add_argument("--rounds", type=positive, default=3, help="rounds of step timing in turns")
    rc.add_argument("--step_iters", type=positive, default=30, help="timed iterations per round")
    commands.add_parser("finetune", help="memory and step time of finetuning GPT-2 124M and 1558M shapes at block "
                                         "1024, with and without remat and LoRA (each in a fresh process)")
    probe = commands.add_parser("probe")  # internal: see "Probes" above
    probe.add_argument("kind", choices=["compile", "load", "finetune", "data"])
    probe.add_argument("arg")
    args = ap.parse_args(argv)
    if args.command == "eval" and importlib.util.find_spec("lm_eval") is None:
        ap.error('eval needs lm-evaluation-harness: pip install -e ".[eval]"')
    if getattr(args, "vs_hf", False) and not all(importlib.util.find_spec(m) for m in ("torch", "transformers",
                                                                                       "accelerate")):
        ap.error('--vs_hf needs torch and transformers: pip install -e ".[bench]" --extra-index-url '
                 'https://download.pytorch.org/whl/cpu (the CPU build of torch; without the index, pip fetches the '
                 'CUDA build and its GBs of nvidia wheels)')
    return args


def main(argv=None):
    return cli.run(lambda argv: run(parse_args(argv)), argv)


def run(args):
    mode = args.kind if args.command == "probe" else args.command
    # as main.py, or as train.py runs its steps
    cli.setup(training=mode in ("train", "full_run", "finetune", "recipes"))
    if args.command == "probe":
        probes = {"compile": compile_probe, "load": load_probe, "finetune": finetune_probe, "data": data_probe}
        return probes[args.kind](args.arg)
    if args.command == "finetune":
        return finetune_table()
    if args.command == "llamacpp":
        return llamacpp_table(args)
    if args.command == "serve":
        return serve_table(args)
    if args.command == "data":
        return data_table(args)
    if args.command == "eval":
        return eval_table(args)
    if args.command == "full_run":
        return full_run_table(args)
    if args.command == "recipes":
        return recipes_table(args)
    if args.command == "train":
        return train_table(args)
    return generate_table(args)


LLAMACPP_ROWS = (("b1", "batch 1, ms/token"), ("b1@880", "batch 1 after 880 cached positions, ms/token"),
                 ("b8", "batch 8, ms/step"))


def main_seconds(model_dir, prompts_file, n_new, *extra):  # one main.py process, start to end
    t = time.perf_counter()
    subprocess.run([sys.executable, os.path.join(HERE, "main.py"), "--model_dir", model_dir, "--prompt_file",
                    prompts_file, "--greedy", "--n_tokens_to_generate", str(n_new), *extra], check=True,
                   stdout=subprocess.DEVNULL)
    return time.perf_counter() - t


def gptjax_decode_ms(model_dir, prompts, extra):  # {row: ms per decoding step}, main.py as the issue measures it:
    # (t[144 new tokens] - t[16 new tokens]) / 128, whole processes (load, compile from the cache, prefill cancel out)
    out = {}
    for row, prompt_file in prompts.items():
        times = {n: main_seconds(model_dir, prompt_file, n, *extra) for n in (16, 144)}
        out[row] = 1e3 * (times[144] - times[16]) / 128
    return out


def llamacpp_ms(args, hf_dir):  # {type: {row: ms}} from the peer script's last lines
    text = subprocess.run(["bash", args.peer_script, hf_dir, str(os.cpu_count())], capture_output=True, text=True,
                          env={**os.environ, "PEER_PY": args.peer_python}, cwd=HERE, check=True).stdout
    out = {}
    for line in text.splitlines():
        if m := re.match(r"llama.cpp (\S+): b1 ([\d.]+) ms/token, b1@\d+ ([\d.]+) ms/token, b8 ([\d.]+) ms/step", line):
            out[m.group(1)] = dict(zip(("b1", "b1@880", "b8"), map(float, m.groups()[1:])))
    return out


def llamacpp_table(args):
    """main.py (float32, --quantize int8) and llama.cpp (F32, Q8_0) decoding the same random 124M-shaped weights, in
    turns, round after round; medians. Prompts: 10 tokens (1 and 8 rows) and 880 tokens."""
    import encoder
    with tempfile.TemporaryDirectory() as tmp:
        model_dir, hf_dir = os.path.join(tmp, "random-124M"), os.path.join(tmp, "random-124M-hf")
        weights.save_params(model_dir, GPT2_124M, random_params(GPT2_124M))
        weights.to_hf(model_dir, hf_dir)
        enc = encoder.get_encoder(encoder.GPT2_VOCAB)
        with open(os.path.join(HERE, "corpora", "tinyshakespeare.txt"), encoding="utf-8") as f:
            ids = enc.encode(f.read(20000).replace("\n", " "))
        prompts = {"b1": [ids[:10]], "b1@880": [ids[100:980]], "b8": [ids[50 * r:50 * r + 10] for r in range(8)]}
        prompt_files = {row: os.path.join(tmp, f"{row}.txt") for row in prompts}
        for row, rows in prompts.items():
            with open(prompt_files[row], "w", encoding="utf-8") as f:
                f.write("".join(enc.decode(r) + "\n" for r in rows))
        for extra in ([], ["--quantize", "int8"]):  # warm the compilation and conversion caches
            gptjax_decode_ms(model_dir, prompt_files, extra)
        results = {name: [] for name in ("gptjax float32", "gptjax int8", "llama.cpp f32", "llama.cpp q8_0")}
        for _ in range(args.rounds):
            peer = llamacpp_ms(args, hf_dir)
            results["llama.cpp f32"].append(peer["f32"])
            results["llama.cpp q8_0"].append(peer["q8_0"])
            results["gptjax float32"].append(gptjax_decode_ms(model_dir, prompt_files, []))
            results["gptjax int8"].append(gptjax_decode_ms(model_dir, prompt_files, ["--quantize", "int8"]))
    median = {name: {row: float(np.median([r[row] for r in rs])) for row, _ in LLAMACPP_ROWS}
              for name, rs in results.items()}
    print(f"\n{args.rounds} rounds in turns, medians; {os.cpu_count()} threads; jax {jax.__version__}")
    print("| decoding, 124M | gptjax float32 | llama.cpp F32 | ratio | gptjax int8 | llama.cpp Q8_0 | ratio |")
    print("|---|---|---|---|---|---|---|")
    for row, label in LLAMACPP_ROWS:
        cells = []
        for ours, theirs in (("gptjax float32", "llama.cpp f32"), ("gptjax int8", "llama.cpp q8_0")):
            a, b = median[ours][row], median[theirs][row]
            cells += [f"{a:.2f}", f"{b:.2f}", f"{b / a:.2f}x"]
        print(f"| {label} | " + " | ".join(cells) + " |")


def serve_table(args):
    """serve.py on random 124M-shaped weights: --clients streaming clients at once (their tokens / the wall time), in
    turns with one sampling.generate call of the same requests in this process; then the time to first token of a
    lone client. Greedy, with <|endoftext|> banned (logit_bias) so that every request makes n_new tokens."""
    import httpx
    hparams, n, n_prompt, n_new = GPT2_124M, args.clients, args.n_prompt, args.n_new
    ids = [[(r * 7919 + i * 104729) % 50000 for i in range(n_prompt)] for r in range(n)]
    ban = {50256: -100.0}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = os.path.join(tmp, "random-124M")
        weights.save_params(model_dir, hparams, random_params(hparams))
        quantize = ["--quantize", "int8"] if args.dtype == "int8" else []
        log_path = os.path.join(tmp, "serve.log")
        slot_ctx = sampling.cache_length(n_prompt + n_new, hparams["n_ctx"])  # the cache generate() gives them
        with open(log_path, "w") as log:
            proc = subprocess.Popen([sys.executable, os.path.join(HERE, "serve.py"), "--model_dir", model_dir,
                                     "--port", "0", "--slots", str(n), "--slot_ctx", str(slot_ctx), *quantize],
                                    stdout=log, stderr=subprocess.STDOUT)
        try:
            url = wait_for_server(proc, log_path)
            _, _, params = weights.load_encoder_hparams_and_params(model_dir, quantize=args.dtype if quantize else None)
            params = gpt.unstack_layers(params)
            generate = partial(sampling.generate, params, hparams, ids, n_new, greedy=True, logit_bias=ban)
            generate()  # compile
            with httpx.Client(timeout=600) as http:
                body = lambda row, **extra: {"prompt": ids[row], "max_tokens": n_new, "temperature": 0,
                                             "logit_bias": {str(t): b for t, b in ban.items()}, **extra}
                clients = partial(concurrent_streams, http, url, [body(row, stream=True) for row in range(n)])
                clients()  # warm the connections
                times = {"generate": [], "server": []}
                for _ in range(args.rounds):
                    t = time.perf_counter()
                    generate()
                    times["generate"].append(time.perf_counter() - t)
                    times["server"].append(clients())
                ttft = [first_token_seconds(http, url, body(0, stream=True, max_tokens=4)) for _ in range(10)]
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    tokens = n * n_new
    rate = {name: tokens / float(np.median(ts)) for name, ts in times.items()}
    print(f"\n124M-shaped {args.dtype}, {n} requests of {n_prompt} + {n_new} tokens; {args.rounds} rounds in turns, "
          f"medians; {os.cpu_count()} threads; jax {jax.__version__}")
    print("| | tokens/s | ratio |\n|---|---|---|")
    print(f"| one generate() call of {n} rows | {rate['generate']:.1f} | 1.00 |")
    print(f"| serve.py, {n} concurrent streaming clients | {rate['server']:.1f} | "
          f"{rate['server'] / rate['generate']:.2f} |")
    print(f"time to first token, 1 client, {n_prompt}-token prompt: p50 {1e3 * np.median(ttft):.0f} ms, "
          f"max {1e3 * max(ttft):.0f} ms")


def wait_for_server(proc, log_path, timeout=600):  # -> the base url serve.py prints once it is ready
    deadline = time.time() + timeout
    while time.time() < deadline:
        with open(log_path) as f:
            if m := re.search(r"serving \S+ at (http://\S+/v1)", f.read()):
                return m.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"serve.py exited: see {log_path}")
        time.sleep(0.2)
    raise RuntimeError("serve.py did not start in time")


def concurrent_streams(http, url, bodies):  # -> seconds until every streamed completion has ended
    import threading

    def stream(body):
        with http.stream("POST", f"{url}/completions", json=body) as r:
            for _ in r.iter_lines():
                pass

    threads = [threading.Thread(target=stream, args=(body,)) for body in bodies]
    t = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.perf_counter() - t


def first_token_seconds(http, url, body):
    t = time.perf_counter()
    with http.stream("POST", f"{url}/completions", json=body) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                return time.perf_counter() - t
    raise RuntimeError("no token came")


def generate_table(args):
    device = jax.devices()[0].device_kind
    rows = []  # (metric, gptjax, hf)
    with tempfile.TemporaryDirectory() as tmp:
        if args.model_dir:
            model_dir = args.model_dir
        else:
            model_dir = os.path.join(tmp, "random-124M")
            weights.save_params(model_dir, GPT2_124M, random_params(GPT2_124M))
        load = load_time(model_dir)
        load = load_time(model_dir)  # the second load is the one users see every day (converted cache)
        hparams, params = weights.load_hparams_and_params(model_dir)
        float_params = params
        params = (jax.tree.map(jnp.asarray, quant.quantize_params(params)) if args.dtype == "int8"
                  else gpt.cast(params, jnp.dtype(args.dtype)))
        layers = gpt.unstack_layers(params)  # once, as main.py does, not inside every timed generate
        rows.append(("load (s), from converted cache", f"{load['load_s']:.2f}", ""))
        rows.append(("peak RSS during load (MiB) / weights (MiB)",
                     f"{load['peak_rss_mib']:.0f} / {load['weights_mib']:.0f}", ""))
        hf = hf_model(float_params if args.dtype == "int8" else params, hparams) if args.vs_hf else None

        floor_tok_s = copy_bandwidth() / weight_bytes_per_token(params)
        for b in args.batches:
            ours, our_ids = gptjax_decode(layers, hparams, b, args.n_prompt, args.n_new)
            fns = [ours]
            if hf is not None:
                theirs, hf_ids = hf_decode(hf, b, args.n_prompt, args.n_new)
                fns.append(theirs)
            tok_s = [b * args.n_new / t for t in interleaved_medians(fns, args.repeats)]
            row = [f"decode tok/s, batch {b} ({args.n_prompt}+{args.n_new} tokens)", f"{tok_s[0]:.1f}", "", ""]
            if hf is not None:
                row[2:] = f"{tok_s[1]:.1f}", f"{tok_s[0] / tok_s[1]:.2f}x, " + \
                    ("same tokens" if hf_ids == our_ids else "tokens differ")
            rows.append(row)
            if b == 1:
                rows.append(("batch 1: % of weight-read floor " f"({floor_tok_s:.1f} tok/s)",
                             f"{100 * tok_s[0] / floor_tok_s:.0f}%", ""))
        kv_dtypes = (None, args.kv_cache) if args.kv_cache else (None,)  # the cache in turns with the default one
        depth, bandwidth = depth_rows(layers, hparams, args.batches, args.depths, args.repeats, kv_dtypes)
        rows += depth
        n_prefill = hparams["n_ctx"] - 1  # plus the one token it generates: a full context
        fns = [gptjax_prefill(layers, hparams, n_prefill)] + ([hf_prefill(hf, n_prefill)] if hf is not None else [])
        seconds = interleaved_medians(fns, args.repeats)
        rows.append((f"prefill {n_prefill} tokens (ms)", f"{1e3 * seconds[0]:.0f}",
                     f"{1e3 * seconds[1]:.0f}" if hf is not None else "",
                     f"{seconds[1] / seconds[0]:.2f}x" if hf is not None else ""))
        if not args.skip_compile:
            with tempfile.TemporaryDirectory() as cache:
                for shape in ["124M", "1558M"]:
                    cold = compile_time(shape, os.path.join(cache, shape), args.dtype)
                    warm = compile_time(shape, os.path.join(cache, shape), args.dtype)
                    rows.append((f"compile generate, {shape} shapes, cold / warm (s)", f"{cold:.2f} / {warm:.2f}", ""))
    print(f"\ndevice: {device} ({jax.device_count()} x {jax.default_backend()}), jax {jax.__version__}, "
          f"dtype {args.dtype}, copy bandwidth {copy_bandwidth() / 1e9:.1f} GB/s, read bandwidth (XLA, all threads) "
          f"{bandwidth / 1e9:.1f} GB/s")
    print("| metric | gptjax | HF transformers | ratio |\n|---|---|---|---|")
    for row in rows:
        row = tuple(row) + ("",) * (4 - len(row))
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    sys.exit(main())
