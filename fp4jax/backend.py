"""Which platform a program is built for: the target, not the host.

Owns: `target()`, the platform every trace-time choice of a GPU or CPU
program asks (GEMM impl "auto", FP8 dot algorithms, cuDNN attention, the
top-k kernel, Pallas interpret mode), and `targeting`, which sets it while
a function is traced. Without a target set, it is the platform of the
process's default devices, as `jax.default_backend()` says.

Why: a program traced in a CPU process for GPU devices (a deviceless
compile for an H200 topology, `bench/gpu_model.py`) must be the GPU
program; deciding from the process's default backend would trace the CPU
one. The trainer traces its steps under `targeting(of_devices(mesh))`.

Must not import: any fp4jax module (every layer may ask it).
"""

import contextlib
import contextvars
from collections.abc import Iterable, Iterator
from typing import Any

import jax

# Platform names as jax.default_backend() gives them; a device's own
# `platform` says "cuda" / "rocm" for GPUs.
_ALIASES = {"cuda": "gpu", "rocm": "gpu", "gpu": "gpu", "cpu": "cpu",
            "tpu": "tpu"}

_TARGET: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "fp4jax_target_platform", default=None)


def normalize(platform: str) -> str:
  """"gpu", "cpu" or "tpu" for a backend or device platform name.

  Raises:
    ValueError: an unknown platform name.
  """
  try:
    return _ALIASES[platform.lower()]
  except KeyError:
    raise ValueError(f"unknown platform {platform!r}; known: "
                     f"{sorted(set(_ALIASES))}") from None


def target() -> str:
  """The platform the program being traced is for: "gpu", "cpu", "tpu"."""
  platform = _TARGET.get()
  return platform if platform is not None else normalize(
      jax.default_backend())


def of_devices(devices: Any) -> str:
  """The platform of `devices` (a mesh, an array of devices or one)."""
  if hasattr(devices, "devices"):      # a Mesh
    devices = devices.devices
  if hasattr(devices, "flat"):         # a numpy array of devices
    devices = list(devices.flat)
  if not isinstance(devices, Iterable):
    devices = [devices]
  platforms = {normalize(d.platform) for d in devices}
  if len(platforms) != 1:
    raise ValueError(f"devices of several platforms: {sorted(platforms)}")
  return platforms.pop()


@contextlib.contextmanager
def targeting(platform: str | None) -> Iterator[None]:
  """`target()` is `platform` inside (None: unchanged)."""
  if platform is None:
    yield
    return
  token = _TARGET.set(normalize(platform))
  try:
    yield
  finally:
    _TARGET.reset(token)

