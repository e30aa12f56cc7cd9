"""Train a GPT-2 from scratch or finetune one, on one CPU, one GPU or many devices: jax.value_and_grad + optax over
gpt.py's params dict.

    python train.py                                          # a small character-level GPT on tiny Shakespeare
    python train.py configs/shakespeare_char.toml            # nanoGPT's "baby GPT" (best on a GPU)
    python train.py configs/finetune_shakespeare.toml        # finetune GPT-2 124M on tiny Shakespeare
    python train.py --dataset=notes.txt --init_from=124M --max_iters=200 --out_dir=out-notes
    python train.py --init_from=resume --out_dir=out         # continue exactly where a run stopped
    python main.py --model_dir out                           # sample from what was trained

Config. The names are nanoGPT's (`python train.py --help` lists every key, its default and meaning); a TOML or JSON
file given first sets some, then `--key=value` flags override. A resumed run starts from the config saved in its
checkpoint. Unknown keys and bad values stop the run with a one-line error.

What a step does. batch_size * gradient_accumulation_steps sequences of block_size + 1 tokens are drawn at random
offsets of train.bin (data.get_batch). One jitted function runs the micro-batches under lax.scan, summing gradients,
and applies AdamW: warmup then cosine decay of the learning rate to min_lr (nanoGPT's get_lr), gradients clipped to
global norm grad_clip, weight decay on matrices and embeddings only (not on biases and LayerNorm gains; nanoGPT's
rule, ">= 2 dimensions" before gpt.py stacks the layers). The params and optimizer state are donated, so they are
updated in place. Master weights are float32; dtype=bfloat16 computes the forward and backward passes in bfloat16
(dtype=auto: bfloat16 on GPU and TPU, float32 on CPU). Dropout masks come from explicit PRNG keys.

Memory. Before anything big is allocated, train.py compiles the step and prints XLA's plan for it (params, optimizer
state, one step's gradients and activations), and refuses a run that the device cannot hold. remat=true recomputes
each block's activations in the backward pass (gpt.transformer). lora_rank=r (finetuning only) freezes the pretrained
weights and trains low-rank adapters beside the lora_targets matrices (gpt.init_adapters, gpt.with_adapters): the
gradients and AdamW state cover the adapters alone. ckpt.safetensors then holds the adapters and their optimizer
state and names the base model (found again on resume); params.safetensors holds the base with the adapters merged
(gpt.merge_adapters), so out_dir is a plain model folder.

Determinism. The batch of iteration `it` and its dropout keys are pure functions of (seed, it), so the checkpoint's
iteration number is the whole state of the data sampler and the random streams: resuming repeats exactly what an
uninterrupted run would have done (bitwise on CPU).

Outputs in out_dir, each written atomically (temporary file, fsync, rename: a crash never leaves a half-written file,
and the previous version stays intact until the new one is whole):
  - ckpt.safetensors: the last state, written at every evaluation after the first, at the end and on Ctrl-C:
    params, AdamW state, iteration, best val loss and config, for init_from=resume;
  - params.safetensors: the best params by val loss (with always_save_checkpoint, the latest at each evaluation), in
    weights.py's model-folder format, beside the vocabulary (meta.json for characters, encoder.json + vocab.bpe for
    GPT-2 tokens): out_dir is a model folder that main.py --model_dir and weights.load_hparams_and_params read;
  - metrics.jsonl: one JSON object per evaluation (iter, train_loss, val_loss, lr, tokens_per_s, mfu, elapsed_s,
    peak_memory_gb);
  - loss.png: the loss curves, when matplotlib is installed.
A non-finite loss stops training with an error and saves nothing, so the last good checkpoint stays.

Many devices. A Mesh over all devices with one axis, "data": each batch is split across the devices, the params and
optimizer state are replicated, and XLA sums the gradients across devices. fsdp=true shards the params and optimizer
state along the same axis (each array on its largest dimension divisible by the device count), for models that do not
fit one device; XLA gathers them for the matmuls. The results equal one device's up to float rounding. Launched as
several processes (SLURM or Open MPI with more than one task, or JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and
JAX_PROCESS_ID set), jax.distributed.initialize() joins them first; each process loads its rows of every batch and
process 0 writes the files.

MFU (model flops utilization) counts what the model needs, not what XLA runs, with the PaLM paper's formula as nanoGPT
does: 6 N + 12 L H Q T flops per token, N the parameters without the position table, L layers, H heads of size Q,
T = block_size, divided by the devices' peak (a table of bfloat16 dense peaks by device kind, half of it for float32
on GPUs, which run float32 matmuls at TF32 rate; CPUs have no entry: give --peak_flops, per device, to see MFU there).
"""
import contextlib
import difflib
import json
import math
import os
import signal
import sys
import threading
import time
import tomllib
from functools import partial
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import data
import files
import gpt

