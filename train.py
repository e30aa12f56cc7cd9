"""Train a GPT-2 from scratch or finetune one, on one CPU, one GPU or many devices: jax.value_and_grad + optax over
gpt.py's params dict.

    python train.py                                          # a small character-level GPT on tiny Shakespeare
    python train.py configs/shakespeare_char.toml            # nanoGPT's "baby GPT" (best on a GPU)
    python train.py configs/finetune_shakespeare.toml        # finetune GPT-2 124M on tiny Shakespeare
    python train.py --dataset=notes.txt --init_from=124M --max_iters=200 --out_dir=out-notes
    python train.py --init_from=resume --out_dir=out         # continue exactly where a run stopped
    python main.py --model_dir out                           # sample from what was trained

The config (train_config.py; `python train.py --help` lists every key) uses nanoGPT's names. What the run writes into
out_dir (checkpoints, the model, metrics.jsonl, loss.png) is outdir.py's; the data, data.py's.

What a step does. batch_size * gradient_accumulation_steps sequences of block_size + 1 tokens are drawn at random
offsets of train.bin (data.get_batch). One jitted function runs the micro-batches under lax.scan, summing gradients,
and applies the optimizer (optim.py: AdamW with nanoGPT's warmup and cosine decay by default, or Muon, or a
warmup-stable-decay schedule). The params and optimizer state are donated, so they are updated in place. Master
weights are float32; dtype=bfloat16 computes the forward and backward passes in bfloat16 (dtype=auto: bfloat16 on GPU
and TPU, float32 on CPU). Dropout masks come from explicit PRNG keys.

Memory. Before anything big is allocated, train.py compiles the step and prints XLA's plan for it (params, optimizer
state, one step's gradients and activations), and refuses a run that the device cannot hold. remat=true recomputes
each block's activations in the backward pass (gpt.transformer). lora_rank=r (finetuning only) freezes the pretrained
weights and trains low-rank adapters beside the lora_targets matrices (gpt.init_adapters, gpt.with_adapters): the
gradients and AdamW state cover the adapters alone; out_dir gets the base with the adapters merged.

Determinism. The batch of iteration `it` and its dropout keys are pure functions of (seed, it), so the checkpoint's
iteration number is the whole state of the data sampler and the random streams: resuming repeats exactly what an
uninterrupted run would have done (bitwise on CPU). A non-finite loss stops training with an error and saves nothing.

Many devices. A Mesh over all devices with one axis, "data": each batch is split across the devices, the params and
optimizer state are replicated, and XLA sums the gradients across devices. fsdp=true shards the params and optimizer
state along the same axis (each array on its largest dimension divisible by the device count). Launched as several
processes (SLURM, Open MPI, or the JAX_* variables: cli.initialize_distributed), each process loads its rows of every
batch and process 0 writes the files.

MFU (model flops utilization) counts what the model needs (gpt.flops_per_token, the PaLM paper's formula as nanoGPT
uses it), not what XLA runs, over the devices' peak (devices.peak_flops; on a CPU give --peak_flops to see MFU).
"""
import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax import lax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P
from tqdm import tqdm

import cli
import data
import devices
import gpt
import optim
import outdir
import quant
import tracking
import train_config
import weights
from train_config import NANOGPT_NAMES, lora_targets

GPT2_VOCAB = 50257
CLOCK = time.monotonic  # the checkpoint timer's clock, in seconds (a test steps it by hand)


# ---------------------------------------------------------------------------------------------------- entry points

def main(argv=None):
    return cli.run(command, argv)


def command(argv):  # the command line -> exit code (cli.py's convention)
    if "--help" in argv or "-h" in argv:
        print(train_config.help_text())
        return cli.OK
    cli.setup(training=True)
    result = train_resolved(train_config.resolve_config(train_config.parse_args(argv)), ending=True)
    return 128 + result["signal"] if result["signal"] else cli.OK  # stopped by a signal: not finished


def train(overrides: dict) -> dict:
    """Run training with config keys overrides (over the defaults); the API behind the command line.
    Returns {"losses": {iteration: train loss}, "evals": [metrics records], "iter": the last iteration reached,
    "interrupted": whether a signal (Ctrl-C, a scheduler's SIGTERM, ...) stopped it, "signal": which one, or None}."""
    return train_resolved(train_config.resolve_config(overrides))


