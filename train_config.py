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

# name: (default, role, rule, help). The role groups --help and says what a resumed run may change (see ROLES); the
# rule is checked by check_config: ">= 1", ">= 0", "[0, 1)", "(0, 1]", or the values allowed. The defaults train the
# small character-level model of nanoGPT's CPU recipe (README, "I only have a macbook"): about two minutes on a 2-core
# CPU to a val loss of 1.909. configs/ holds the larger recipes.
ROLES = {  # role: what its keys set, in --help's order
    "run": "what the run starts from, where it reads and writes, how long it trains",
    "data": "the dataset and the batches",
    "model": "the shape of what trains (a new model's; a pretrained or resumed model keeps its own)",
    "training": "the optimizer, its learning-rate schedule, dropout",
    "compute": "how the steps compute: dtype, devices, memory, randomness",
    "report": "evaluation and progress",
    "tracking": "experiment trackers (the track extra)",
}
CONFIG = {
    # run
    "out_dir": ("out", "run", None, "folder for checkpoints, metrics and the trained model"),
    "init_from": ("scratch", "run", None,
        "scratch, resume (from out_dir), a GPT-2 release (124M 355M 774M 1558M, or gpt2, gpt2-medium, gpt2-large, "
        "gpt2-xl) or a model folder"),
    "models_dir": ("models", "run", None, "where GPT-2 releases are downloaded"),
    "data_dir": ("data", "run", None, "where datasets are prepared"),
    "max_iters": (2000, "run", ">= 0", "optimizer steps in all"),
    "overwrite": (False, "run", None, "let a run that does not resume replace the trained model already in out_dir"),
    "auto_resume": (False, "run", None,
        "resume when out_dir holds a checkpoint of this same run, else start: one command line for a scheduler to "
        "re-run after a preemption"),
    "checkpoint_interval_minutes": (10.0, "run", ">= 0",
        "also save ckpt.safetensors this often between evaluations, so that a preempted run loses minutes (0: at "
        "evaluations only)"),
    "always_save_checkpoint": (False, "run", None,
        "make params.safetensors the latest params at every evaluation, not the best"),
    "eval_only": (False, "run", None,
        "evaluate the model once and exit, writing nothing (with init_from=resume or a model)"),
    "quantize": ("", "run", ("", "int8"),
        "with eval_only: evaluate the model with int8 weights (int8; main.py --quantize's)"),
    "lora_base": ("", "run", None,
        "LoRA, on resume: the base model's folder if it has moved (it must be the same model)"),
    # data
    "dataset": ("shakespeare_char", "data", None,
        "shakespeare_char, shakespeare, openwebtext, a folder prepared under data_dir, or a text file or folder "
        "(prepared on first use)"),
    "tokens": ("auto", "data", ("auto", "char", "gpt2"),
        "tokens of a text file or folder: char, gpt2, or auto (gpt2 when finetuning a GPT-2, else char)"),
    "gradient_accumulation_steps": (1, "data", ">= 1", "micro-batches per optimizer step"),
    "batch_size": (12, "data", ">= 1", "sequences per micro-batch, across all devices"),
    "block_size": (64, "data", ">= 1", "tokens per sequence (the context length of a model trained from scratch)"),
    # model
    "n_layer": (4, "model", ">= 1", "transformer blocks (scratch only; a pretrained or resumed model keeps its own)"),
    "n_head": (4, "model", ">= 1", "attention heads (scratch only)"),
    "n_embd": (128, "model", ">= 1", "embedding width (scratch only)"),
    "bias": (False, "model", None, "biases in the linear layers and LayerNorms (scratch only; GPT-2 has them)"),
    "lora_rank": (0, "model", ">= 0",
        "LoRA: finetune rank-r adapters beside the frozen pretrained weights (0: finetune all weights)"),
    "lora_alpha": (16.0, "model", None, "LoRA: the adapters' output is scaled by lora_alpha / lora_rank"),
    "lora_targets": ("attn.c_attn,attn.c_proj,mlp.c_fc,mlp.c_proj", "model", None,
        "LoRA: the layers that get adapters"),
    # training
    "dropout": (0.0, "training", "[0, 1)", "dropout rate while training (0 for pretraining; try 0.1+ for finetuning)"),
    "learning_rate": (1e-3, "training", ">= 0", "peak learning rate"),
    "weight_decay": (0.1, "training", ">= 0", "AdamW weight decay, on matrices and embeddings only"),
    "beta1": (0.9, "training", "[0, 1)", "AdamW beta1"),
    "beta2": (0.99, "training", "[0, 1)", "AdamW beta2"),
    "grad_clip": (1.0, "training", ">= 0", "clip gradients to this global norm; 0 disables"),
    "optimizer": ("adamw", "training", ("adamw", "muon"),
        "adamw, or muon: Muon on the blocks' matrices, AdamW (learning_rate, beta1, beta2) on embeddings, biases and "
        "LayerNorms (optim.py)"),
    "muon_learning_rate": (0.02, "training", ">= 0",
        "Muon: peak learning rate of the blocks' matrices (on the same schedule)"),
    "muon_momentum": (0.95, "training", "[0, 1)", "Muon: Nesterov momentum of the gradients before orthogonalisation"),
    "muon_ns_steps": (5, "training", ">= 1", "Muon: Newton-Schulz iterations that orthogonalise each update"),
    "decay_lr": (True, "training", None, "warm up then decay the learning rate; false keeps it at learning_rate"),
    "lr_schedule": ("cosine", "training", ("cosine", "wsd"),
        "cosine (nanoGPT's), or wsd: warmup, constant, then a linear decay over the last decay_fraction of "
        "lr_decay_iters"),
    "decay_fraction": (0.2, "training", "(0, 1]", "wsd: the fraction of lr_decay_iters that the linear decay takes"),
    "warmup_iters": (100, "training", ">= 0", "iterations of linear warmup"),
    "lr_decay_iters": (2000, "training", ">= 0",
        "iteration where the decay reaches min_lr (about max_iters, per Chinchilla)"),
    "min_lr": (1e-4, "training", ">= 0",
        "learning rate after the decay (about learning_rate / 10; Muon's in proportion)"),
    # compute
    "dtype": ("auto", "compute", ("auto", "float32", "bfloat16"),
        "compute dtype: float32, bfloat16, or auto (bfloat16 on GPU/TPU, float32 on CPU); weights and optimizer state "
        "stay float32"),
    "fsdp": (False, "compute", None, "shard params and optimizer state across devices, not only the batch"),
    "lora_base_dtype": ("float32", "compute", ("float32", "bfloat16"),
        "LoRA: the dtype the frozen weights are held in (bfloat16 halves them; for GPUs: a float32 step on a CPU "
        "widens them all again)"),
    "remat": (False, "compute", None,
        "gradient checkpointing: recompute each block's activations in the backward pass (less memory, about a third "
        "more compute)"),
    "seed": (1337, "compute", None, "seed of the initial weights, the batches and the dropout masks"),
    # report
    "eval_interval": (250, "report", ">= 1", "evaluate (and checkpoint) every this many iterations"),
    "log_interval": (10, "report", ">= 1",
        "refresh the progress bar's loss, tokens/s and MFU every this many iterations"),
    "eval_iters": (50, "report", ">= 1", "batches per split in each loss estimate"),
    "peak_flops": (0.0, "report", ">= 0", "peak FLOP/s of one device for MFU; 0 looks the device kind up"),
    # tracking
    "wandb_log": (False, "tracking", None,
        "log to Weights & Biases (the track extra); WANDB_MODE=offline keeps it on disk"),
    "wandb_project": ("gptjax", "tracking", None, "W&B project"),
    "wandb_run_name": ("", "tracking", None, "W&B run name (empty: W&B's own)"),
    "tensorboard_log": (False, "tracking", None,
        "write TensorBoard event files to out_dir/tensorboard (the track extra)"),
}
DEFAULTS = {name: default for name, (default, *_) in CONFIG.items()}
ROLE = {name: role for name, (_, role, *_) in CONFIG.items()}
MODEL_KEYS = tuple(name for name in CONFIG if ROLE[name] == "model")  # fixed on resume
RUN_CONTROL_KEYS = {name for name in CONFIG if ROLE[name] in ("run", "report", "tracking")}  # auto_resume: may differ
NANOGPT_NAMES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}


