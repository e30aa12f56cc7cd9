"""train.py's config: the keys, their defaults and meanings (nanoGPT's names), read from a TOML or JSON file and
--key=value flags, and checked before anything runs.

    overrides = parse_args(["configs/shakespeare_char.toml", "--max_iters=500"])  # only the keys these set
    config = resolve_config(overrides)   # defaults < a resumed run's saved config < overrides; checked
    python train.py --help               # every key, its default and meaning

A config file is a flat table of keys; Python config files (nanoGPT's) are not executed. Unknown keys, values of the
wrong type and values out of range raise cli.UsageError with a one-line message naming the key.
"""
import difflib
import json
import math
import tomllib
from pathlib import Path

import gpt
import outdir
from cli import UsageError

# name: (default, help). The defaults train the small character-level model of nanoGPT's CPU recipe (README, "I only
# have a macbook"): about two minutes on a 2-core CPU to a val loss of 1.909. configs/ holds the larger recipes.
CONFIG = {
    "out_dir": ("out", "folder for checkpoints, metrics and the trained model"),
    "eval_interval": (250, "evaluate (and checkpoint) every this many iterations"),
    "log_interval": (10, "refresh the progress bar's loss, tokens/s and MFU every this many iterations"),
    "eval_iters": (50, "batches per split in each loss estimate"),
    "eval_only": (False, "evaluate the model once and exit, writing nothing (with init_from=resume or a model)"),
    "quantize": ("", "with eval_only: evaluate the model with int8 weights (int8; main.py --quantize's)"),
    "overwrite": (False, "let a run that does not resume replace the trained model already in out_dir"),
    "always_save_checkpoint": (False, "make params.safetensors the latest params at every evaluation, not the best"),
    "init_from": ("scratch", "scratch, resume (from out_dir), a GPT-2 release (124M 355M 774M 1558M, or gpt2, "
                             "gpt2-medium, gpt2-large, gpt2-xl) or a model folder"),
    "models_dir": ("models", "where GPT-2 releases are downloaded"),
    "dataset": ("shakespeare_char", "shakespeare_char, shakespeare, openwebtext, a folder prepared under data_dir, or "
                                    "a text file or folder (prepared on first use)"),
    "data_dir": ("data", "where datasets are prepared"),
    "tokens": ("auto", "tokens of a text file or folder: char, gpt2, or auto (gpt2 when finetuning a GPT-2, else "
                       "char)"),
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
    "optimizer": ("adamw", "adamw, or muon: Muon on the blocks' matrices, AdamW (learning_rate, beta1, beta2) on "
                           "embeddings, biases and LayerNorms (optim.py)"),
    "muon_learning_rate": (0.02, "Muon: peak learning rate of the blocks' matrices (on the same schedule)"),
    "muon_momentum": (0.95, "Muon: Nesterov momentum of the gradients before orthogonalisation"),
    "muon_ns_steps": (5, "Muon: Newton-Schulz iterations that orthogonalise each update"),
    "decay_lr": (True, "warm up then decay the learning rate; false keeps it at learning_rate"),
    "lr_schedule": ("cosine", "cosine (nanoGPT's), or wsd: warmup, constant, then a linear decay over the last "
                              "decay_fraction of lr_decay_iters"),
    "decay_fraction": (0.2, "wsd: the fraction of lr_decay_iters that the linear decay takes"),
    "warmup_iters": (100, "iterations of linear warmup"),
    "lr_decay_iters": (2000, "iteration where the decay reaches min_lr (about max_iters, per Chinchilla)"),
    "min_lr": (1e-4, "learning rate after the decay (about learning_rate / 10; Muon's in proportion)"),
    "dtype": ("auto", "compute dtype: float32, bfloat16, or auto (bfloat16 on GPU/TPU, float32 on CPU); weights and "
                      "optimizer state stay float32"),
    "fsdp": (False, "shard params and optimizer state across devices, not only the batch"),
    "lora_rank": (0, "LoRA: finetune rank-r adapters beside the frozen pretrained weights (0: finetune all weights)"),
    "lora_alpha": (16.0, "LoRA: the adapters' output is scaled by lora_alpha / lora_rank"),
    "lora_targets": ("attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj", "LoRA: the layers that get adapters"),
    "lora_base": ("", "LoRA, on resume: the base model's folder if it has moved (it must be the same model)"),
    "lora_base_dtype": ("float32", "LoRA: the dtype the frozen weights are held in (bfloat16 halves them; for "
                                   "GPUs: a float32 step on a CPU widens them all again)"),
    "remat": (False, "gradient checkpointing: recompute each block's activations in the backward pass (less memory, "
                     "about a third more compute)"),
    "checkpoint_interval_minutes": (10.0, "also save ckpt.safetensors this often between evaluations, so that a "
                                          "preempted run loses minutes (0: at evaluations only)"),
    "auto_resume": (False, "resume when out_dir holds a checkpoint of this same run, else start: one command line "
                           "for a scheduler to re-run after a preemption"),
    "wandb_log": (False, "log to Weights & Biases (the track extra); WANDB_MODE=offline keeps it on disk"),
    "wandb_project": ("gptjax", "W&B project"),
    "wandb_run_name": ("", "W&B run name (empty: W&B's own)"),
    "tensorboard_log": (False, "write TensorBoard event files to out_dir/tensorboard (the track extra)"),
    "peak_flops": (0.0, "peak FLOP/s of one device for MFU; 0 looks the device kind up"),
    "seed": (1337, "seed of the initial weights, the batches and the dropout masks"),
}
DEFAULTS = {name: default for name, (default, _) in CONFIG.items()}
MODEL_KEYS = ("n_layer", "n_head", "n_embd", "bias", "lora_rank", "lora_alpha", "lora_targets")  # fixed on resume
NANOGPT_NAMES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}


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
    return UsageError(f"unknown config key {name!r} {where}; {hint}see python train.py --help")