def train_resolved(config, ending=False):  # a resolved config -> train()'s result; ending: see training
    tracking.check_installed(config)
    cli.initialize_distributed()
    if config["eval_only"] and config["init_from"] == "scratch":
        raise cli.UsageError("eval_only evaluates a trained model: add --init_from=resume (out_dir's checkpoint) or "
                             "--init_from=<a GPT-2 size or model folder>")
    outdir.check_out_dir(config)
    if finished_before(config):  # a requeued job of a run that had finished: done, so that a retry loop ends
        return {"losses": {}, "evals": [], "iter": config["max_iters"], "interrupted": False, "signal": None}
    writes = jax.process_index() == 0 and not config["eval_only"]  # eval_only writes nothing at all
    with outdir.claimed_out_dir(config) if writes else contextlib.nullcontext():
        return training(starting_point(config, Path(config["out_dir"])), writes, ending)


# -------------------------------------------------------------------------------------------------------- the step

def compute_dtype(config):
    if config["dtype"] == "auto":
        return jnp.float32 if jax.default_backend() == "cpu" else jnp.bfloat16
    return jnp.dtype(config["dtype"]).type


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
                   scale=train_config.lora_scale(config))


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


# ---------------------------------------------------------------------------------- the compiled step and memory

def compiled_step(config, optimizer, n_head, mesh, params, frozen=None):
    """train_step for config, jitted (params and optimizer state donated, kept in their shardings) and compiled for
    its batch before the optimizer state exists -> (the compiled step, XLA's memory plan for it, the optimizer
    state's shardings). params: on the devices already; frozen: LoRA's base model, else None."""
    opt_shapes = jax.eval_shape(optimizer.init, params)
    opt_shardings = devices.tree_shardings(mesh, opt_shapes, config["fsdp"])
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    step = jax.jit(step_function(config, optimizer, n_head), donate_argnums=(0, 1),
                   out_shardings=(param_shardings, opt_shardings, NamedSharding(mesh, P())))
    shape = (config["gradient_accumulation_steps"], config["batch_size"], config["block_size"])
    batch = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=NamedSharding(mesh, P(None, "data", None)))
    plan, step = devices.memory_plan(step, params, opt_shapes, opt_shardings, (batch, batch), frozen)
    return step, plan, opt_shardings


def check_memory(plan, config):
    """Refuse, in one line and before anything big is allocated, a run whose plan exceeds what the device has."""
    available, where = devices.available_memory()
    if available is None or plan["total"] <= available:
        return
    ways = [] if config["remat"] else ["--remat"]
    if not config["lora_rank"] and config["init_from"] != "scratch":
        ways.append("--lora_rank=8 (train adapters only)")
    ways += [f"a smaller batch_size (now {config['batch_size']}) with more gradient_accumulation_steps",
             f"a smaller block_size (now {config['block_size']})"]
    raise MemoryError(f"this run needs {devices.describe_plan(plan)}, and {where} {devices.size(available)}: try "
                      f"{', or '.join(ways)}")


# -------------------------------------------------------------------------------------------- the starting point

@dataclass
class Start:
    """Where a run starts: decided once, by starting_point, before anything trains."""
    kind: str                 # "scratch", "pretrained" (a GPT-2 release or model folder) or "resume" (out_dir's)
    config: dict              # the run's config, with its tokens and the model's shape filled in
    hparams: dict             # the model's shape: n_vocab, n_ctx, n_embd, n_head, n_layer
    state: outdir.RunState    # what the run starts with; its params None for a new model, made (init_params) once the
                              # memory plan says it fits, and its opt_state None unless resumed (then as saved)
    dataset_dir: Path         # the prepared dataset (data.py)
    splits: dict              # {"train", "val": [n_tokens] uint16 memmap}, ids checked against the vocabulary
    record: dict              # what a checkpoint records besides the state (outdir.save_checkpoint): the vocabulary,
                              # and with LoRA the base's name or folder and fingerprint
    eval_pending: bool = False  # a stop cut short the evaluation due at state.iter: it runs first


