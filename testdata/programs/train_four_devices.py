"""train.train on 4 CPU devices, replicated and fsdp: prints (as its last line) the losses of each and fsdp's largest
share of the params on one device. Run by tests.py with 4 CPU devices and the checkout on PYTHONPATH."""
import json
import sys

import jax
import numpy as np
from jax.sharding import Mesh

import cli
import devices
import train
import train_config

cli.enable_compilation_cache()
assert jax.device_count() == 4, jax.devices()
config = json.loads(sys.argv[1])
out = {}
for fsdp in (False, True):
    result = train.train({**config, "fsdp": fsdp, "out_dir": config["out_dir"] + str(fsdp)})
    out[str(fsdp)] = [result["losses"][i] for i in sorted(result["losses"])]
# what fsdp places on each device: train.run puts the params (and the optimizer state, alike) with these shardings
config = train_config.resolve_config(config)
params = train.init_params(config, train.scratch_hparams(config, 65))
placed = jax.device_put(params, devices.tree_shardings(Mesh(np.array(jax.devices()), ("data",)), params, True))
per_device = {d: 0 for d in jax.devices()}
for leaf in jax.tree.leaves(placed):
    for shard in leaf.addressable_shards:
        per_device[shard.device] += shard.data.size
out["fsdp_share"] = max(per_device.values()) / sum(x.size for x in jax.tree.leaves(params))
print(json.dumps(out))
