"""Benchmarks for gptjax, side by side with the implementation users would otherwise pick, in one run.

    python bench.py                      # generation: decode tok/s (batch 1, 8), prefill, compile, load, memory
    python bench.py --vs-hf              # ... and the same with Hugging Face transformers on PyTorch, with ratios
    python bench.py --model_dir models/124M
    python bench.py --train              # training ms/iter and tokens/s for the small and baby-GPT configs
    python bench.py --train --vs-hf      # ... and the same models trained by HF transformers on PyTorch

With no --model_dir the weights are random with GPT-2 124M's shapes (no download). Timings are medians of repeated runs
after a warm-up; compile times are measured in fresh processes, cold (empty compilation cache) and warm.
torch and transformers are needed only for --vs-hf (`pip install -e ".[bench]"`).
"""
import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np

import gpt
import sampling
import weights

GPT2_124M = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 768, "n_head": 12, "n_layer": 12}
GPT2_1558M = {"n_vocab": 50257, "n_ctx": 1024, "n_embd": 1600, "n_head": 25, "n_layer": 48}


def random_params(hparams, dtype=jnp.float32, seed=0):
    # numpy draws, so that making weights compiles nothing (keeps compile-time measurements clean)
    rng = np.random.default_rng(seed)
    shapes = jax.eval_shape(lambda: gpt.init_params(jax.random.PRNGKey(0), hparams))
    return jax.tree.map(lambda s: jnp.asarray((0.02 * rng.standard_normal(s.shape, np.float32))).astype(dtype), shapes)


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
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(vocab_size=hparams["n_vocab"], n_positions=hparams["n_ctx"], n_embd=hparams["n_embd"],
                        n_layer=hparams["n_layer"], n_head=hparams["n_head"], activation_function="gelu_new",
                        resid_pdrop=0, embd_pdrop=0, attn_pdrop=0)
    model = GPT2LMHeadModel(config).eval()
    t = lambda a: torch.from_numpy(np.asarray(a, np.float32))
    state = {"transformer.wte.weight": t(params["wte"]), "transformer.wpe.weight": t(params["wpe"]),
             "transformer.ln_f.weight": t(params["ln_f"]["g"]), "transformer.ln_f.bias": t(params["ln_f"]["b"])}
    for i in range(hparams["n_layer"]):
        for hf_name, ours in [("ln_1", "ln_1"), ("ln_2", "ln_2")]:
            state[f"transformer.h.{i}.{hf_name}.weight"] = t(params["h"][ours]["g"][i])
            state[f"transformer.h.{i}.{hf_name}.bias"] = t(params["h"][ours]["b"][i])
        for group, name in [("attn", "c_attn"), ("attn", "c_proj"), ("mlp", "c_fc"), ("mlp", "c_proj")]:
            state[f"transformer.h.{i}.{group}.{name}.weight"] = t(params["h"][group][name]["w"][i])
            state[f"transformer.h.{i}.{group}.{name}.bias"] = t(params["h"][group][name]["b"][i])
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


# nanoGPT (PyTorch 2, eager, fp32) on the 2-core CPU where gptjax's CPU targets were set, in ms per iteration
NANOGPT_CPU_MS = {"configs/shakespeare_char_small.toml": 52.6, "configs/shakespeare_char.toml": 10750.0}


def train_speed(config_file, n_iters, dtype_name):
    """ms per training iteration (forward, backward, AdamW) of a config file's model and batch, on random tokens:
    train.py's own compiled step, timed after a warm-up step that compiles it."""
    import train

    overrides = train.read_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), config_file))
    if dtype_name:
        overrides["dtype"] = dtype_name
    config = train.resolve_config(overrides)
    params = train.init_params(config, train.scratch_hparams(config, 65))  # 65: tiny Shakespeare's characters
    optimizer = train.make_optimizer(config, params)
    opt_state = jax.jit(optimizer.init)(params)
    step = jax.jit(train.step_function(config, optimizer, config["n_head"]), donate_argnums=(0, 1))
    shape = (config["gradient_accumulation_steps"], config["batch_size"], config["block_size"])
    rng = np.random.default_rng(0)
    x, y = (jnp.asarray(rng.integers(0, 65, shape, dtype=np.int32)) for _ in range(2))
    params, opt_state, loss = step(params, opt_state, x, y, 0)
    loss.block_until_ready()
    t = time.perf_counter()
    for it in range(1, n_iters + 1):
        params, opt_state, loss = step(params, opt_state, x, y, it)
    loss.block_until_ready()
    seconds = (time.perf_counter() - t) / n_iters
    return 1e3 * seconds, np.prod(shape) / seconds, config


