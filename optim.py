"""The optimizer and its learning-rate schedule, from train.py's config: AdamW (nanoGPT's), or Muon on the blocks'
matrices with AdamW on the rest; a cosine or a warmup-stable-decay schedule.

    optimizer = make_optimizer(config, params)      # an optax.GradientTransformation; config is train.py's
    learning_rate(it, config, np)                   # the (AdamW) learning rate at iteration it, for the logs
    python train.py --optimizer=muon --lr_schedule=wsd --max_iters=1000 --lr_decay_iters=1000

Both optimizers clip the gradients to global norm grad_clip first. AdamW decays matrices and embeddings only ("w",
wte, wpe; nanoGPT's rule, ">= 2 dimensions" before gpt.py stacks the layers), not biases and LayerNorm gains.

Muon (Keller Jordan's, modded-nanogpt; optax.contrib.scale_by_muon) replaces each hidden matrix's update by its
momentum (Nesterov, muon_momentum) orthogonalised with muon_ns_steps Newton-Schulz iterations, scaled by
sqrt(max(1, n_out / n_in)) as in modded-nanogpt, so that every matrix moves by about the same spectral norm per step.
It applies to the transformer blocks' matrices only: h/.../w, stacked [n_layer, n_in, n_out], orthogonalised layer
by layer (a batch of matrices, never flattened), and with LoRA the adapters' lora_a and lora_b. The embedding wte
(which is also the output head), wpe, biases and LayerNorms stay with AdamW (beta1, beta2 and learning_rate, as for
optimizer=adamw), since an orthogonalised update suits a matrix that maps activations to activations, not a table
of rows. Weight decay is decoupled and multiplied by the learning rate in both (PyTorch's and optax's convention).
"""
from functools import partial

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers, scale_by_muon

MUON_LEAVES = ("w", "lora_a", "lora_b")  # the blocks' matrices that Muon trains (under params["h"])
STACKED = MuonDimensionNumbers(reduction_axis=1, output_axis=2)  # [n_layer, n_in, n_out]: the layers are a batch


def make_optimizer(config: dict, params: dict) -> optax.GradientTransformation:
    # the clip is always in the chain (at an infinite norm when disabled) so the state's layout does not depend on it
    clip = optax.clip_by_global_norm(config["grad_clip"] or float("inf"))
    adamw = optax.adamw(partial(learning_rate, config=config), b1=config["beta1"], b2=config["beta2"], eps=1e-8,
                        weight_decay=config["weight_decay"], mask=decay_mask(params))
    if config["optimizer"] == "adamw":
        return optax.chain(clip, adamw)
    labels = muon_labels(params)
    muon = optax.chain(
        scale_by_muon(ns_steps=config["muon_ns_steps"], beta=config["muon_momentum"], nesterov=True,
                      weight_dimension_numbers=lambda updates: jax.tree.map(lambda _: STACKED, updates)),
        scale_by_shape(),
        optax.add_decayed_weights(config["weight_decay"], mask=decay_mask),
        optax.scale_by_learning_rate(partial(muon_learning_rate, config=config)))
    return optax.chain(clip, optax.partition({"muon": muon, "adamw": adamw}, labels))


def muon_labels(params):  # "muon" for the blocks' stacked matrices (and LoRA adapters), "adamw" for the rest
    def label(path, x):
        in_blocks = path[0].key == "h"
        return "muon" if in_blocks and path[-1].key in MUON_LEAVES and x.ndim == 3 else "adamw"
    return jax.tree_util.tree_map_with_path(label, params)


def scale_by_shape() -> optax.GradientTransformation:
    # [..., n_in, n_out] orthogonalised updates * sqrt(max(1, n_out / n_in)) (modded-nanogpt's scale): a matrix that
    # widens its input moves each output as much as a square one does
    def update(updates, state, params=None):
        return jax.tree.map(lambda u: u * max(1.0, u.shape[-1] / u.shape[-2]) ** 0.5, updates), state
    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def decay_mask(params):  # weight decay on matrices and embeddings ("w", wte, wpe); not on biases and LayerNorm gains
    return jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key in ("w", "wte", "wpe"), params)


def learning_rate(it, config: dict, xp=jnp):
    """The (AdamW) learning rate at iteration it. Linear warmup to learning_rate over warmup_iters (nanoGPT's get_lr),
    then lr_schedule's decay to min_lr at lr_decay_iters, then min_lr: cosine (nanoGPT's) over the whole remainder,
    or wsd, constant until the last decay_fraction of lr_decay_iters and linear from there. Constant when decay_lr is
    false. xp=jnp inside the optimizer (it is a traced count there), numpy for the logs."""
    lr, min_lr = config["learning_rate"], config["min_lr"]
    warmup, decay = config["warmup_iters"], config["lr_decay_iters"]
    if not config["decay_lr"]:
        return xp.asarray(lr, xp.float32)
    it = xp.asarray(it, xp.float32)
    if config["lr_schedule"] == "wsd":
        decay_start = max(decay - round(config["decay_fraction"] * decay), warmup)
        ratio = xp.clip((it - decay_start) / max(decay - decay_start, 1), 0.0, 1.0)
        decayed = lr - ratio * (lr - min_lr)
    else:
        ratio = xp.clip((it - warmup) / max(decay - warmup, 1), 0.0, 1.0)
        decayed = min_lr + 0.5 * (1.0 + xp.cos(xp.pi * ratio)) * (lr - min_lr)
    return xp.where(it < warmup, lr * (it + 1) / (warmup + 1), decayed)


def muon_learning_rate(it, config: dict, xp=jnp):  # Muon's: the same schedule from muon_learning_rate, min_lr scaled
    lr = config["learning_rate"]
    unit = {**config, "learning_rate": 1.0, "min_lr": config["min_lr"] / lr if lr else 0.0}
    return config["muon_learning_rate"] * learning_rate(it, unit, xp)