class Origin(NamedTuple):  # a pretrained or resumed model, as found
    hparams: dict
    params: dict              # the model's params, or with LoRA its adapters
    lora: dict                # LoRA's {"frozen", "base", "base_fingerprint"}, or {}
    vocab: dict               # the model's vocabulary, as data.check_vocabulary compares it
    vocab_dir: Path | None = None  # a pretrained model's tokenizer folder


def starting_point(config, out_dir):
    """Decide what the run starts from (init_from), find or prepare its dataset, and check that they fit together."""
    kind = {"scratch": "scratch", "resume": "resume"}.get(config["init_from"], "pretrained")
    state, eval_pending, origin = outdir.RunState(None, None, 0, float("inf"), ""), False, None
    if kind == "resume":  # the data it trained on, as prepared then: a resume prepares nothing
        state, meta = outdir.load_checkpoint(out_dir / outdir.CKPT_NAME)
        origin, eval_pending = resumed_model(config, out_dir, state, meta), meta["eval_pending"]
        tokens = meta["config"]["tokens"]
        dataset_dir = data.prepared_folder(config["dataset"], config["data_dir"], tokens)
    else:
        if kind == "pretrained":
            origin = pretrained_model_to_train(config, out_dir)
        tokens = config["tokens"]
        if tokens == "auto":
            tokens = data.NAMED.get(config["dataset"]) or ("char" if kind == "scratch" else origin.vocab["kind"])
        dataset_dir = data.prepare(config["dataset"], config["data_dir"], tokens, origin and origin.vocab_dir)
    config = {**config, "tokens": tokens}
    vocab = data.read_meta(dataset_dir)
    if kind == "scratch":  # the vocabulary of the dataset as prepared (a folder given by name has its own)
        config["tokens"] = vocab["kind"]
        hparams = scratch_hparams(config, len(vocab["chars"]) if vocab["kind"] == "char" else GPT2_VOCAB)
    else:
        hparams = origin.hparams
        data.check_vocabulary(config["dataset"], hparams["n_vocab"], origin.vocab, vocab)
    if config["block_size"] > hparams["n_ctx"]:
        raise ValueError(f"block_size {config['block_size']} exceeds the model's context of {hparams['n_ctx']} "
                         f"tokens")
    splits = {split: data.load_split(dataset_dir, split, hparams["n_vocab"]) for split in data.SPLITS}
    check_splits(splits, dataset_dir, config["block_size"])
    config = {**config, **{k: hparams[k] for k in ("n_layer", "n_head", "n_embd")}}
    lora = dict(origin.lora) if origin else {}
    frozen = lora.pop("frozen", None)
    if frozen is not None:
        frozen = gpt.cast(frozen, jnp.dtype(config["lora_base_dtype"]))
    if origin is not None:
        config["bias"] = "b" in (frozen or origin.params)["ln_f"]
        state = replace(state, params=origin.params, frozen=frozen,
                        lora_scale=train_config.lora_scale(config))
    state = replace(state, run_id=state.run_id or tracking.new_run_id())  # a new run's (older checkpoints have none)
    return Start(kind, config, hparams, state, dataset_dir, splits, {"vocabulary": vocab, **lora}, eval_pending)


def finished_before(config) -> bool:  # auto_resume finding its run's checkpoint at max_iters: says so
    if not (config["auto_resume"] and config["init_from"] == "resume") or config["eval_only"]:
        return False
    checkpoint = Path(config["out_dir"]) / outdir.CKPT_NAME
    meta = outdir.read_checkpoint_meta(checkpoint)
    it = meta["iter"]
    if it < config["max_iters"] or meta["eval_pending"]:  # a stop during the final evaluation: not finished
        return False
    print(f"{checkpoint} is at iteration {it} of max_iters={config['max_iters']}: this run has finished, nothing to do",
          file=sys.stderr, flush=True)
    return True