def hf_train_speed(config, n_iters):
    """ms per training iteration of the same model in HF transformers on PyTorch (eager, float32, AdamW, gradient
    clipping): the same kind of training loop as nanoGPT's, in the same run as ours."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(
        vocab_size=65, n_positions=config["block_size"], n_embd=config["n_embd"], n_layer=config["n_layer"],
        n_head=config["n_head"], activation_function="gelu_new", resid_pdrop=config["dropout"],
        embd_pdrop=config["dropout"], attn_pdrop=config["dropout"])).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=config["learning_rate"],
                                  betas=(config["beta1"], config["beta2"]), weight_decay=config["weight_decay"])
    shape = (config["gradient_accumulation_steps"], config["batch_size"], config["block_size"])
    ids = torch.randint(0, 65, shape)

    def step():
        for micro in ids:
            loss = model(micro, labels=micro).loss / len(ids)
            loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config["grad_clip"])
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()
    t = time.perf_counter()
    for _ in range(n_iters):
        step()
    return 1e3 * (time.perf_counter() - t) / n_iters


def train_table(args):
    iters = {"configs/shakespeare_char_small.toml": 50, "configs/shakespeare_char.toml": args.baby_iters}
    rows = []
    for config_file, n_iters in iters.items():
        ms, tok_s, config = train_speed(config_file, n_iters, args.train_dtype)
        name = (f"{config_file}: {config['n_layer']} layers, {config['n_embd']} wide, block {config['block_size']}, "
                f"batch {config['batch_size']}, dropout {config['dropout']}")
        row = [name, f"{ms:,.1f} ms, {tok_s:,.0f} tok/s", "", ""]
        if args.vs_hf:
            hf_ms = hf_train_speed(config, n_iters)
            row[2:] = f"{hf_ms:,.1f} ms, {tok_s * ms / hf_ms:,.0f} tok/s", f"{hf_ms / ms:.2f}x"
        ref = NANOGPT_CPU_MS[config_file]
        row.append(f"{ref:,.1f} ms ({ref / ms:.2f}x)" if jax.default_backend() == "cpu" else "(a CPU figure)")
        rows.append(row)
    print(f"\ndevice: {jax.devices()[0].device_kind} ({jax.device_count()} x {jax.default_backend()}), "
          f"jax {jax.__version__}")
    print("| training step | gptjax | HF transformers, PyTorch eager | speed ratio | nanoGPT anchor, 2-core CPU |\n"
          "|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")


def compile_probe(hparams_name, dtype):
    # run in a fresh process: time the first generation (compile + run) and a second one (run only)
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
    env = {**os.environ, "GPTJAX_COMPILATION_CACHE": cache_dir}
    out = subprocess.run([sys.executable, __file__, "--compile-probe", hparams_name, "--dtype", dtype],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["compile_s"]


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
    out = subprocess.run([sys.executable, __file__, "--load-probe", str(model_dir)], capture_output=True, text=True,
                         check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_dir", help="a model folder (TF release or HF layout); default: random 124M-shaped weights")
    ap.add_argument("--vs-hf", action="store_true", help="also run HF transformers (PyTorch) on the same weights")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--batches", default="1,8", help="decode batch sizes, comma separated")
    ap.add_argument("--n_prompt", type=int, default=10)
    ap.add_argument("--n_new", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--skip_compile", action="store_true", help="skip the cold/warm compile-time probes")
    ap.add_argument("--train", action="store_true", help="time training steps instead of generation")
    ap.add_argument("--train_dtype", help="with --train: the compute dtype (default: train.py's auto)")
    ap.add_argument("--baby_iters", type=int, default=3, help="with --train: timed iterations of the baby GPT")
    ap.add_argument("--compile-probe", help=argparse.SUPPRESS)
    ap.add_argument("--load-probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sampling.enable_compilation_cache()
    if args.compile_probe:
        return compile_probe(args.compile_probe, args.dtype)
    if args.load_probe:
        return load_probe(args.load_probe)
    if args.train:
        return train_table(args)

    dtype = jnp.dtype(args.dtype)
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
        params = gpt.cast(params, dtype)
        layers = sampling.unstack_layers(params)  # once, as main.py does, not inside every timed generate
        rows.append(("load (s), from converted cache", f"{load['load_s']:.2f}", ""))
        rows.append(("peak RSS during load (MiB) / weights (MiB)",
                     f"{load['peak_rss_mib']:.0f} / {load['weights_mib']:.0f}", ""))
        hf = hf_model(params, hparams) if args.vs_hf else None

        floor_tok_s = copy_bandwidth() / weight_bytes_per_token(params)
        for b in [int(x) for x in args.batches.split(",")]:
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
          f"dtype {args.dtype}, copy bandwidth {copy_bandwidth() / 1e9:.1f} GB/s")
    print("| metric | gptjax | HF transformers | ratio |\n|---|---|---|---|")
    for row in rows:
        row = tuple(row) + ("",) * (4 - len(row))
        print("| " + " | ".join(row) + " |")


if __name__ == "__main__":
    main()