# name: (default, help). The defaults train the small character-level model of nanoGPT's CPU recipe (README, "I only
# have a macbook"): about two minutes on a 2-core CPU to a val loss near 1.88. configs/ holds the larger recipes.
CONFIG = {
    "out_dir": ("out", "folder for checkpoints, metrics and the trained model"),
    "eval_interval": (250, "evaluate (and checkpoint) every this many iterations"),
    "log_interval": (10, "refresh the progress bar's loss, tokens/s and MFU every this many iterations"),
    "eval_iters": (50, "batches per split in each loss estimate"),
    "eval_only": (False, "evaluate the model once and exit, writing nothing (with init_from=resume or a model)"),
    "overwrite": (False, "let a run that does not resume replace the trained model already in out_dir"),
    "always_save_checkpoint": (False, "make params.safetensors the latest params at every evaluation, not the best"),
    "init_from": ("scratch", "scratch, resume (from out_dir), a GPT-2 release (124M 355M 774M 1558M, or gpt2, "
                             "gpt2-medium, gpt2-large, gpt2-xl) or a model folder"),
    "models_dir": ("models", "where GPT-2 releases are downloaded"),
    "dataset": ("shakespeare_char", "shakespeare_char, shakespeare, openwebtext, a folder prepared under data_dir, or "
                                    "a text file or folder (prepared on first use)"),
    "data_dir": ("data", "where datasets are prepared"),
    "tokens": ("auto", "tokens of a text file or folder: char, gpt2, or auto (gpt2 when finetuning a GPT-2, else char)"),
    "gradient_accumulation_steps": (1, "micro-batches per optimizer step"),
    "batch_size": (12, "sequences per micro-batch, across all devices"),
    "block_size": (64, "tokens per sequence (the context length of a model trained from scratch)"),
    "n_layer": (4, "transformer blocks (scratch only; a pretrained or resumed model keeps its own)"),
    "n_head": (4, "attention heads (scratch only)"),
    "n_embd": (128, "embedding width (scratch only)"),
    "dropout": (0.0, "dropout rate while training (0 for pretraining; try 0.1+ for finetuning)"),
    "bias": (False, "biases in the linear layers and LayerNorms (scratch only; GPT-2 has them)"),
    "learning_rate": (1e-3, "peak learning rate"),
    "max_iters": (2000, "optimizer steps in all"),
    "weight_decay": (0.1, "AdamW weight decay, on matrices and embeddings only"),
    "beta1": (0.9, "AdamW beta1"),
    "beta2": (0.99, "AdamW beta2"),
    "grad_clip": (1.0, "clip gradients to this global norm; 0 disables"),
    "decay_lr": (True, "warm up then decay the learning rate; false keeps it at learning_rate"),
    "warmup_iters": (100, "iterations of linear warmup"),
    "lr_decay_iters": (2000, "iteration where the cosine decay reaches min_lr (about max_iters, per Chinchilla)"),
    "min_lr": (1e-4, "learning rate after the decay (about learning_rate / 10)"),
    "dtype": ("auto", "compute dtype: float32, bfloat16, or auto (bfloat16 on GPU/TPU, float32 on CPU); weights and "
                      "optimizer state stay float32"),
    "fsdp": (False, "shard params and optimizer state across devices, not only the batch"),
    "lora_rank": (0, "LoRA: finetune rank-r adapters beside the frozen pretrained weights (0: finetune all weights)"),
    "lora_alpha": (16.0, "LoRA: the adapters' output is scaled by lora_alpha / lora_rank"),
    "lora_targets": ("attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj", "LoRA: the layers that get adapters"),
    "lora_base_dtype": ("float32", "LoRA: the dtype the frozen weights are held in (bfloat16 halves them; for "
                                   "GPUs: a float32 step on a CPU widens them all again)"),
    "remat": (False, "gradient checkpointing: recompute each block's activations in the backward pass (less memory, "
                     "about a third more compute)"),
    "peak_flops": (0.0, "peak FLOP/s of one device for MFU; 0 looks the device kind up"),
    "seed": (1337, "seed of the initial weights, the batches and the dropout masks"),
}
DEFAULTS = {name: default for name, (default, _) in CONFIG.items()}
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "bias", "lora_rank", "lora_alpha", "lora_targets")  # fixed on resume
NANOGPT_NAMES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}
GPT2_VOCAB = 50257
CKPT_NAME = "ckpt.safetensors"
CKPT_FORMAT = "gptjax-train-1"
VOCABULARY_FILES = ("meta.json", "encoder.json", "vocab.bpe")  # characters, or GPT-2's BPE
RUN_FILES = (CKPT_NAME, "params.safetensors", "metrics.jsonl", "loss.png", *VOCABULARY_FILES)  # what a run writes

# Dense bfloat16 peak FLOP/s of one device, by a substring of jax's device_kind (checked in this order).
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "A100": 312e12,
              "A800": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12, "V100": 125e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6": 918e12}


# --------------------------------------------------------------------------------------------------------- config

def help_text():
    lines = ["usage: python train.py [CONFIG.toml | CONFIG.json] [--key=value ...]", "",
             "Train or finetune a GPT-2. A config file (TOML or JSON) sets keys first; --key=value flags override it;",
             "a bare --key sets a boolean key to true. Keys (default: meaning):"]
    for name, (default, meaning) in CONFIG.items():
        lines.append(f"  --{name}={str(default).lower() if isinstance(default, bool) else default}")
        lines.append(f"      {meaning}")
    return "\n".join(lines)


def unknown_key(name, where):
    close = difflib.get_close_matches(name, CONFIG, n=1)
    hint = f"did you mean {close[0]}? " if close else ""
    return ValueError(f"unknown config key {name!r} {where}; {hint}see python train.py --help")