def resumed_model(config, out_dir, state, meta) -> Origin:
    """The model of out_dir's checkpoint. LoRA's base is found again (never downloaded: --lora_base points at a moved
    one) and must be the very model the adapters were trained on."""
    if meta["iter"] >= config["max_iters"] and not (config["eval_only"] or meta["eval_pending"]):
        raise cli.UsageError(f"{out_dir}'s checkpoint is at iteration {meta['iter']} and max_iters is "
                             f"{config['max_iters']}: nothing to train; give a larger --max_iters")
    vocab = meta["vocabulary"] or outdir.legacy_vocabulary(out_dir, meta["config"]["tokens"])
    if meta["base"] is None:
        return Origin(meta["hparams"], state.params, {}, vocab)
    base = config["lora_base"] or meta["base"]
    try:
        _, frozen, folder, _ = pretrained_model(base, config["models_dir"], download=False)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{e}: the LoRA base of {out_dir}'s adapters is not where it was; give its folder "
                                f"with --lora_base=FOLDER") from None
    fingerprint = weights.fingerprint(frozen)
    if meta["base_fingerprint"] is not None and fingerprint != meta["base_fingerprint"]:
        raise ValueError(f"{folder} is not the LoRA base that {out_dir}'s adapters were trained on (its weights "
                         f"differ); give that model with --lora_base=FOLDER")
    base = str(folder.resolve()) if config["lora_base"] else meta["base"]  # a moved base is found there from now on
    return Origin(meta["hparams"], state.params, {"frozen": frozen, "base": base, "base_fingerprint": fingerprint},
                  vocab)


def pretrained_model_to_train(config, out_dir) -> Origin:
    """The GPT-2 that init_from names; with lora_rank, what trains is fresh adapters of it."""
    hparams, params, folder, vocab_dir = pretrained_model(config["init_from"], config["models_dir"])
    if quant.is_quantized(params["wte"]) and not config["eval_only"]:
        raise cli.UsageError(f"{folder} holds an int8 model: int8 weights cannot be trained; finetune the float model "
                             f"it was quantized from (or evaluate it with eval_only=true)")
    if out_dir.resolve() == folder.resolve():
        raise ValueError(f"out_dir {out_dir} is the folder of the model being finetuned; choose another")
    vocab = data.model_vocabulary(vocab_dir)  # a character model of train.py's, or GPT-2's tokens
    if not config["lora_rank"]:  # every weight trains
        return Origin(hparams, params, {}, vocab, vocab_dir)
    name = NANOGPT_NAMES.get(config["init_from"], config["init_from"])
    lora = {"frozen": params, "base": name if name in NANOGPT_NAMES.values() else str(folder.resolve()),
            "base_fingerprint": weights.fingerprint(params)}
    adapters = gpt.init_adapters(jax.random.PRNGKey(config["seed"]), params, config["lora_rank"], lora_targets(config))
    return Origin(hparams, adapters, lora, vocab, vocab_dir)


def pretrained_model(init_from, models_dir, download=True):
    """(hparams, params, model folder, tokenizer folder) of the GPT-2 that init_from names (a release is fetched
    unless download is false)."""
    folder, hparams, params = weights.load_model(NANOGPT_NAMES.get(init_from, init_from), models_dir, download=download)
    return hparams, params, folder, weights.tokenizer_folder(folder)


def scratch_hparams(config, n_vocab):  # the shape of a model trained from scratch
    return {"n_vocab": n_vocab, "n_ctx": config["block_size"], "n_embd": config["n_embd"], "n_head": config["n_head"],
            "n_layer": config["n_layer"]}


def new_model(config, hparams):  # key -> gpt.py's initialisation of this config's model
    return partial(gpt.init_params, hparams=hparams, bias=config["bias"])


def init_params(config, hparams):  # as one compiled program (not dozens of small ones)
    return jax.jit(new_model(config, hparams))(jax.random.PRNGKey(config["seed"]))


def check_splits(splits, dataset_dir, block_size):  # every split must hold at least one sequence of block_size + 1
    for split, tokens in splits.items():
        if len(tokens) <= block_size:
            raise ValueError(f"the {split} split of {dataset_dir} has {len(tokens):,} tokens, too few for sequences "
                             f"of block_size {block_size} + 1: lower block_size or give more text")


# -------------------------------------------------------------------------------------------------------- the loop

