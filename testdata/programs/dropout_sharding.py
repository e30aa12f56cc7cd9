"""gpt.dropout on a batch split across 4 CPU devices draws the masks it draws whole: prints "same". Run by tests.py
with 4 CPU devices and the checkout on PYTHONPATH."""
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import gpt

assert jax.device_count() == 4
x = jnp.arange(8 * 16 * 24, dtype=jnp.float32).reshape(8, 16, 24) + 1
key = jax.random.PRNGKey(3)
drop = jax.jit(lambda x, key: gpt.dropout(x, 0.3, key))
whole = np.asarray(drop(x, key))
mesh = Mesh(np.array(jax.devices()), ("data",))
for spec in (P("data"), P(None, "data"), P(None, None, "data")):
    split = np.asarray(drop(jax.device_put(x, NamedSharding(mesh, spec)), key))
    assert np.array_equal(split, whole), spec
print("same")