def parse_flag_value(name, text):  # "--key=value" text -> value of the key's type
    kind = type(DEFAULTS[name])
    if kind is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise ValueError(f"--{name} takes true or false, not {text!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"--{name} takes an integer, not {text!r}") from None
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"--{name} takes a number, not {text!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"--{name} takes a finite number, not {text!r}")
        return value
    return text


def checked_file_value(name, value, path):  # a value read from a config file -> value of the key's type
    kind = type(DEFAULTS[name])
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise ValueError(f"{path}: {name} should be {kind.__name__}, got {value!r} ({type(value).__name__})")
    return value


def read_config_file(path):
    """A TOML or JSON file of config keys (a flat table) -> dict. Python config files are not executed."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise FileNotFoundError(f"config file {path} does not exist") from None
    try:
        if path.suffix == ".toml":
            values = tomllib.loads(text.decode("utf-8"))
        elif path.suffix == ".json":
            values = json.loads(text)
        else:
            raise ValueError(f"config file {path} should end in .toml or .json (Python config files are not run)")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid {path.suffix[1:].upper()}: {e}") from None
    if not isinstance(values, dict):
        raise ValueError(f"{path} should hold a table of config keys")
    for name in values:
        if name not in CONFIG:
            raise unknown_key(name, f"in {path}")
    return {name: checked_file_value(name, value, path) for name, value in values.items()}


def parse_args(argv):
    """Command-line arguments -> the config keys they set (not yet merged with the defaults)."""
    overrides = {}
    for n, arg in enumerate(argv):
        if not arg.startswith("--"):
            if n > 0 or arg.startswith("-"):
                raise ValueError(f"unexpected argument {arg!r}: give a config file first, then --key=value flags")
            overrides.update(read_config_file(arg))
            continue
        name, has_value, text = arg[2:].partition("=")
        if name not in CONFIG:
            raise unknown_key(name, "on the command line")
        if not has_value:
            if type(DEFAULTS[name]) is not bool:
                raise ValueError(f"--{name} needs a value: --{name}=VALUE")
            text = "true"
        overrides[name] = parse_flag_value(name, text)
    return overrides


def check_config(config):
    positive = ("eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps", "batch_size",
                "block_size", "n_layer", "n_head", "n_embd")
    for name in positive:
        if config[name] < 1:
            raise ValueError(f"{name} must be at least 1, got {config[name]}")
    for name in ("max_iters", "warmup_iters", "lr_decay_iters"):
        if config[name] < 0:
            raise ValueError(f"{name} must not be negative, got {config[name]}")
    for name in ("learning_rate", "min_lr", "weight_decay", "grad_clip", "peak_flops"):
        if config[name] < 0:
            raise ValueError(f"{name} must not be negative, got {config[name]}")
    if not 0 <= config["dropout"] < 1:
        raise ValueError(f"dropout must be in [0, 1), got {config['dropout']}")
    for name in ("beta1", "beta2"):
        if not 0 <= config[name] < 1:
            raise ValueError(f"{name} must be in [0, 1), got {config[name]}")
    if config["n_embd"] % config["n_head"]:
        raise ValueError(f"n_embd {config['n_embd']} must be a multiple of n_head {config['n_head']}")
    if config["decay_lr"] and config["lr_decay_iters"] <= config["warmup_iters"]:
        raise ValueError(f"lr_decay_iters ({config['lr_decay_iters']}) must exceed warmup_iters "
                         f"({config['warmup_iters']}), or set decay_lr=false")
    if config["dtype"] not in ("auto", "float32", "bfloat16"):
        hint = " (float16 needs loss scaling; use bfloat16)" if config["dtype"] == "float16" else ""
        raise ValueError(f"dtype must be auto, float32 or bfloat16, not {config['dtype']!r}{hint}")
    if config["lora_base_dtype"] not in ("float32", "bfloat16"):
        raise ValueError(f"lora_base_dtype must be float32 or bfloat16, not {config['lora_base_dtype']!r}")
    if config["lora_rank"] < 0:
        raise ValueError(f"lora_rank must be 0 (no adapters) or a positive rank, got {config['lora_rank']}")
    if config["init_from"] == "scratch" and config["lora_rank"]:
        raise ValueError("lora_rank adapts a pretrained model: give --init_from=<a GPT-2 size or a model folder>, or "
                         "train from scratch without --lora_rank")
    for target in lora_targets(config):
        if target not in gpt.LORA_TARGETS:
            names = ", ".join(t.replace("/", ".") for t in gpt.LORA_TARGETS)
            raise ValueError(f"lora_targets: unknown layer {target.replace('/', '.')!r}; choose from {names}")
    if not 0 <= config["seed"] < 2**63:
        raise ValueError(f"seed must be from 0 to 2**63 - 1, got {config['seed']}")
    if config["tokens"] not in ("auto", "char", "gpt2"):
        raise ValueError(f"tokens must be auto, char or gpt2, not {config['tokens']!r}")
    return config


def resolve_config(overrides):
    """The full config of a run: the defaults, then (init_from=resume) the config saved in out_dir's checkpoint, then
    overrides. A resumed run cannot change the model's shape."""
    for name in overrides:
        if name not in CONFIG:
            raise unknown_key(name, "in the config")
    config = {**DEFAULTS, **overrides}
    if config["init_from"] == "resume":
        saved = read_checkpoint_meta(Path(config["out_dir"]) / CKPT_NAME)["config"]
        for name in MODEL_KEYS:
            if name in overrides and overrides[name] != saved[name]:
                raise ValueError(f"{name}={overrides[name]} differs from the checkpoint's {saved[name]}: a resumed run "
                                 f"keeps its model; drop the flag or start a new run")
        config = {**DEFAULTS, **{k: v for k, v in saved.items() if k in CONFIG}, **overrides}
    return check_config(config)


# ------------------------------------------------------------------------------------------------------ the model

def decay_mask(params):  # weight decay on matrices and embeddings ("w", wte, wpe); not on biases and LayerNorm gains
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in ("w", "wte", "wpe"), params)


def scratch_hparams(config, n_vocab):  # the shape of a model trained from scratch
    return {"n_vocab": n_vocab, "n_ctx": config["block_size"], "n_embd": config["n_embd"], "n_head": config["n_head"],
            "n_layer": config["n_layer"]}


def init_params(config, hparams):  # gpt.py's initialisation, as one compiled program (not dozens of small ones)
    init = jax.jit(lambda key: gpt.init_params(key, hparams))
    params = init(jax.random.PRNGKey(config["seed"]))
    return params if config["bias"] else drop_biases(params)


def drop_biases(params):  # bias=False: no "b" in linear layers or LayerNorms; gpt.py then adds none
    if isinstance(params, dict):
        return {k: drop_biases(v) for k, v in params.items() if k != "b"}
    return params


def learning_rate(it, config, xp=jnp):
    """The learning rate at iteration it: nanoGPT's get_lr. Linear warmup to learning_rate over warmup_iters, cosine
    decay to min_lr at lr_decay_iters, then min_lr; constant when decay_lr is false. xp=jnp inside the optimizer (it
    is a traced count there), numpy for the logs."""
    lr, min_lr = config["learning_rate"], config["min_lr"]
    warmup, decay = config["warmup_iters"], config["lr_decay_iters"]
    if not config["decay_lr"]:
        return xp.asarray(lr, xp.float32)
    it = xp.asarray(it, xp.float32)
    ratio = xp.clip((it - warmup) / max(decay - warmup, 1), 0.0, 1.0)
    cosine = min_lr + 0.5 * (1.0 + xp.cos(xp.pi * ratio)) * (lr - min_lr)
    return xp.where(it < warmup, lr * (it + 1) / (warmup + 1), cosine)


def make_optimizer(config, params):
    # the clip is always in the chain (at an infinite norm when disabled) so the state's layout does not depend on it
    max_norm = config["grad_clip"] or float("inf")
    return optax.chain(
        optax.clip_by_global_norm(max_norm),
        optax.adamw(partial(learning_rate, config=config), b1=config["beta1"], b2=config["beta2"], eps=1e-8,
                    weight_decay=config["weight_decay"], mask=decay_mask(params)))


def compute_dtype(config):
    if config["dtype"] == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(config["dtype"]).type


def lora_targets(config):  # "attn.c_attn,mlp.c_fc" -> ("attn/c_attn", "mlp/c_fc")
    return tuple(t.strip().replace(".", "/") for t in config["lora_targets"].split(",") if t.strip())


def lora_scale(config):
    return config["lora_alpha"] / config["lora_rank"]


def model_params(params, frozen, scale):  # the model's params: params, or with LoRA the frozen base plus params
    return params if frozen is None else gpt.with_adapters(frozen, params, scale)


