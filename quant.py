"""int8 weights: GPT-2's matrices as int8 with a float32 scale per block of 32 values, and the product that reads them.

    qparams = quantize_params(params)        # every matrix int8, the tied wte too; biases, LayerNorms, wpe unchanged
    logits = gpt.gpt(qparams, ids, n_head)   # gpt.py's functions take either
    y = matmul(x, qparams["wte"])            # x @ W.T: the C++ kernel (csrc/int8_matmul.cc) or the pure-JAX reference

A quantized matrix W [n_out, n_in] is a dict {"int8", "scale"} standing where the float matrix stood in params:
W[o, i] ~ int8 value * scale[i // 32, o], each scale its block's largest magnitude / 127 (symmetric, round to
nearest), blocks of 32 along a row (as llama.cpp's Q8_0; a row that 32 does not divide is one block). Rows are output
channels, as HF's nn.Linear stores them: gpt.py's linear weights ([n_in, n_out], the checkpoint's layout) are
transposed when quantized; wte ([n_vocab, n_embd]) already is, and its rows serve both the token embedding and the
tied unembedding. The int8 values are packed for the kernel, 16 rows at a time: "int8" is
[..., ceil(n_out / 16), n_in / 2, 16, 2] with int8[t, j, r, k] = W[16 t + r, 2 j + k] (the last tile padded with zero
rows), "scale" is [..., n_in / 32, n_out]. Activations stay float32 (the kernel rounds x to int16 per block of 32 inside
the product: an error below 2^-16 of the block's largest value, far under the weights' own).

Why blocks of 32 and not one scale per output channel: the error of a weight is bounded by its block's largest value
rather than its whole row's, which matters for weights with a few large entries per row; the kernel applies the
scales once per block of 16 rows x 32 values, so they cost no speed, and 1/8 more bytes than the int8 values.

The product: XLA:CPU has no fast int8 matrix-vector product (an int8 weight converted inside a dot runs several times
slower than float32), so on a CPU decoding calls a small C++ kernel through jax.ffi, built by `pip install -e .` when a
C++ compiler is there. Without it, for many rows (prefill, where XLA's float32 GEMM on the dequantized weights is
faster), or on a GPU (which fuses the dequantization into its matmul), matmul is the pure-JAX reference: the same
logits within the rounding of x (the tests check both against float64).
"""
import ctypes
import functools
import glob
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

BLOCK = 32
TILE = 16  # rows of a matrix packed together (the layout in the module docstring)
KERNEL_MAX_ROWS = 32  # above this many rows of x, dequantize + XLA's GEMM is faster than the kernel (bench.py)
KERNEL_TARGET = "gptjax_int8_matmul"
LINEAR_NAMES = ("c_attn", "c_proj", "c_fc")  # the params["h"] matrices, under attn/ and mlp/


def is_quantized(w) -> bool:
    return isinstance(w, dict) and "int8" in w


def block_size(n_in: int) -> int:  # BLOCK where it divides the row (every GPT-2 size), else one block per row
    return BLOCK if n_in % BLOCK == 0 else n_in


# ------------------------------------------------------------------------------------------------ quantizing