def training(start, writes, ending=False):
    """The loop: steps, evaluations, checkpoints (at evaluations, every checkpoint_interval_minutes, and when a signal
    stops it), metrics, trackers and the progress bar, from a Start. writes: whether this process writes out_dir.
    ending: the process ends with the run (train.py's command line), so its stop signals stay handled to the end."""
    config, out_dir = start.config, Path(start.config["out_dir"])
    compiled, state = compiled_run(start)
    begin(start, compiled, writes)
    history, stopped, eval_cut, last_save, t_start = [], None, False, CLOCK(), time.perf_counter()
    trackers = tracking.trackers(config, out_dir, state.run_id, state.iter) if writes else []
    progress = Progress(config, state.iter, compiled.flops_per_iter, compiled.plan, compiled.show)  # after trackers
    # stop_requests outermost: its handler stays until the progress bar and the trackers are closed
    stops = cli.stop_requests(progress.write, partial(last_checkpoint, out_dir), keep=ending)
    with stops as stop, progress, tracking.closing(trackers):
        while True:
            if evaluation_due(state.iter, start):
                estimate = estimate_losses(compiled, state, start, stop, progress)
                if estimate is None:  # a stop during the evaluation: saved below with the evaluation still to do
                    stopped, eval_cut = stop.signum or signal.SIGTERM, True
                    break
                history.append(record_evaluation(start, state.iter, estimate, progress, trackers, writes, t_start))
                if config["eval_only"]:
                    break
                if judged(start, state.iter):
                    state, last_save = save_judged(start, state, estimate["val"]), CLOCK()
                if writes:  # after the checkpoint: a picture must not stand in the way of the state
                    outdir.plot_losses(out_dir)
                progress.pause()  # the evaluation's time is not the steps'
            if state.iter == config["max_iters"]:
                break
            due = checkpoint_due(config, last_save) and state.iter > start.state.iter
            stop_now, checkpoint_now = devices.agreed(stop.is_set(), due)
            if stop_now:
                stopped = stop.signum or signal.SIGTERM  # another process's signal, agreed on
                break
            if checkpoint_now:  # by time, between evaluations: a preempted run loses minutes, not an interval
                save(start, state, as_model=False)
                last_save = CLOCK()
                progress.pause()
            x, y = device_batches(start.splits["train"], "train", state.iter, config["gradient_accumulation_steps"],
                                  config, compiled.mesh)
            state, loss = step(compiled, state, x, y)
            progress.dispatched(state.iter - 1, loss)
        progress.flush()
        saved_on_stop = stopped and state.iter > start.state.iter and not config["eval_only"]
        if saved_on_stop:
            save(start, state, as_model=False, eval_pending=eval_cut)
        stop.loop_ended = True  # everything is saved: the rest is reporting and closing the bar and the trackers
        say_how_it_ended(progress, out_dir, state.iter, stopped, saved_on_stop, history if writes else [])
    return {"losses": progress.losses, "evals": history, "iter": state.iter, "interrupted": stopped is not None,
            "signal": stopped}


def begin(start, compiled, writes):  # what is said and written before the first step, once every check has passed
    config, out_dir = start.config, Path(start.config["out_dir"])
    if compiled.show and start.kind == "resume" and not config["eval_only"]:
        redo = f", redoing its evaluation at iteration {start.state.iter} first" if start.eval_pending else ""
        print(f"resuming from iteration {start.state.iter} of {out_dir / outdir.CKPT_NAME}{redo}", file=sys.stderr,
              flush=True)
    if writes and start.kind != "resume":  # now that every check (the memory plan's too) has let the run start
        outdir.clear_previous_run(out_dir)
    if writes:
        outdir.write_vocabulary(out_dir, start.dataset_dir)


def step(compiled, state, x, y):  # one optimizer step -> (the next state, the step's loss, still on the device)
    params, opt_state, loss = compiled.step(state.params, state.opt_state, x, y, state.iter, state.frozen)
    return replace(state, params=params, opt_state=opt_state, iter=state.iter + 1), loss