def batch_loss(params, x, y, key, n_head, dropout, dtype, remat=False, frozen=None, scale=None):
    # [B, T], [B, T] -> mean cross-entropy. The whole batch in one call, not a vmap over rows: the linear layers then
    # multiply [B * T, n_in] matrices (gpt.linear says why that matters); no key: no dropout. With LoRA, params are
    # the adapters and frozen the base model: the gradient is the adapters' only.
    # float32 master weights and 16-bit compute, or LoRA's bfloat16-held frozen weights widened to a float32 step
    # (XLA:CPU widens the whole stack at the step's start: GPT-2 XL plans 15.5 GB against 12.4 with float32 weights,
    # so lora_base_dtype pays where steps compute in bfloat16, on GPUs)
    params = gpt.cast(model_params(params, frozen, scale), dtype)
    return gpt.lm_loss(params, x, y, n_head, dropout, key, unroll=True, remat=remat)


def step_function(config, optimizer, n_head):  # train_step with all but its array arguments bound, ready for jax.jit
    return partial(train_step, optimizer=optimizer, seed=config["seed"], n_head=n_head, dropout=config["dropout"],
                   dtype=compute_dtype(config), remat=config["remat"],
                   scale=lora_scale(config) if config["lora_rank"] else None)


def train_step(params, opt_state, x, y, it, frozen=None, *, optimizer, seed, n_head, dropout, dtype, remat=False,
               scale=None):
    # [n_micro, B, T] batches -> new params, new optimizer state, mean loss over the micro-batches (frozen: LoRA's
    # base model, not trained)
    step_key = jax.random.fold_in(jax.random.PRNGKey(seed), it)

    def micro_step(grad_sum, batch):
        xb, yb, m = batch
        loss, grads = jax.value_and_grad(batch_loss)(params, xb, yb, jax.random.fold_in(step_key, m), n_head,
                                                     dropout, dtype, remat, frozen, scale)
        return jax.tree.map(jnp.add, grad_sum, grads), loss

    n_micro = x.shape[0]
    grad_sum, losses = lax.scan(micro_step, jax.tree.map(jnp.zeros_like, params), (x, y, jnp.arange(n_micro)))
    grads = jax.tree.map(lambda g: g / n_micro, grad_sum)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, losses.mean()


def eval_loss(params, x, y, frozen=None, *, n_head, dtype, scale=None):
    # [n_batches, B, T] -> mean loss, batch by batch (bounded memory)
    return lax.map(lambda b: batch_loss(params, b[0], b[1], None, n_head, 0.0, dtype, False, frozen, scale),
                   (x, y)).mean()


def flops_per_token(params, hparams, block_size):  # PaLM's (and nanoGPT's) estimate for a forward + backward pass
    n = gpt.count_params(params) - params["wpe"].size
    L, H, Q = hparams["n_layer"], hparams["n_head"], hparams["n_embd"] // hparams["n_head"]
    return 6 * n + 12 * L * H * Q * block_size


def peak_flops(config, dtype):  # of all devices together, or None when unknown
    if config["peak_flops"]:
        return config["peak_flops"] * jax.device_count()
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            tf32 = jax.default_backend() == "gpu" and dtype == jnp.float32
            return flops / (2 if tf32 else 1) * jax.device_count()
    return None


# ------------------------------------------------------------------------------------------------- memory

GB = 1e9


def memory_plan(step, params, opt_shapes, opt_shardings, batch, frozen=None):
    """What one training step will hold on each device, from XLA's plan for the compiled step, before any of it is
    allocated: {"params", "optimizer", "step" (gradients, activations and the other temporaries of a step), "total"}
    in bytes. opt_shapes: jax.eval_shape of the optimizer state (not yet created); batch: (x, y) as the loop feeds it.
    -> (the plan, the compiled step, which the loop then runs)."""
    opt_args = jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), opt_shapes,
                            opt_shardings)
    compiled = step.lower(params, opt_args, *batch, 0, frozen).compile()
    analysis = compiled.memory_analysis()
    shard_bytes = lambda tree: sum(math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize
                                   for x in jax.tree.leaves(tree))
    plan = {"params": shard_bytes(params) + shard_bytes(frozen), "optimizer": shard_bytes(opt_args),
            "step": analysis.temp_size_in_bytes if analysis is not None else 0}
    return {**plan, "total": sum(plan.values())}, compiled


def compiled_step(config, optimizer, n_head, mesh, params, frozen=None):
    """train_step for config, jitted (params and optimizer state donated, kept in their shardings) and compiled for
    its batch before the optimizer state exists -> (the compiled step, XLA's memory plan for it, the optimizer
    state's shardings). params: on the devices already; frozen: LoRA's base model, else None."""
    opt_shapes = jax.eval_shape(optimizer.init, params)
    opt_shardings = tree_shardings(mesh, opt_shapes, config["fsdp"])
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    step = jax.jit(step_function(config, optimizer, n_head), donate_argnums=(0, 1),
                   out_shardings=(param_shardings, opt_shardings, NamedSharding(mesh, P())))
    shape = (config["gradient_accumulation_steps"], config["batch_size"], config["block_size"])
    batch = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=NamedSharding(mesh, P(None, "data", None)))
    plan, step = memory_plan(step, params, opt_shapes, opt_shardings, (batch, batch), frozen)
    return step, plan, opt_shardings


def available_memory():  # -> (bytes a device can hold for this run, what it is) or (None, None) when unknown
    stats = device_memory_stats()
    if "bytes_limit" in stats:
        return stats["bytes_limit"], f"{jax.local_devices()[0].device_kind} has"
    # a CPU: what the system can still give, plus what this process holds already (the params, mostly)
    free, held = proc_bytes("/proc/meminfo", "MemAvailable"), proc_bytes("/proc/self/status", "VmRSS")
    return (free + held, "this machine has") if free is not None and held is not None else (None, None)


def peak_memory():  # bytes at the peak so far: the device's, or on a CPU the process's resident set; None: unknown
    return device_memory_stats().get("peak_bytes_in_use") or proc_bytes("/proc/self/status", "VmHWM")


def device_memory_stats():  # an accelerator's memory statistics ({} on a CPU, whose figures come from /proc)
    device = jax.local_devices()[0]
    return (device.memory_stats() or {}) if device.platform != "cpu" else {}


def proc_bytes(path, key):  # "VmHWM:   123 kB" in a /proc file -> bytes, or None where there is no such file
    try:
        for line in Path(path).read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def size(n_bytes):  # "1.23 GB", or "45 MB" below a tenth of a GB
    return f"{n_bytes / GB:.2f} GB" if n_bytes >= GB / 10 else f"{n_bytes / 1e6:.0f} MB"


def describe_plan(plan):
    return (f"params {size(plan['params'])}, optimizer state {size(plan['optimizer'])}, one step's gradients and "
            f"activations {size(plan['step'])}: {size(plan['total'])} per device")


