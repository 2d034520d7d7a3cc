"""Test setup: 8 fake CPU devices before any backend starts."""

import os

# Must run before jax initialises its backend, so sharding tests see 8 devices.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests never touch the network: tfds must not try to download anything.
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(
    os.path.dirname(__file__), ".tfds_never_used"))