def parse_flag_value(name, text):  # "--key=value" text -> value of the key's type
    kind = type(DEFAULTS[name])
    if kind is bool:
        if text.lower() in ("true", "1", "yes", "on"):
            return True
        if text.lower() in ("false", "0", "no", "off"):
            return False
        raise UsageError(f"--{name} takes true or false, not {text!r}")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise UsageError(f"--{name} takes an integer, not {text!r}") from None
    if kind is float:
        try:
            value = float(text)
        except ValueError:
            raise UsageError(f"--{name} takes a number, not {text!r}") from None
        if not math.isfinite(value):
            raise UsageError(f"--{name} takes a finite number, not {text!r}")
        return value
    return text


def checked_file_value(name, value, path):  # a value read from a config file -> value of the key's type
    kind = type(DEFAULTS[name])
    if kind is float and type(value) is int:
        value = float(value)
    if type(value) is not kind:
        raise UsageError(f"{path}: {name} should be {kind.__name__}, got {value!r} ({type(value).__name__})")
    if kind is float and not math.isfinite(value):  # TOML's nan and inf, and 1e400, which JSON reads as inf
        raise UsageError(f"{path}: {name} takes a finite number, not {value!r}")
    return value


def read_config_file(path):
    """A TOML or JSON file of config keys (a flat table) -> dict. Python config files are not executed."""
    path = Path(path)
    try:
        text = path.read_bytes()
    except FileNotFoundError:
        raise UsageError(f"config file {path} does not exist") from None
    try:
        if path.suffix == ".toml":
            values = tomllib.loads(text.decode("utf-8"))
        elif path.suffix == ".json":
            values = json.loads(text)
        else:
            hint = (" Python config files are not run: nanoGPT's config/*.py recipes are in configs/ as TOML (e.g. "
                    "configs/shakespeare_char.toml)") if path.suffix == ".py" else ""
            raise UsageError(f"config file {path} should end in .toml or .json.{hint}")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UsageError(f"{path} is not valid {path.suffix[1:].upper()}: {e}") from None
    if not isinstance(values, dict):
        raise UsageError(f"{path} should hold a table of config keys")
    for name in values:
        if name not in CONFIG:
            raise unknown_key(name, f"in {path}")
    return {name: checked_file_value(name, value, path) for name, value in values.items()}