def check_memory(plan, config):
    """Refuse, in one line and before anything big is allocated, a run whose plan exceeds what the device has."""
    available, where = available_memory()
    if available is None or plan["total"] <= available:
        return
    ways = [] if config["remat"] else ["--remat"]
    if not config["lora_rank"] and config["init_from"] != "scratch":
        ways.append("--lora_rank=8 (train adapters only)")
    ways += [f"a smaller batch_size (now {config['batch_size']}) with more gradient_accumulation_steps",
             f"a smaller block_size (now {config['block_size']})"]
    raise MemoryError(f"this run needs {describe_plan(plan)}, and {where} {size(available)}: try "
                      f"{', or '.join(ways)}")


# ------------------------------------------------------------------------------------------------- devices

def maybe_initialize_distributed():
    """jax.distributed.initialize() when this process is one of several: SLURM or Open MPI with more than one task
    (detected by jax), or JAX_COORDINATOR_ADDRESS set with JAX_NUM_PROCESSES and JAX_PROCESS_ID."""
    env = os.environ
    if "JAX_COORDINATOR_ADDRESS" in env:
        jax.distributed.initialize(env["JAX_COORDINATOR_ADDRESS"], int(env["JAX_NUM_PROCESSES"]),
                                   int(env["JAX_PROCESS_ID"]))
    elif int(env.get("SLURM_NTASKS", 1)) > 1 or int(env.get("OMPI_COMM_WORLD_SIZE", 1)) > 1:
        jax.distributed.initialize()


def array_sharding(mesh, shape, fsdp):
    """Replicated, or (fsdp) split along the largest dimension that the device count divides."""
    dims = [d for d in range(len(shape)) if shape[d] % mesh.size == 0] if fsdp else []
    if not dims:
        return NamedSharding(mesh, P())
    dim = max(dims, key=lambda d: (shape[d], d))
    return NamedSharding(mesh, P(*[("data" if d == dim else None) for d in range(len(shape))]))


def tree_shardings(mesh, tree, fsdp):
    return jax.tree.map(lambda x: array_sharding(mesh, x.shape, fsdp), tree)


def device_batch(mesh, x):  # [n, B, T] numpy (this process's rows) -> global array, B split across the devices
    sharding = NamedSharding(mesh, P(None, "data", None))
    rows = x.shape[1] * jax.process_count()
    return jax.make_array_from_process_local_data(sharding, x, (x.shape[0], rows, x.shape[2]))


def local_rows(x):  # [n, B, T] -> this process's share of the rows (all of them on one host)
    share = x.shape[1] // jax.process_count()
    return x[:, jax.process_index() * share:(jax.process_index() + 1) * share]


def host_array(x):  # a (possibly sharded, possibly multi-host) jax array -> numpy
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)


# ------------------------------------------------------------------------------------------------- checkpoints

def flat_names(tree, prefix):  # {prefix + path: leaf}, "/"-joined dict keys (params) or jax's key strings (state)
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        if all(isinstance(k, jax.tree_util.DictKey) for k in path):
            name = "/".join(str(k.key) for k in path)
        else:
            name = jax.tree_util.keystr(path)
        out[prefix + name] = leaf
    return out


def save_checkpoint(out_dir, params, opt_state, it, best_val_loss, config, hparams, base=None):
    """The whole training state -> out_dir/ckpt.safetensors, atomically (a crash or a full disk leaves the previous
    checkpoint as it was)."""
    import weights
    tensors = {name: host_array(x) for name, x in {**flat_names(params, "params/"),
                                                    **flat_names(opt_state, "opt_state/")}.items()}
    metadata = {"format": CKPT_FORMAT, "iter": str(it), "best_val_loss": repr(best_val_loss),
                "config": json.dumps(config), "hparams": json.dumps(hparams)}
    if base is not None:  # LoRA: params are adapters of this model (what init_from named)
        metadata["base"] = base
    if jax.process_index() == 0:
        weights.write_safetensors(Path(out_dir) / CKPT_NAME, tensors, metadata)


def read_checkpoint_meta(path):
    import weights
    path = Path(path)
    try:
        with open(path, "rb") as f:
            _, metadata, _ = weights.safetensors_header(f, path)
    except FileNotFoundError:
        raise FileNotFoundError(f"cannot resume: {path} does not exist (train with init_from=scratch or a model "
                                f"first, or give the out_dir of an earlier run)") from None
    if metadata.get("format") != CKPT_FORMAT:
        raise ValueError(f"{path} is not a gptjax training checkpoint (format {metadata.get('format')!r})")
    return {"iter": int(metadata["iter"]), "best_val_loss": float(metadata["best_val_loss"]),
            "config": json.loads(metadata["config"]), "hparams": json.loads(metadata["hparams"]),
            "base": metadata.get("base")}


def load_checkpoint(path, optimizer_for):
    """out_dir/ckpt.safetensors -> (params, opt_state, meta); optimizer_for(params) gives the optimizer whose state
    layout the saved state must match."""
    import safetensors.numpy
    meta = read_checkpoint_meta(path)
    try:
        tensors = safetensors.numpy.load_file(path)
    except Exception as e:  # the package raises its own error types for damaged files
        raise ValueError(f"{path} is damaged ({e}); restore it or train anew") from None
    params = unflatten({name[len("params/"):]: x for name, x in tensors.items() if name.startswith("params/")})
    template = jax.eval_shape(optimizer_for(params).init, params)
    names = flat_names(template, "opt_state/")
    missing = [name for name in names if name not in tensors]
    if missing:
        raise ValueError(f"{path} lacks optimizer state {missing[0]}: it was written by another version of train.py")
    leaves = []
    for name, shape in names.items():
        if tensors[name].shape != shape.shape:
            raise ValueError(f"{path}: {name} has shape {tensors[name].shape}, expected {shape.shape}")
        leaves.append(tensors[name].astype(shape.dtype))
    opt_state = jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(template), leaves)
    return params, opt_state, meta


def unflatten(flat):  # {"h/ln_1/g": x} -> {"h": {"ln_1": {"g": x}}}
    tree = {}
    for name, value in flat.items():
        *path, leaf = name.split("/")
        node = tree
        for key in path:
            node = node.setdefault(key, {})
        node[leaf] = value
    return tree


def save_model(out_dir, hparams, params):
    """The params -> out_dir/params.safetensors in weights.py's model-folder format (float32, atomic)."""
    import weights
    host = jax.tree.map(host_array, params)
    if jax.process_index() == 0:
        weights.save_params(out_dir, hparams, host)


