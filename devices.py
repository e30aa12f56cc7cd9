"""The devices a training run spans: the mesh's shardings, a batch placed on them, the processes agreeing, and memory
(XLA's plan for a compiled step, what a device can hold, the peak so far).

    shardings = tree_shardings(mesh, params, fsdp)        # replicated, or (fsdp) each array split on one dimension
    x = device_batch(mesh, local_rows(batch))             # this process's rows of [n, B, T] -> one global array
    plan, compiled = memory_plan(step, params, opt_shapes, opt_shardings, (x, y))
    print(describe_plan(plan), size(peak_memory()))
    peak_flops(0, jnp.bfloat16)                            # all devices' peak FLOP/s (for MFU), or None
"""
import math
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

GB = 1e9
# Dense bfloat16 peak FLOP/s of one device, by a substring of jax's device_kind (checked in this order).
PEAK_FLOPS = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "H800": 989e12, "GH200": 989e12, "A100": 312e12,
              "A800": 312e12, "L40S": 362e12, "L4": 121e12, "A10": 125e12, "V100": 125e12, "TPU v4": 275e12,
              "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12, "TPU v5": 459e12, "TPU v6": 918e12}


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


def describe_plan(plan):
    return (f"params {size(plan['params'])}, optimizer state {size(plan['optimizer'])}, one step's gradients and "
            f"activations {size(plan['step'])}: {size(plan['total'])} per device")


def size(n_bytes):  # "1.23 GB", or "45 MB" below a tenth of a GB
    return f"{n_bytes / GB:.2f} GB" if n_bytes >= GB / 10 else f"{n_bytes / 1e6:.0f} MB"


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


def agreed(*flags):
    """Each flag ORed over all processes, so that every process stops (or checkpoints) at the same step: a signal or
    a clock reaches processes at different times. One small all-gather per step, in a run of several processes."""
    if jax.process_count() == 1:
        return flags
    gathered = multihost_utils.process_allgather(np.array(flags, np.int32))
    return tuple(bool(x) for x in np.asarray(gathered).reshape(-1, len(flags)).max(axis=0))


def peak_flops(given, dtype):
    """Peak FLOP/s of all devices together, or None when unknown; given: one device's (--peak_flops), or 0 to look
    the device kind up in PEAK_FLOPS (dense bfloat16; half for float32 on GPUs, which run float32 matmuls at TF32
    rate; CPUs have no entry)."""
    if given:
        return given * jax.device_count()
    kind = jax.devices()[0].device_kind
    for name, flops in PEAK_FLOPS.items():
        if name.lower() in kind.lower():
            tf32 = jax.default_backend() == "gpu" and dtype == jnp.float32
            return flops / (2 if tf32 else 1) * jax.device_count()
    return None


def ready(x):
    # wait for a device value by polling rather than blocking in C++: Python then runs a Ctrl-C handler at once, not
    # when a step of many seconds ends
    while not x.is_ready():
        time.sleep(0.001)
    return x