def parse_args(argv: list[str]) -> dict:
    """Command-line arguments -> the config keys they set (not yet merged with the defaults)."""
    overrides = {}
    for n, arg in enumerate(argv):
        if not arg.startswith("--"):
            if n > 0 or arg.startswith("-"):
                raise UsageError(f"unexpected argument {arg!r}: give a config file first, then --key=value flags")
            overrides.update(read_config_file(arg))
            continue
        name, has_value, text = arg[2:].partition("=")
        if name not in CONFIG:
            raise unknown_key(name, "on the command line")
        if not has_value:
            if type(DEFAULTS[name]) is not bool:
                raise UsageError(f"--{name} needs a value: --{name}=VALUE")
            text = "true"
        overrides[name] = parse_flag_value(name, text)
    return overrides


def check_config(config):
    positive = ("eval_interval", "log_interval", "eval_iters", "gradient_accumulation_steps", "batch_size",
                "block_size", "n_layer", "n_head", "n_embd", "muon_ns_steps")
    for name in positive:
        if config[name] < 1:
            raise UsageError(f"{name} must be at least 1, got {config[name]}")
    for name in ("max_iters", "warmup_iters", "lr_decay_iters"):
        if config[name] < 0:
            raise UsageError(f"{name} must not be negative, got {config[name]}")
    for name in ("learning_rate", "muon_learning_rate", "min_lr", "weight_decay", "grad_clip", "peak_flops",
                 "checkpoint_interval_minutes"):
        if config[name] < 0:
            raise UsageError(f"{name} must not be negative, got {config[name]}")
    if not 0 <= config["dropout"] < 1:
        raise UsageError(f"dropout must be in [0, 1), got {config['dropout']}")
    if config["optimizer"] not in ("adamw", "muon"):
        raise UsageError(f"optimizer must be adamw or muon, not {config['optimizer']!r}")
    if config["lr_schedule"] not in ("cosine", "wsd"):
        raise UsageError(f"lr_schedule must be cosine or wsd, not {config['lr_schedule']!r}")
    if not 0 < config["decay_fraction"] <= 1:
        raise UsageError(f"decay_fraction must be in (0, 1], got {config['decay_fraction']}")
    for name in ("beta1", "beta2", "muon_momentum"):
        if not 0 <= config[name] < 1:
            raise UsageError(f"{name} must be in [0, 1), got {config[name]}")
    if config["n_embd"] % config["n_head"]:
        raise UsageError(f"n_embd {config['n_embd']} must be a multiple of n_head {config['n_head']}")
    if config["decay_lr"] and config["lr_decay_iters"] <= config["warmup_iters"]:
        raise UsageError(f"lr_decay_iters ({config['lr_decay_iters']}) must exceed warmup_iters "
                         f"({config['warmup_iters']}), or set decay_lr=false")
    if config["dtype"] not in ("auto", "float32", "bfloat16"):
        hint = " (float16 needs loss scaling; use bfloat16)" if config["dtype"] == "float16" else ""
        raise UsageError(f"dtype must be auto, float32 or bfloat16, not {config['dtype']!r}{hint}")
    if config["lora_base_dtype"] not in ("float32", "bfloat16"):
        raise UsageError(f"lora_base_dtype must be float32 or bfloat16, not {config['lora_base_dtype']!r}")
    if config["quantize"] not in ("", "int8"):
        raise UsageError(f"quantize must be int8 or empty, not {config['quantize']!r}")
    if config["quantize"] and not config["eval_only"]:
        raise UsageError("quantize=int8 evaluates a model in int8 (with eval_only=true): int8 weights cannot be "
                         "trained")
    if config["lora_rank"] < 0:
        raise UsageError(f"lora_rank must be 0 (no adapters) or a positive rank, got {config['lora_rank']}")
    if config["init_from"] == "scratch" and config["lora_rank"]:
        raise UsageError("lora_rank adapts a pretrained model: give --init_from=<a GPT-2 size or a model folder>, or "
                         "train from scratch without --lora_rank")
    for target in lora_targets(config):
        if target not in gpt.LORA_TARGETS:
            names = ", ".join(t.replace("/", ".") for t in gpt.LORA_TARGETS)
            raise UsageError(f"lora_targets: unknown layer {target.replace('/', '.')!r}; choose from {names}")
    if not 0 <= config["seed"] < 2**63:
        raise UsageError(f"seed must be from 0 to 2**63 - 1, got {config['seed']}")
    if config["tokens"] not in ("auto", "char", "gpt2"):
        raise UsageError(f"tokens must be auto, char or gpt2, not {config['tokens']!r}")
    return config