def write_vocabulary(out_dir, dataset_dir):
    """Copy the dataset's vocabulary into out_dir, making it a model folder that main.py can sample from, and remove
    the other kind's files (a character run after a GPT-2 run must not leave encoder.json behind: main.py would
    prefer it)."""
    meta = data.read_meta(dataset_dir)
    if meta["kind"] == "char":
        contents = {"meta.json": json.dumps({"kind": "char", "chars": meta["chars"]}, ensure_ascii=False).encode()}
    else:
        contents = {name: (Path(dataset_dir) / name).read_bytes() for name in data.GPT2_FILES}
    for name in VOCABULARY_FILES:
        path = Path(out_dir) / name
        if name not in contents:
            path.unlink(missing_ok=True)
        elif not path.is_file() or path.read_bytes() != contents[name]:
            data.write_atomic(path, contents[name])


def read_metrics(out_dir):  # the records of metrics.jsonl, oldest first (a line cut by a crash is skipped)
    records = []
    with contextlib.suppress(FileNotFoundError), open(Path(out_dir) / "metrics.jsonl") as f:
        for line in f:
            with contextlib.suppress(ValueError):
                records.append(json.loads(line))
    return records


def plot_losses(out_dir):
    """out_dir/loss.png from every evaluation in metrics.jsonl (a resumed run's too), when matplotlib is installed
    (it is optional)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    history = read_metrics(out_dir)
    fig, ax = plt.subplots(figsize=(6, 4))
    for split in ("train", "val"):
        ax.plot([h["iter"] for h in history], [h[f"{split}_loss"] for h in history], marker=".", label=split)
    ax.set_xlabel("iteration")
    ax.set_ylabel("loss (nats per token)")
    ax.legend()
    ax.grid(alpha=0.3)
    with files.atomic_write(Path(out_dir) / "loss.png") as f:
        fig.savefig(f, format="png", dpi=100)
    plt.close(fig)


def append_metrics(out_dir, record):
    path = Path(out_dir) / "metrics.jsonl"
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise files.cannot_write(path, e) from None


# -------------------------------------------------------------------------------------------------------- out_dir

def check_out_dir(config):
    """A run that does not continue out_dir's model (init_from=resume) must not replace it unasked."""
    out_dir = Path(config["out_dir"])
    if config["init_from"] == "resume" or config["overwrite"]:
        return
    for name in (CKPT_NAME, "params.safetensors"):
        if (out_dir / name).exists():
            raise FileExistsError(f"{out_dir} already holds a trained model ({name}): continue it with "
                                  f"--init_from=resume, train into another --out_dir, or replace it with --overwrite")


@contextlib.contextmanager
def claimed_out_dir(config):
    """Hold out_dir for the run: a lock that a second train.py on the same folder meets at once (the system drops it
    when this process ends, however it ends), the temporary files of a killed run removed, and (unless the run
    continues out_dir's model) the files of an earlier run removed, so that none of them mixes with this run's."""
    out_dir = Path(config["out_dir"])
    out_dir.mkdir(parents=True, exist_ok=True)
    with files.locked(out_dir / ".lock", busy=f"{out_dir} is in use by another train.py: wait for it to end, or "
                                               f"give another --out_dir"):
        check_out_dir(config)  # again, now that no other run can write there
        files.remove_stale_temporaries(out_dir)
        if config["init_from"] != "resume":
            for name in RUN_FILES:
                (out_dir / name).unlink(missing_ok=True)
        yield


# ------------------------------------------------------------------------------------------------------ training

def pretrained_model(config):
    """(hparams, params, model folder, tokenizer folder) of the GPT-2 that init_from names (a release is fetched)."""
    import weights
    model = NANOGPT_NAMES.get(config["init_from"], config["init_from"])
    folder, hparams, params = weights.load_model(model, config["models_dir"])
    return hparams, params, folder, weights.tokenizer_folder(folder)


def check_vocabulary(config, model_tokens, vocab, out_dir):
    """A pretrained or resumed model must train on ids of its own vocabulary."""
    if vocab["kind"] != model_tokens:
        raise ValueError(f"the model reads {model_tokens} tokens but dataset {config['dataset']} has {vocab['kind']} "
                         f"tokens: prepare it with --tokens={model_tokens}")
    if model_tokens == "char" and (out_dir / "meta.json").is_file():
        chars = json.loads((out_dir / "meta.json").read_text(encoding="utf-8"))["chars"]
        if chars != vocab["chars"]:
            raise ValueError(f"dataset {config['dataset']} has another character vocabulary than the model in "
                             f"{out_dir}: resume on the dataset it was trained on")


def prepare_dataset(config, vocab_dir):
    tokens = config["tokens"]
    if tokens == "auto":
        tokens = data.NAMED.get(config["dataset"]) or ("char" if config["init_from"] == "scratch" else "gpt2")
    folder = data.prepare(config["dataset"], config["data_dir"], tokens, vocab_dir)
    return folder, tokens


def check_splits(splits, dataset_dir, block_size):  # every split must hold at least one sequence of block_size + 1
    for split, tokens in splits.items():
        if len(tokens) <= block_size:
            raise ValueError(f"the {split} split of {dataset_dir} has {len(tokens):,} tokens, too few for sequences "
                             f"of block_size {block_size} + 1: lower block_size or give more text")