def help_text():
    lines = ["usage: python train.py [CONFIG.toml | CONFIG.json] [--key=value ...]", "",
             "Train or finetune a GPT-2. A config file (TOML or JSON) sets keys first; --key=value flags override it;",
             "a bare --key sets a boolean key to true. Keys (default: meaning), by what they set:"]
    for role, what in ROLES.items():
        lines += ["", f"{role}: {what}"]
        for name, (default, _, _, meaning) in ((n, v) for n, v in CONFIG.items() if v[1] == role):
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


RULES = {">= 1": (lambda v: v >= 1, "must be at least 1"), ">= 0": (lambda v: v >= 0, "must not be negative"),
         "[0, 1)": (lambda v: 0 <= v < 1, "must be in [0, 1)"), "(0, 1]": (lambda v: 0 < v <= 1, "must be in (0, 1]")}


def check_rule(name, value, rule):  # one key's value against its rule in CONFIG
    if isinstance(rule, tuple) and value not in rule:
        hint = " (float16 needs loss scaling; use bfloat16)" if name == "dtype" and value == "float16" else ""
        words = [v or "empty" for v in rule]
        raise UsageError(f"{name} must be {', '.join(words[:-1])} or {words[-1]}, not {value!r}{hint}")
    if isinstance(rule, str) and not RULES[rule][0](value):
        raise UsageError(f"{name} {RULES[rule][1]}, got {value}")