def judged(start, it):
    """Whether the evaluation at it judges (and saves) the model: what trained since the start; with max_iters=0 the
    model as it starts; after a resume, the model whose evaluation a stop had cut short."""
    return it > start.state.iter or it == start.config["max_iters"] or start.eval_pending


def save_judged(start, state, val_loss):  # the checkpoint, and the model too when it is the best so far
    improved = val_loss < state.best_val_loss
    state = replace(state, best_val_loss=min(state.best_val_loss, val_loss))
    save(start, state, as_model=improved or start.config["always_save_checkpoint"])
    return state


def record_evaluation(start, it, estimate, progress, trackers, writes, t_start):
    """An evaluation's metrics record: shown, checked, appended to metrics.jsonl and sent to the trackers."""
    config, out_dir = start.config, Path(start.config["out_dir"])
    record = metrics_record(it, estimate, config, progress, t_start)
    progress.write(f"iter {it}: train loss {estimate['train']:.4f}, val loss {estimate['val']:.4f}")
    if not all(map(math.isfinite, estimate.values())):
        raise FloatingPointError(f"the estimated loss is not finite at iteration {it}: training stopped and nothing "
                                 f"was saved ({last_checkpoint(out_dir)}); lower learning_rate")
    if writes:  # before the checkpoint: a resume drops the records after its checkpoint
        outdir.append_metrics(out_dir, record)
        tracking.log(trackers, it, tracking.charted(record))
    return record


def say_how_it_ended(progress, out_dir, it, stopped, saved_on_stop, history):
    if saved_on_stop:
        progress.write(f"stopped by {cli.signal_name(stopped)} at iteration {it}: saved {out_dir / outdir.CKPT_NAME}; "
                       f"continue with --init_from=resume --out_dir={out_dir}")
    elif stopped:
        progress.write(f"stopped by {cli.signal_name(stopped)} at iteration {it}, before any step: nothing to save")
    elif history:
        best = min(history, key=lambda record: record["val_loss"])
        progress.write(f"done: best val loss {best['val_loss']:.4f} at iteration {best['iter']}; the model is in "
                       f"{out_dir}: python main.py --model_dir {out_dir} --prompt TEXT")


@dataclass
class CompiledRun:
    """What the loop runs on: the devices and the compiled functions."""
    mesh: Mesh            # all devices, one axis "data"
    step: object          # train_step, compiled (params and optimizer state donated)
    evaluate: object      # eval_loss, jitted
    plan: dict            # XLA's memory plan for the step (memory_plan)
    flops_per_iter: float  # the model's flops per iteration, for MFU
    show: bool            # whether this process shows progress (process 0)


def compiled_run(start):
    """-> (CompiledRun, the RunState on the devices). The step is compiled and its memory plan checked before the
    optimizer state exists, and before a new model is made (an XL-sized one takes minutes and GBs): until then only
    its shapes are used. A resumed optimizer state is rebuilt here, where the optimizer is made."""
    config, hparams, state = start.config, start.hparams, start.state
    B, T, n_micro = config["batch_size"], config["block_size"], config["gradient_accumulation_steps"]
    mesh = Mesh(np.array(jax.devices()), ("data",))
    if B % jax.device_count():
        raise ValueError(f"batch_size {B} must be a multiple of the {jax.device_count()} devices")
    abstract = state.params
    if abstract is None:
        abstract = jax.eval_shape(new_model(config, hparams), jax.random.PRNGKey(0))
    shardings = devices.tree_shardings(mesh, abstract, config["fsdp"])
    optimizer = optim.make_optimizer(config, abstract)
    opt_state = state.opt_state
    if opt_state is not None:  # as saved: the tensors by name
        opt_state = outdir.saved_opt_state(opt_state, jax.eval_shape(optimizer.init, abstract),
                                           Path(config["out_dir"]) / outdir.CKPT_NAME)
    frozen = state.frozen
    if frozen is not None:
        frozen = jax.device_put(frozen, devices.tree_shardings(mesh, frozen, config["fsdp"]))
    placed = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), abstract, shardings)
    step_fn, plan, opt_shardings = compiled_step(config, optimizer, hparams["n_head"], mesh, placed, frozen)
    check_memory(plan, config)
    params = jax.device_put(state.params if state.params is not None else init_params(config, hparams), shardings)
    show = jax.process_index() == 0
    if show and not config["eval_only"]:
        print(f"memory: {devices.describe_plan(plan)} (XLA's plan)", file=sys.stderr, flush=True)
    evaluate = jax.jit(partial(eval_loss, n_head=hparams["n_head"], dtype=compute_dtype(config),
                               scale=state.lora_scale))
    opt_state = jax.device_put(opt_state if opt_state is not None else jax.jit(optimizer.init)(params), opt_shardings)
    flops_per_iter = gpt.flops_per_token(params if frozen is None else frozen, hparams, T) * B * T * n_micro
    if config["quantize"]:  # eval_only (train_config): the model evaluated as main.py --quantize runs it
        if frozen is not None:
            raise cli.UsageError(f"quantize=int8 evaluates a whole model, and {config['out_dir']} holds LoRA adapters: "
                                 f"evaluate their merged model: --init_from={config['out_dir']} --out_dir=<another "
                                 f"folder> --eval_only --quantize=int8")
        params = jax.device_put(quant.quantize_params(params))
    state = replace(state, params=params, opt_state=opt_state, frozen=frozen)
    return CompiledRun(mesh, step_fn, evaluate, plan, flops_per_iter, show), state