def starting_point(config, out_dir):
    """What a run starts from: {"config" (tokens and the model's shape filled in), "hparams", "params" (the trained
    ones: with LoRA the adapters), "frozen" (LoRA's base model, else None), "base" (its name or folder), "opt_state"
    (None unless resumed), "iter", "best_val_loss", "dataset_dir", "splits"}."""
    start = {"opt_state": None, "iter": 0, "best_val_loss": float("inf"), "frozen": None, "base": None}
    vocab_dir = None  # GPT-2's, shipped with gptjax (data.gpt2_encoder)
    if config["init_from"] == "resume":
        params, start["opt_state"], meta = load_checkpoint(out_dir / CKPT_NAME, lambda p: make_optimizer(config, p))
        hparams, start["iter"], start["best_val_loss"] = meta["hparams"], meta["iter"], meta["best_val_loss"]
        vocab_dir = out_dir if (out_dir / "encoder.json").is_file() else vocab_dir
        model_tokens = meta["config"]["tokens"]
        if meta["base"] is not None:  # LoRA: the checkpoint holds adapters of this base model
            _, start["frozen"], _, _ = pretrained_model({**config, "init_from": meta["base"]})
            start["base"] = meta["base"]
    elif config["init_from"] != "scratch":
        hparams, params, folder, vocab_dir = pretrained_model(config)
        if out_dir.resolve() == folder.resolve():
            raise ValueError(f"out_dir {out_dir} is the folder of the model being finetuned; choose another")
        model_tokens = "gpt2"
        if config["lora_rank"]:  # the pretrained weights stay as they are; the adapters train
            name = NANOGPT_NAMES.get(config["init_from"], config["init_from"])
            start["base"] = name if name in NANOGPT_NAMES.values() else str(folder.resolve())  # found on resume
            start["frozen"] = params
            params = gpt.init_adapters(jax.random.PRNGKey(config["seed"]), params, config["lora_rank"],
                                       lora_targets(config))
    dataset_dir, tokens = prepare_dataset(config, vocab_dir)
    config = {**config, "tokens": tokens}
    vocab = data.read_meta(dataset_dir)
    if config["init_from"] == "scratch":
        hparams = scratch_hparams(config, len(vocab["chars"]) if tokens == "char" else GPT2_VOCAB)
        params = init_params(config, hparams)
    else:
        check_vocabulary(config, model_tokens, vocab, out_dir)
    if config["block_size"] > hparams["n_ctx"]:
        raise ValueError(f"block_size {config['block_size']} exceeds the model's context of {hparams['n_ctx']} tokens")
    splits = {split: data.load_split(dataset_dir, split) for split in data.SPLITS}
    check_splits(splits, dataset_dir, config["block_size"])
    if start["frozen"] is not None:
        start["frozen"] = gpt.cast(start["frozen"], jnp.dtype(config["lora_base_dtype"]))
    model = start["frozen"] if start["frozen"] is not None else params
    config = {**config, **{k: hparams[k] for k in ("n_layer", "n_head", "n_embd")}, "bias": "b" in model["ln_f"]}
    return {**start, "config": config, "hparams": hparams, "params": params, "dataset_dir": dataset_dir,
            "splits": splits}


def train(overrides):
    """Run training with config keys overrides (over the defaults); the API behind the command line.
    Returns {"losses": {iteration: train loss}, "evals": [metrics records], "iter": the last iteration reached,
    "interrupted": whether Ctrl-C stopped it}."""
    return run(resolve_config(overrides))


def run(config):
    maybe_initialize_distributed()
    if config["eval_only"] and config["init_from"] == "scratch":
        raise ValueError("eval_only evaluates a trained model: add --init_from=resume (out_dir's checkpoint) or "
                         "--init_from=<a GPT-2 size or model folder>")
    check_out_dir(config)
    writes = jax.process_index() == 0 and not config["eval_only"]  # eval_only writes nothing at all
    with claimed_out_dir(config) if writes else contextlib.nullcontext():
        return training(starting_point(config, Path(config["out_dir"])), writes)


def ready(x):
    # wait for a device value by polling rather than blocking in C++: Python then runs a Ctrl-C handler at once, not
    # when a step of many seconds ends
    while not x.is_ready():
        time.sleep(0.001)
    return x