def check_config(config):
    for name, (_, _, rule, _) in CONFIG.items():
        check_rule(name, config[name], rule)
    if config["n_embd"] % config["n_head"]:
        raise UsageError(f"n_embd {config['n_embd']} must be a multiple of n_head {config['n_head']}")
    if config["decay_lr"] and config["lr_decay_iters"] <= config["warmup_iters"]:
        raise UsageError(f"lr_decay_iters ({config['lr_decay_iters']}) must exceed warmup_iters "
                         f"({config['warmup_iters']}), or set decay_lr=false")
    if config["quantize"] and not config["eval_only"]:
        raise UsageError("quantize=int8 evaluates a model in int8 (with eval_only=true): int8 weights cannot be "
                         "trained")
    if config["init_from"] == "scratch" and config["lora_rank"]:
        raise UsageError("lora_rank adapts a pretrained model: give --init_from=<a GPT-2 size or a model folder>, or "
                         "train from scratch without --lora_rank")
    for target in lora_targets(config):
        if target not in gpt.LORA_TARGETS:
            names = ", ".join(t.replace("/", ".") for t in gpt.LORA_TARGETS)
            raise UsageError(f"lora_targets: unknown layer {target.replace('/', '.')!r}; choose from {names}")
    if not 0 <= config["seed"] < 2**63:
        raise UsageError(f"seed must be from 0 to 2**63 - 1, got {config['seed']}")
    return config


def lora_scale(config):  # LoRA's adapters' scale, lora_alpha / lora_rank; None without LoRA
    return config["lora_alpha"] / config["lora_rank"] if config["lora_rank"] else None


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


def check_same_run(config, saved, checkpoint):
    """auto_resume continues only the run that this config describes: another in out_dir is refused, not mixed."""
    def same(name):
        ours, theirs = config[name], saved.get(name, DEFAULTS[name])
        if name == "dataset" and Path(ours).exists() and Path(theirs).exists():  # the same text, however written
            return Path(ours).resolve() == Path(theirs).resolve()
        if name == "tokens" and ours == "auto":  # the checkpoint holds what auto chose
            return True
        return ours == theirs
    shape_keys = ("n_layer", "n_head", "n_embd", "bias")  # a pretrained model's shape is its own, not the config's
    keys = [name for name in CONFIG if name not in RUN_CONTROL_KEYS
            and (name not in shape_keys or config["init_from"] == "scratch")]
    differing = [name for name in keys if not same(name)]
    if differing:
        name = differing[0]
        raise UsageError(f"{checkpoint} is of another run ({name}={saved.get(name)!r} there, {config[name]!r} here): "
                         f"auto_resume continues only the same run; give another --out_dir")