def checkpoint_due(config, last_save):  # checkpoint_interval_minutes have passed since the last checkpoint
    minutes = config["checkpoint_interval_minutes"]
    return bool(minutes) and CLOCK() - last_save >= 60 * minutes


def evaluation_due(it, start):
    """Evaluate (and checkpoint) every eval_interval iterations and at the last one, but not at the first iteration
    of a resumed run (its checkpoint was written right after that evaluation) unless a stop cut that evaluation short;
    eval_only evaluates at once."""
    config = start.config
    if config["eval_only"]:
        return True
    if start.kind == "resume" and it == start.state.iter:
        return start.eval_pending
    return it % config["eval_interval"] == 0 or it == config["max_iters"]


def device_batches(tokens, split, it, n, config, mesh):  # -> x, y [n, batch_size, block_size] on the devices
    rows, T = config["batch_size"], config["block_size"]
    starts = data.batch_starts(len(tokens), T, n * rows, config["seed"], it, split)
    x, y = data.get_batch(tokens, starts, T)
    return (devices.device_batch(mesh, devices.local_rows(a.reshape(n, rows, T))) for a in (x, y))


def estimate_losses(compiled, state, start, stop, progress):
    """-> {split: mean loss over eval_iters batches} at state.iter, or None when a stop request cut it short."""
    progress.flush()  # the last step's loss, before the evaluation's time
    n, losses = start.config["eval_iters"], {}
    with tqdm(total=n * len(data.SPLITS), desc="evaluating", unit="batch", leave=False, delay=2,
              dynamic_ncols=True, disable=not compiled.show) as bar:
        for split in data.SPLITS:
            x, y = device_batches(start.splits[split], split, state.iter, n, start.config, compiled.mesh)
            total = 0.0
            for i in range(n):  # a batch at a time: progress shows, and Ctrl-C is heard between batches
                total += float(devices.ready(compiled.evaluate(state.params, x[i:i + 1], y[i:i + 1], state.frozen)))
                bar.update(1)
                if devices.agreed(stop.is_set())[0]:  # every process stops at the same batch
                    return None
            losses[split] = total / n
    return losses


def metrics_record(it, estimate, config, progress, t_start):  # one line of metrics.jsonl
    used = devices.peak_memory()
    return {"iter": it, "train_loss": estimate["train"], "val_loss": estimate["val"],
            "lr": float(optim.learning_rate(it, config, np)), "tokens_per_s": progress.tokens_per_s,
            "mfu": progress.mfu, "elapsed_s": round(time.perf_counter() - t_start, 3),
            "peak_memory_gb": round(used / devices.GB, 3) if used else None}


