"""Benchmarks for gptjax, side by side with the implementation users would otherwise pick, in one run.

    python bench.py                      # generation: decode tok/s (batch 1, 8), prefill, compile, load, memory
    python bench.py --vs-hf              # ... and the same with Hugging Face transformers on PyTorch, with ratios
    python bench.py --model_dir models/124M
    python bench.py --train              # training ms/iter and tokens/s for the small and baby-GPT configs

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


def gptjax_decode(params, hparams, batch, n_prompt, n_new, repeats):
    prompts = [list(range(1000 + r, 1000 + r + n_prompt)) for r in range(batch)]
    run = lambda: sampling.generate(params, hparams, prompts, n_new, greedy=True)
    out = run()
    return batch * n_new / median_time(run, repeats), out


def gptjax_prefill(params, hparams, n_prompt, repeats):
    prompts = [list(np.arange(n_prompt) % 50000)]
    run = lambda: sampling.generate(params, hparams, prompts, 1, greedy=True)
    run()
    return median_time(run, repeats)


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


def hf_decode(model, batch, n_prompt, n_new, repeats):
    import torch

    ids = torch.tensor([list(range(1000 + r, 1000 + r + n_prompt)) for r in range(batch)])
    with torch.no_grad():
        run = lambda: model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_new,
                                     min_new_tokens=n_new, do_sample=False, use_cache=True, pad_token_id=50256)
        out = run()
        return batch * n_new / median_time(run, repeats), out[:, n_prompt:].tolist()


def hf_prefill(model, n_prompt, repeats):
    import torch

    ids = torch.tensor([list(np.arange(n_prompt) % 50000)])
    with torch.no_grad():
        model(ids)
        return median_time(lambda: model(ids), repeats)


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
    ap.add_argument("--compile-probe", help=argparse.SUPPRESS)
    ap.add_argument("--load-probe", help=argparse.SUPPRESS)
    args = ap.parse_args()
    sampling.enable_compilation_cache()
    if args.compile_probe:
        return compile_probe(args.compile_probe, args.dtype)
    if args.load_probe:
        return load_probe(args.load_probe)

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
        rows.append(("load (s), from converted cache", f"{load['load_s']:.2f}", ""))
        rows.append(("peak RSS during load (MiB) / weights (MiB)",
                     f"{load['peak_rss_mib']:.0f} / {load['weights_mib']:.0f}", ""))
        hf = hf_model(params, hparams) if args.vs_hf else None

        floor_tok_s = copy_bandwidth() / weight_bytes_per_token(params)
        for b in [int(x) for x in args.batches.split(",")]:
            ours, our_ids = gptjax_decode(params, hparams, b, args.n_prompt, args.n_new, args.repeats)
            theirs, same = "", ""
            if hf is not None:
                hf_tok_s, hf_ids = hf_decode(hf, b, args.n_prompt, args.n_new, max(2, args.repeats // 2))
                theirs, same = f"{hf_tok_s:.1f}", f"{ours / hf_tok_s:.2f}x"
                same += ", same tokens" if hf_ids == our_ids else ", tokens differ"
            rows.append((f"decode tok/s, batch {b} ({args.n_prompt}+{args.n_new} tokens)", f"{ours:.1f}", theirs, same))
            if b == 1:
                rows.append(("batch 1: % of weight-read floor " f"({floor_tok_s:.1f} tok/s)",
                             f"{100 * ours / floor_tok_s:.0f}%", ""))
        n_prefill = hparams["n_ctx"] - 1  # plus the one token it generates: a full context
        ours = gptjax_prefill(params, hparams, n_prefill, args.repeats)
        theirs = hf_prefill(hf, n_prefill, args.repeats) if hf is not None else None
        rows.append((f"prefill {n_prefill} tokens (ms)", f"{1e3 * ours:.0f}",
                     "" if theirs is None else f"{1e3 * theirs:.0f}",
                     "" if theirs is None else f"{theirs / ours:.2f}x"))
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