def lora_targets(config):  # "attn.c_attn,mlp.c_fc" -> ("attn/c_attn", "mlp/c_fc")
    return tuple(t.strip().replace(".", "/") for t in config["lora_targets"].split(",") if t.strip())


def resolve_config(overrides: dict) -> dict:
    """The full config of a run: the defaults, then (init_from=resume) the config saved in out_dir's checkpoint, then
    overrides. A resumed run cannot change the model's shape."""
    for name in overrides:
        if name not in CONFIG:
            raise unknown_key(name, "in the config")
    config = {**DEFAULTS, **overrides}
    checkpoint = Path(config["out_dir"]) / outdir.CKPT_NAME
    requeued = config["auto_resume"] and config["init_from"] != "resume" and checkpoint.is_file()
    if config["init_from"] == "resume" or requeued:
        try:
            saved = outdir.read_checkpoint_meta(checkpoint)["config"]
        except FileNotFoundError as e:
            raise UsageError(e) from None
        if requeued:  # a requeued job (auto_resume): this run again, or refused if out_dir holds another
            check_same_run(config, saved, checkpoint)
            overrides = {**overrides, "init_from": "resume"}
        for name in MODEL_KEYS:
            if name in overrides and overrides[name] != saved[name]:
                raise UsageError(f"{name}={overrides[name]} differs from the checkpoint's {saved[name]}: a resumed run "
                                 f"keeps its model; drop the flag or start a new run")
        saved_optimizer = saved.get("optimizer", DEFAULTS["optimizer"])
        if overrides.get("optimizer", saved_optimizer) != saved_optimizer:
            raise UsageError(f"optimizer={overrides['optimizer']} differs from the checkpoint's {saved_optimizer}: a "
                             f"resumed run keeps its optimizer's state; drop the flag or start a new run")
        config = {**DEFAULTS, **{k: v for k, v in saved.items() if k in CONFIG}, **overrides}
    return check_config(config)


# what may differ between the command line that started a run and the one that continues it (auto_resume)
RUN_CONTROL_KEYS = {"out_dir", "eval_interval", "log_interval", "eval_iters", "eval_only", "quantize", "overwrite",
                    "always_save_checkpoint", "init_from", "models_dir", "data_dir", "max_iters", "peak_flops",
                    "auto_resume", "checkpoint_interval_minutes", "wandb_log", "wandb_project", "wandb_run_name",
                    "tensorboard_log", "lora_base", "tokens"}


def check_same_run(config, saved, checkpoint):
    """auto_resume continues only the run that this config describes: another in out_dir is refused, not mixed."""
    def same(name):
        ours, theirs = config[name], saved.get(name, DEFAULTS[name])
        if name == "dataset" and Path(ours).exists() and Path(theirs).exists():  # the same text, however written
            return Path(ours).resolve() == Path(theirs).resolve()
        return ours == theirs
    shape_keys = ("n_layer", "n_head", "n_embd", "bias")  # a pretrained model's shape is its own, not the config's
    keys = [name for name in CONFIG if name not in RUN_CONTROL_KEYS
            and (name not in shape_keys or config["init_from"] == "scratch")]
    differing = [name for name in keys if not same(name)]
    if differing:
        name = differing[0]
        raise UsageError(f"{checkpoint} is of another run ({name}={saved.get(name)!r} there, {config[name]!r} here): "
                         f"auto_resume continues only the same run; give another --out_dir")