def save(start, state, as_model, eval_pending=False):
    """The checkpoint, and (as_model, or when out_dir has no model yet) params.safetensors: with LoRA, the base model
    with the adapters merged. Non-finite params are never saved. eval_pending: see outdir.save_checkpoint."""
    out_dir = Path(start.config["out_dir"])
    if not bool(devices.ready(all_finite(state.params))):
        raise FloatingPointError(f"the params are not finite at iteration {state.iter}; nothing was saved")
    outdir.save_checkpoint(out_dir, state, start.config, start.hparams, start.record, eval_pending)
    if as_model or not (out_dir / "params.safetensors").is_file():
        model = state.params if state.frozen is None else merged(state.frozen, state.params, state.lora_scale)
        outdir.save_model(out_dir, start.hparams, model)


def last_checkpoint(out_dir):  # what a run that stops on an error leaves, in words
    path = Path(out_dir) / outdir.CKPT_NAME
    return f"the last good checkpoint is {path}" if path.is_file() else "no checkpoint had been saved yet"


@jax.jit
def all_finite(tree):
    return jnp.all(jnp.stack([jnp.isfinite(x).all() for x in jax.tree.leaves(tree)]))


merged = jax.jit(gpt.merge_adapters, static_argnums=2)


class Progress:
    """The progress bar, showing the loss, tokens/s and MFU of the steps since the last refresh. The first step after
    a pause (compilation, an evaluation) starts a new stretch: its time is kept out of the rate and the time left."""

    def __init__(self, config, first_iter, flops_per_iter, plan, show):
        self.config, self.first_iter, self.plan = config, first_iter, plan
        self.tokens_per_iter = config["batch_size"] * config["block_size"] * config["gradient_accumulation_steps"]
        self.flops_per_iter, self.peak = flops_per_iter, devices.peak_flops(config["peak_flops"], compute_dtype(config))
        self.bar = tqdm(total=config["max_iters"], initial=first_iter, unit="it", dynamic_ncols=True,
                        disable=not show)
        self.stretch_start, self.iters = None, 0  # when the current stretch's rate window began, and its steps
        self.tokens_per_s = self.mfu = None
        self.losses = {}  # {iteration: train loss}, as read
        self.pending = None  # (iteration, loss on the device) of the step dispatched last: read one step late, so
        # that the host prepares the next batch while the device computes

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.bar.close()

    def write(self, text):
        self.bar.write(text)

    def pause(self):
        self.stretch_start = None

    def dispatched(self, it, loss):  # step it was dispatched: the one before it is read and shown
        self.flush()
        self.pending = (it, loss)

    def flush(self):  # read and show the pending step's loss, if any
        if self.pending is not None:
            (it, loss), self.pending = self.pending, None
            self.losses[it] = self.step_done(it, loss)

    def step_done(self, it, loss):  # the loss of step it, on the device -> as a float, once shown
        loss = float(devices.ready(loss))
        if not math.isfinite(loss):
            raise FloatingPointError(f"loss is {loss} at iteration {it}: training stopped and nothing more was saved "
                                     f"({last_checkpoint(self.config['out_dir'])}); lower learning_rate or use "
                                     f"float32")
        now = time.perf_counter()
        if self.stretch_start is None:
            self.stretch_start, self.iters = now, 0
            self.bar.unpause()
            used = devices.peak_memory()
            if it == self.first_iter and used is not None:  # after the first step: what the plan became
                planned = devices.size(self.plan["total"])
                self.write(f"memory: peak {devices.size(used)} after the first step (planned {planned}"
                           f"{', and the process itself' if jax.default_backend() == 'cpu' else ''})")
        else:
            self.iters += 1
        if self.iters and (self.iters >= self.config["log_interval"] or it + 1 == self.config["max_iters"]):
            self.tokens_per_s = self.iters * self.tokens_per_iter / (now - self.stretch_start)
            self.mfu = self.tokens_per_s / self.tokens_per_iter * self.flops_per_iter / self.peak if self.peak else None
            self.stretch_start, self.iters = now, 0
            mfu = f", mfu {self.mfu:.1%}" if self.mfu is not None else ""
            self.bar.set_postfix_str(f"loss {loss:.4f}, {self.tokens_per_s:,.0f} tok/s{mfu}", refresh=False)
        self.bar.update(1)
        return loss




if __name__ == "__main__":
    sys.exit(main())
