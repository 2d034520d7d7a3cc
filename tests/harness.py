"""Small pieces shared by the training-system tests (no fixtures here)."""

import jax
import jax.numpy as jnp
import numpy as np


def host_tree(tree):
  """Every leaf as a host numpy array (typed PRNG keys as their key data)."""
  def one(x):
    if jnp.issubdtype(x.dtype, jax.dtypes.prng_key):
      x = jax.random.key_data(x)
    return np.asarray(jax.device_get(x))
  return jax.tree.map(one, tree)


def set_keys(config, updates):
  """Sets dotted keys ("optim.lr") of a ConfigDict in place; returns it."""
  for key, value in updates.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config