def quantize(w: np.ndarray) -> dict:
    """[..., n_out, n_in] float -> {"int8", "scale"} (numpy, in the layout the module docstring gives): the nearest
    int8 of each value in units of its block's scale, the block's largest magnitude / 127 (an all-zero block: 0)."""
    w = np.asarray(w, np.float32)
    *lead, n_out, n_in = w.shape
    if n_in % 2:
        raise ValueError(f"int8 weights need rows of an even length; this model has a matrix of {n_in}-value rows")
    block = block_size(n_in)
    blocks = w.reshape(*lead, n_out, n_in // block, block)
    scale = np.abs(blocks).max(axis=-1, keepdims=True) / 127
    q = np.rint(np.divide(blocks, scale, out=np.zeros_like(blocks), where=scale > 0)).astype(np.int8)
    q = np.pad(q.reshape(w.shape), [(0, 0)] * len(lead) + [(0, -n_out % TILE), (0, 0)])  # whole tiles of rows
    tiles = q.reshape(*lead, -1, TILE, n_in // 2, 2).swapaxes(-3, -2)  # [..., tile, pair, row in tile, 2]
    return {"int8": np.ascontiguousarray(tiles), "scale": np.ascontiguousarray(np.swapaxes(scale[..., 0], -1, -2))}


def dequantize(w: dict, dtype=jnp.float32) -> Float[Array, "*lead n_out n_in"]:
    q, scale = w["int8"], w["scale"]  # [..., tiles, n_in / 2, TILE, 2], [..., n_blocks, n_out]
    n_out, n_in = scale.shape[-1], 2 * q.shape[-3]
    rows = q.swapaxes(-3, -2).reshape(*q.shape[:-4], -1, n_in)[..., :n_out, :]
    return rows.astype(dtype) * jnp.repeat(scale.swapaxes(-1, -2).astype(dtype), n_in // scale.shape[-2], axis=-1)


def is_matrix(name: str) -> bool:  # a "/"-joined params name ("h/attn/c_attn/w", "h/3/mlp/c_fc/w", "wte")
    parts = name.split("/")
    return name == "wte" or (parts[-1] == "w" and parts[-2] in LINEAR_NAMES)


def quantize_params(params: dict) -> dict:
    """params (gpt.py's stacked layout or sampling.py's per-layer one; numpy or jax arrays) with every matrix
    quantized: wte and each layer's attn/c_attn, attn/c_proj, mlp/c_fc, mlp/c_proj "w". Numpy arrays come out
    (weights.to_device puts them on the device)."""
    def quantized(path, x):
        name = "/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        if not is_matrix(name):
            return x
        return quantize(np.asarray(x) if name == "wte" else np.swapaxes(np.asarray(x), -1, -2))  # -> [n_out, n_in]

    if is_quantized(params["wte"]):
        return params
    return jax.tree_util.tree_map_with_path(quantized, params)


def stored_shapes(shapes: dict) -> dict:
    """{params name: float shape} -> the same for a quantized model: each matrix's as name/int8 and name/scale."""
    out = {}
    for name, shape in shapes.items():
        if is_matrix(name):
            *lead, n_out, n_in = shape if name == "wte" else (*shape[:-2], shape[-1], shape[-2])
            out[f"{name}/int8"] = (*lead, -(-n_out // TILE), n_in // 2, TILE, 2)
            out[f"{name}/scale"] = (*lead, n_in // block_size(n_in), n_out)
        else:
            out[name] = shape
    return out


# ------------------------------------------------------------------------------------------------ the product


def matmul(x: Float[Array, "*rows n_in"], w: dict) -> Float[Array, "*rows n_out"]:
    """x @ W.T for a quantized W [n_out, n_in]: the kernel where it serves (a CPU, float32 x, at most
    KERNEL_MAX_ROWS rows, blocks of 32), else the pure-JAX reference."""
    q, scale = w["int8"], w["scale"]
    rows = int(np.prod(x.shape[:-1]))
    if (x.dtype == jnp.float32 and rows <= KERNEL_MAX_ROWS and x.shape[-1] % BLOCK == 0
            and jax.default_backend() == "cpu" and kernel_loaded()):
        out = jax.ShapeDtypeStruct((*x.shape[:-1], scale.shape[-1]), jnp.float32)
        return jax.ffi.ffi_call(KERNEL_TARGET, out, vmap_method="expand_dims")(x, q, scale)
    return reference_matmul(x, w)


def reference_matmul(x: Float[Array, "*rows n_in"], w: dict) -> Float[Array, "*rows n_out"]:
    # the definition: the dequantized matrix in x's dtype, then XLA's matmul (a GEMM: the fast way for many rows)
    rows = x.reshape(-1, x.shape[-1])
    y = rows @ dequantize(w, x.dtype).T
    return y.reshape(*x.shape[:-1], y.shape[-1])


def embed(w: dict, ids: Int[Array, "*shape"], dtype=jnp.float32) -> Float[Array, "*shape n_in"]:
    # rows of a quantized [n_vocab, n_embd] table: the token embedding of a quantized wte
    q, scale = w["int8"], w["scale"]
    n_in = 2 * q.shape[-3]
    rows = q[ids // TILE, :, ids % TILE, :].reshape(*ids.shape, n_in)  # [*ids, n_in / 2, 2] -> [*ids, n_in]
    scales = jnp.moveaxis(scale[:, ids], 0, -1)  # [*ids, n_blocks]
    return rows.astype(dtype) * jnp.repeat(scales.astype(dtype), n_in // scale.shape[0], axis=-1)


# ------------------------------------------------------------------------------------------------ the kernel


def kernel_path() -> str | None:  # the built extension beside this file (pip install -e . builds it in place)
    found = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "gptjax_int8*.so")))
    return found[-1] if found else None


@functools.cache
def kernel_loaded() -> bool:
    """Register the C++ kernel with XLA, once a process; False (and one line on stderr) where it was not built."""
    path = kernel_path()
    if path is None or os.environ.get("GPTJAX_NO_KERNEL"):
        why = "GPTJAX_NO_KERNEL is set" if path else "the C++ kernel is not built (pip install -e . with a C++ " \
                                                     "compiler builds it)"
        print(f"note: int8 matrix products run as pure JAX, several times slower on a CPU: {why}", file=sys.stderr,
              flush=True)
        return False
    library = ctypes.CDLL(path)
    jax.ffi.register_ffi_target(KERNEL_TARGET, jax.ffi.pycapsule(library.gptjax_int8_matmul), platform="cpu")
    return True