def training(state, writes):
    """The loop: steps, evaluations, checkpoints, metrics, the progress bar and Ctrl-C; state from starting_point."""
    config, hparams, params, splits = state["config"], state["hparams"], state["params"], state["splits"]
    out_dir, start, best_val_loss = Path(config["out_dir"]), state["iter"], state["best_val_loss"]
    frozen = state["frozen"]  # LoRA's base model (params are then its adapters), else None
    scale = lora_scale(config) if frozen is not None else None

    # devices, optimizer, compiled functions
    mesh = Mesh(np.array(jax.devices()), ("data",))
    if config["batch_size"] % jax.device_count():
        raise ValueError(f"batch_size {config['batch_size']} must be a multiple of the {jax.device_count()} devices")
    optimizer = make_optimizer(config, params)
    param_shardings = tree_shardings(mesh, params, config["fsdp"])
    params = jax.device_put(params, param_shardings)
    if frozen is not None:
        frozen = jax.device_put(frozen, tree_shardings(mesh, frozen, config["fsdp"]))
    dtype, n_head = compute_dtype(config), hparams["n_head"]
    # the step compiled, and XLA's plan for its memory checked against the device, before the optimizer state exists
    step, plan, opt_shardings = compiled_step(config, optimizer, n_head, mesh, params, frozen)
    check_memory(plan, config)
    if jax.process_index() == 0 and not config["eval_only"]:
        print(f"memory: {describe_plan(plan)} (XLA's plan)", file=sys.stderr, flush=True)
    evaluate = jax.jit(partial(eval_loss, n_head=n_head, dtype=dtype, scale=scale))
    merged = jax.jit(partial(gpt.merge_adapters, scale=scale)) if frozen is not None else None
    all_finite = jax.jit(lambda tree: jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)])))

    B, T, n_micro = config["batch_size"], config["block_size"], config["gradient_accumulation_steps"]
    opt_state = state["opt_state"] if state["opt_state"] is not None else jax.jit(optimizer.init)(params)
    opt_state = jax.device_put(opt_state, opt_shardings)
    tokens_per_iter = B * T * n_micro
    flops_per_iter = flops_per_token(params if frozen is None else frozen, hparams, T) * tokens_per_iter
    peak = peak_flops(config, dtype)

    def batches(split, it, n, rows):  # -> x, y [n, rows, T] on the devices
        starts = data.batch_starts(len(splits[split]), T, n * rows, config["seed"], it, split)
        x, y = data.get_batch(splits[split], starts, T)
        return (device_batch(mesh, local_rows(a.reshape(n, rows, T))) for a in (x, y))

    from tqdm import tqdm
    show = jax.process_index() == 0

    def estimate_losses(it):  # -> {split: mean loss over eval_iters batches}, or None if Ctrl-C cut it short
        n = config["eval_iters"]
        losses = {}
        with tqdm(total=n * len(data.SPLITS), desc="evaluating", unit="batch", leave=False, delay=2,
                  dynamic_ncols=True, disable=not show) as eval_bar:
            for split in data.SPLITS:
                x, y = batches(split, it, n, B)
                total = 0.0
                for i in range(n):  # a batch at a time: progress shows, and Ctrl-C is heard between batches
                    total += float(ready(evaluate(params, x[i:i + 1], y[i:i + 1], frozen)))
                    eval_bar.update(1)
                    if stop:
                        return None
                losses[split] = total / n
        return losses

    def save(it, best):
        if not bool(ready(all_finite(params))):
            raise FloatingPointError(f"the params are not finite at iteration {it}; nothing was saved")
        save_checkpoint(out_dir, params, opt_state, it, best_val_loss, config, hparams, state["base"])
        if best or not (out_dir / "params.safetensors").is_file():
            save_model(out_dir, hparams, params if frozen is None else merged(frozen, params))  # LoRA: merged

    if writes:
        write_vocabulary(out_dir, state["dataset_dir"])

    # Ctrl-C asks the loop to save and stop between steps (a second one stops at once, saving nothing)
    stop = []

    def on_sigint(signum, frame):
        if stop:
            raise KeyboardInterrupt
        stop.append(signum)
        bar.write("Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again: stop now, save nothing)")
    previous_handler = signal.signal(signal.SIGINT, on_sigint) if is_main_thread() else None

    losses, history, t_start = {}, [], time.perf_counter()
    pending = None  # (iteration, loss on the device) of the step dispatched last: read one step late, so the host
    # prepares the next batch while the device computes
    window = {"t": None, "iters": 0}  # tokens/s over the iterations since the last refresh, excluding evaluation
    rate = {"tokens_per_s": None, "mfu": None}
    bar = tqdm(total=config["max_iters"], initial=start, unit="it", dynamic_ncols=True, disable=not show)

    def collect():  # read the loss of the pending step; stop on a non-finite one
        nonlocal pending
        if pending is None:
            return
        it, loss = pending
        pending = None
        losses[it] = float(ready(loss))
        if not math.isfinite(losses[it]):
            raise FloatingPointError(f"loss is {losses[it]} at iteration {it}: training stopped and nothing more was "
                                     f"saved (the last good checkpoint is in {out_dir}); lower learning_rate or "
                                     f"use float32")
        now = time.perf_counter()
        if window["t"] is None:  # the first step of a stretch includes compilation: time from its end, and keep it
            window["t"], window["iters"] = now, 0  # (and any evaluation) out of the bar's rate and time left
            bar.unpause()
            used = peak_memory()
            if it == start and used is not None:  # after the first step: what the plan became
                bar.write(f"memory: peak {size(used)} after the first step (planned {size(plan['total'])}"
                          f"{', and the process itself' if jax.default_backend() == 'cpu' else ''})")
        else:
            window["iters"] += 1
        if window["iters"] and (window["iters"] >= config["log_interval"] or it + 1 == config["max_iters"]):
            rate["tokens_per_s"] = window["iters"] * tokens_per_iter / (now - window["t"])
            rate["mfu"] = rate["tokens_per_s"] / tokens_per_iter * flops_per_iter / peak if peak else None
            window["t"], window["iters"] = now, 0
            mfu = f", mfu {rate['mfu']:.1%}" if rate["mfu"] is not None else ""
            bar.set_postfix_str(f"loss {losses[it]:.4f}, {rate['tokens_per_s']:,.0f} tok/s{mfu}", refresh=False)
        bar.update(1)

    interrupted, it = False, start
    try:
        for it in range(start, config["max_iters"] + 1):
            due = it % config["eval_interval"] == 0 or it == config["max_iters"]
            if config["eval_only"] or (due and not (it == start and config["init_from"] == "resume")):
                collect()
                estimate = estimate_losses(it)
                if estimate is not None:
                    record = {"iter": it, "train_loss": estimate["train"], "val_loss": estimate["val"],
                              "lr": float(learning_rate(it, config, np)), "tokens_per_s": rate["tokens_per_s"],
                              "mfu": rate["mfu"], "elapsed_s": round(time.perf_counter() - t_start, 3),
                              "peak_memory_gb": round(used / GB, 3) if (used := peak_memory()) else None}
                    history.append(record)
                    bar.write(f"iter {it}: train loss {estimate['train']:.4f}, val loss {estimate['val']:.4f}")
                    if not all(map(math.isfinite, estimate.values())):
                        raise FloatingPointError(f"the estimated loss is not finite at iteration {it}: training "
                                                 f"stopped and nothing was saved (the last good checkpoint is in "
                                                 f"{out_dir}); lower learning_rate")
                    if writes:
                        append_metrics(out_dir, record)
                        plot_losses(out_dir)
                    if config["eval_only"]:
                        break
                    if it > start:
                        improved = estimate["val"] < best_val_loss
                        best_val_loss = min(best_val_loss, estimate["val"])
                        save(it, improved or config["always_save_checkpoint"])
                window["t"] = None
            if it == config["max_iters"]:
                break
            if stop:
                collect()
                interrupted = True
                break
            x, y = batches("train", it, n_micro, B)
            params, opt_state, loss = step(params, opt_state, x, y, it, frozen)
            collect()
            pending = (it, loss)
        collect()
        if interrupted and it > start and not config["eval_only"]:
            save(it, False)
            bar.write(f"interrupted at iteration {it}: saved {out_dir / CKPT_NAME}; continue with "
                      f"--init_from=resume --out_dir={out_dir}")
    finally:
        bar.close()
        if previous_handler is not None:
            signal.signal(signal.SIGINT, previous_handler)
    return {"losses": losses, "evals": history, "iter": it, "interrupted": interrupted}


def is_main_thread():
    return threading.current_thread() is threading.main_thread()


def prefer_eigen_dots_on_cpu():
    """Have XLA:CPU run matrix products with its Eigen kernels instead of handing each to YNNPACK. Measured on a 2-core
    AMD EPYC (jax 0.10.2), in alternating processes: the baby GPT's training step is 10-20% faster (its [16384, 384]
    x [384, 1536] products and batched attention products run faster in Eigen), the small config's unchanged. A flag a
    user put in XLA_FLAGS for the same option wins. It must run before jax starts its CPU backend."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_cpu_experimental_ynn_fusion_type" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_cpu_experimental_ynn_fusion_type=-individual_dot".strip()


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if "--help" in argv or "-h" in argv:
        print(help_text())
        return 0
    prefer_eigen_dots_on_cpu()
    try:
        config = resolve_config(parse_args(argv))
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    import sampling
    sampling.enable_compilation_cache()  # a resumed or repeated run skips most of the compile time
    sampling.keep_freed_memory()
    try:
        result = run(config)
    except (ValueError, OSError, FloatingPointError, MemoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # a second Ctrl-C
        print(f"error: stopped at once by a second Ctrl-C; nothing was saved (the last checkpoint in "
              f"{config['out_dir']} is intact)", file=sys.stderr)
        return 130
    return 130 if result["interrupted"] else 0


if __name__ == "__main__":
    sys.exit(main())
