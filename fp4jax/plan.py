r"""A run's memory per device, before launch: does it fit, and what would.

  python -m fp4jax.plan --config=configs/paper.py:size=7b,nodes=4

Owns: `plan` (the per-device bytes of a config: parameters, optimizer
state, gradients, the accumulation buffer, saved activations of one
microbatch with the remat policy, communication buffers), `check` (the
same at the start of every run, before the data stage: a plan over
mesh.device_memory_gb is a one-line error naming the largest item and the
smallest optim.grad_accum / model.remat that would fit), `fit_in_place`
(the presets choose both) and the CLI.

The figures are analytic, from shapes and dtypes, and say so: parameters,
moments and gradients per device from each leaf's logical sharding on the
configured mesh (exact up to per-tensor scalars); saved activations from
`memory.activation_bytes_per_token` (the tensors autodiff keeps, per
policy); XLA's own temporaries (fusion buffers, collectives in flight) are
not modelled, which `HEADROOM` leaves room for. `--compile` adds the
compiled step's own figures on the devices at hand (fake CPU devices
included: the program is the CPU one, so they are indicative).

Must not import: tensorflow_datasets, grain, fp4jax.data, fp4jax.train,
fp4jax.main.
"""

import dataclasses
import functools
import math
import sys
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fp4jax import memory
from fp4jax import models
from fp4jax import runconfig
from fp4jax import sharding

GB = 1e9
# Share of device memory the planned items may take: XLA's temporaries
# (fusion outputs, collective buffers, the allocator's fragmentation) need
# the rest; a plan at 90% leaves ~8 GB of an 80 GB GPU for them.
HEADROOM = 0.9
# Remat policies from least to most recomputation that save memory: a plan
# tries them in this order ("quantized" only where projections quantize).
# "dots" is left out: it keeps every GEMM output, attention's included,
# in f32 (more than "none" keeps at 1.3B).
REMAT_ORDER = ("none", "dots_no_batch", "quantized", "full")


@dataclasses.dataclass(frozen=True)
class Plan:
  """Per-device bytes of a run (analytic).

  Attributes:
    items: {name: bytes per device}, in report order.
    devices: devices in the mesh.
    mesh: {"data", "fsdp", "tensor"} sizes.
    micro_rows: rows of one microbatch on a device.
    grad_accum: microbatches per step.
    remat: the model's remat policy.
    budget: bytes the items may take (device_memory_gb x HEADROOM), or
      None when mesh.device_memory_gb is 0.
  """
  items: dict[str, float]
  devices: int
  mesh: dict[str, int]
  micro_rows: float
  grad_accum: int
  remat: str
  budget: float | None

  @property
  def total(self) -> float:
    return sum(self.items.values())

  @property
  def fits(self) -> bool:
    return self.budget is None or self.total <= self.budget

  def largest(self) -> tuple[str, float]:
    return max(self.items.items(), key=lambda kv: kv[1])


def mesh_sizes(mesh_section: Mapping[str, Any],
               devices: int | None = None) -> dict[str, int]:
  """The mesh section's axis sizes, -1 resolved against `devices` (default:
  this process's jax.device_count()).

  Raises:
    ValueError: naming mesh.<axis>, as `sharding.make_mesh`.
  """
  n = jax.device_count() if devices is None else devices
  return sharding.mesh_sizes(mesh_section, n, exact=False)


def _shard_factor(spec, sizes: Mapping[str, int]) -> int:
  out = 1
  for entry in spec:
    for axis in (entry,) if isinstance(entry, str) else tuple(entry or ()):
      out *= sizes[axis]
  return out


@functools.lru_cache(maxsize=16)
def _param_shards(model_cfg: Any, rules,
                  sizes: tuple[tuple[str, int], ...]
                  ) -> list[tuple[int, int, int, int, bool]]:
  """(elements, ndim of one layer's slice, shard factor, the part of it
  over the tensor axis, layer-stacked) of every parameter leaf (cached: a search over
  policies and microbatch counts plans one model many times). A
  layer-stacked leaf (model.scan_layers) has one more dim than its
  layer's slice, which decides its master dtype as for one layer."""
  sizes = dict(sizes)
  abstract = models.abstract(model_cfg, models.layer_table(model_cfg, rules))
  params = nnx.state(abstract, nnx.Param)
  specs = sharding.flat_specs(params)
  leaves = jax.tree_util.tree_flatten_with_path(
      params, is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
  out = []
  for path, leaf in leaves:
    value = leaf.get_value() if isinstance(leaf, nnx.Variable) else leaf
    name = sharding.path_str(path)
    spec = specs[name]
    stacked = model_cfg.scan_layers and name.startswith("layers.")
    tensor = jax.sharding.PartitionSpec(*[
        tuple(a for a in ((e,) if isinstance(e, str) else tuple(e or ()))
              if a not in ("data", "fsdp")) for e in spec])
    out.append((int(np.prod(value.shape)), len(value.shape) - stacked,
                _shard_factor(spec, sizes), _shard_factor(tensor, sizes),
                stacked))
  return out


def plan(config, *, devices: int | None = None,
         grad_accum: int | None = None, remat: str | None = None,
         platform: str | None = None) -> Plan:
  """The per-device memory of `config` (analytic; see the module doc).

  Args:
    config: a run ConfigDict.
    devices: device count for a -1 mesh axis (default: jax.device_count()).
    grad_accum / remat: evaluate with these instead of the config's.
    platform: the devices the run will use ("gpu", "cpu", ...; default:
      this process's backend): model.attention="auto" is cuDNN's flash
      attention on "gpu" (no [T, T] probabilities kept), xla elsewhere.

  Raises:
    ValueError: an invalid config key (as at a run's start).
  """
  run = runconfig.translate(config)
  model_cfg = run.model
  if remat is not None:
    model_cfg = dataclasses.replace(model_cfg, remat=remat)
  if getattr(model_cfg, "attention", None) == "auto":
    segmented = bool(config.data.get("segment_ids", False))
    on_gpu = (platform or jax.default_backend()) == "gpu"
    model_cfg = dataclasses.replace(
        model_cfg, attention="cudnn" if on_gpu and not segmented else "xla")
  accum = run.optim.grad_accum if grad_accum is None else grad_accum
  sizes = mesh_sizes(config.mesh, devices)
  n_dev = math.prod(sizes.values())
  batch_ways = sizes["data"] * sizes["fsdp"]
  micro_rows = config.data.global_batch / batch_ways / accum
  o = run.optim
  master = jnp.dtype(o.master_dtype).itemsize
  mu, nu = jnp.dtype(o.mu_dtype).itemsize, jnp.dtype(o.nu_dtype).itemsize
  shards = _param_shards(dataclasses.replace(model_cfg, remat="none"),
                         run.rules, tuple(sorted(sizes.items())))
  params = sum(n / f * (master if nd >= 2 else 4) for n, nd, f, _, _ in shards)
  opt = sum(n / f * (mu + nu) for n, _, f, _, _ in shards)
  items = {"parameters": params, "optimizer state": opt}
  grad_dtype = config.comm.grad_dtype
  if grad_dtype == "float32":
    # XLA's own reduction: gradients come out sharded like the params.
    grads = sum(n / f * 4 for n, _, f, _, _ in shards)
    items["gradients (f32)"] = grads
    if accum > 1:
      items["accumulation buffer (f32)"] = grads
  else:
    # fp4jax.comm's per-shard path: each sharded leaf is gathered in the
    # dtype the model reads it in (kernels: the compute dtype, when
    # narrower; the embedding table, read by a row lookup: as stored), and
    # the model's matmuls keep the gathered kernels for the backward, so
    # every layer's are live when it starts, whatever the remat policy
    # (they are inputs of the rematerialised blocks). The backward of the
    # gather reduce-scatters each leaf's full-size cotangent onto its
    # shard, per microbatch: gradients and their accumulator are
    # shard-sized f32, and one leaf's full-size cotangent is in flight at
    # a time (XLA overlapping a few more is HEADROOM's). Replicated leaves
    # accumulate their local gradient (parameter-sized) and reduce once.
    # Under tensor parallelism all of this is per tensor shard (1 / t of
    # the leaf: comm runs it on each device's tensor shard).
    compute = jnp.dtype(model_cfg.compute_dtype).itemsize
    # (elements, bytes per element) of each gathered leaf, as read.
    # (elements, bytes per element, layer-stacked) of each gathered leaf,
    # as read.
    read = [(n / t, min(compute, master if nd >= 2 else 4), st)
            for n, nd, f, t, st in shards if f > t]
    table = model_cfg.vocab_size * model_cfg.d_model
    for n, _, f, t, st in shards:
      if n == table and not st and f > t:
        # The embedding table ("embed" dim over fsdp): the row lookup
        # reads it as stored, and its cotangent is that wide too.
        read.remove((n / t, min(compute, master), False))
        read.append((n / t, master, False))
        break
    if read:
      items["gathered parameters (compute dtype)"] = sum(
          n * b for n, b, _ in read)
    grads = sum(n / f * 4 for n, _, f, _, _ in shards)
    items["gradients (f32)"] = grads
    if accum > 1:
      items["accumulation buffer (f32)"] = grads
    # A replicated leaf's reduction widens its whole gradient to f32 and
    # sends payloads of the same length.
    payload = 4 + jnp.dtype(grad_dtype).itemsize
    # Scanned layers: the backward scan hands out the cotangents of all
    # the stacked leaves at once, when it ends (each [L, ...], every
    # layer's), so they are all in flight together.
    stacked = sum(n * b for n, b, st in read if st)
    items["gradient in flight (largest leaf)"] = max(
        [stacked] + [n * b for n, b, st in read if not st] +
        [n / t * payload for n, _, f, t, _ in shards if f == t], default=0.0)
  quantized = [r for _, r in run.rules if r is not None and r.quantizes]
  per_token = models.activation_bytes_per_token(
      model_cfg, config.data.seq_len, quantized=bool(quantized),
      recipe=quantized[0] if quantized else None, execution=model_cfg.gemm)
  if per_token is not None:     # a family without a model of them: unplanned
    items["saved activations (one microbatch)"] = (
        per_token * micro_rows * config.data.seq_len)
  gb = config.mesh.get("device_memory_gb", 0.0)
  if (isinstance(gb, bool) or not isinstance(gb, (int, float))
      or not 0 <= gb < math.inf):
    raise ValueError(f"mesh.device_memory_gb must be a number >= 0 (0 = "
                     f"unchecked), got {gb!r}")
  return Plan(items=items, devices=n_dev, mesh=sizes, micro_rows=micro_rows,
              grad_accum=accum, remat=model_cfg.remat,
              budget=gb * GB * HEADROOM if gb else None)


def _policies(config) -> list[str]:
  run = runconfig.translate(config)
  quantized = any(r is not None and r.quantizes for _, r in run.rules)
  return [p for p in REMAT_ORDER if quantized or p != "quantized"]


def _divisors(n: int) -> list[int]:
  return [d for d in range(1, n + 1) if n % d == 0]


def smallest_fit(config, devices: int | None = None,
                 platform: str | None = None) -> tuple[int, str] | None:
  """(grad_accum, remat) that fit with the least recomputation, then the
  fewest microbatches; None when nothing fits."""
  sizes = mesh_sizes(config.mesh, devices)
  rows = config.data.global_batch // (sizes["data"] * sizes["fsdp"])
  for policy in _policies(config):
    for accum in _divisors(max(rows, 1)):
      if plan(config, devices=devices, grad_accum=accum, remat=policy,
              platform=platform).fits:
        return accum, policy
  return None


def check(config, devices: int | None = None,
          platform: str | None = None) -> Plan:
  """The plan at a run's start; a misfit is one line.

  Raises:
    ValueError: the plan exceeds mesh.device_memory_gb, naming the largest
      item and what would fit.
  """
  p = plan(config, devices=devices, platform=platform)
  if p.fits:
    return p
  name, size = p.largest()
  sizes = mesh_sizes(config.mesh, devices)
  rows = config.data.global_batch // (sizes["data"] * sizes["fsdp"])
  hints = []
  for accum in _divisors(max(rows, 1)):
    if plan(config, devices=devices, grad_accum=accum,
            platform=platform).fits:
      hints.append(f"optim.grad_accum={accum}")
      break
  for policy in _policies(config):
    if plan(config, devices=devices, remat=policy, platform=platform).fits:
      hints.append(f"model.remat={policy!r}")
      break
  if not hints:
    both = smallest_fit(config, devices, platform)
    if both is not None:
      hints.append(f"optim.grad_accum={both[0]} with "
                   f"model.remat={both[1]!r}")
  fix = (" or ".join(hints) if hints else
         "nothing at this batch and mesh: more devices or a larger "
         "mesh.fsdp")
  raise ValueError(
      f"plan: {p.total / GB:.1f} GB per device exceeds "
      f"mesh.device_memory_gb={config.mesh.device_memory_gb:g} x "
      f"{HEADROOM} (largest: {name} {size / GB:.1f} GB); fits with {fix}")


def fit_in_place(config, devices: int | None = None,
                 platform: str | None = None) -> bool:
  """Sets optim.grad_accum and model.remat of `config` to `smallest_fit`;
  returns whether something fits (if not, both are left as they are: the
  run's start then says so)."""
  found = smallest_fit(config, devices, platform)
  if found is not None:
    config.optim.grad_accum, config.model.remat = found
  return found is not None


def compiled(config, depths: tuple[int, int] = (1, 2)) -> dict[str, float]:
  """XLA's own per-device figures for `config`'s step on the devices at
  hand, extrapolated to the full depth from two reduced ones.

  The train step is compiled (not run) at `depths` layers on the
  configured mesh; a layer's share is the difference, so the full model is
  d0 + (L - d0) x (d1 - d0) / (d1 - d0 layers). On CPU (fake devices) the
  program is XLA:CPU's: indicative for a GPU, not its figures.

  Returns:
    {"temp": bytes, "arguments": bytes, "per_layer_temp": bytes} per
    device, or {} when the backend gives no memory analysis.

  Raises:
    ValueError: the mesh does not fit the devices at hand (mesh.* keys).
  """
  from fp4jax import train_state  # pylint: disable=g-import-not-at-top
  run = runconfig.translate(config)
  mesh = sharding.make_mesh(**runconfig.mesh_axes(config))
  got = []
  for depth in depths:
    model_cfg = dataclasses.replace(run.model, n_layers=depth)
    rules = runconfig.quant_rules(config.quant, depth)[0]
    trainer = train_state.make_trainer(
        model_cfg, rules, run.optim, num_steps=run.num_steps, mesh=mesh,
        global_batch=config.data.global_batch, seq_len=config.data.seq_len,
        seed=0, segment_ids=config.data.segment_ids,
        comm_dtype=config.comm.grad_dtype)
    got.append(memory.compiled_bytes(trainer.train_step))
  if any(g is None for g in got):
    return {}
  (d0, d1), (m0, m1) = depths, got
  layers = run.model.n_layers - d0
  per = {k: (m1[k] - m0[k]) / (d1 - d0) for k in ("temp", "arguments")}
  return {"temp": m0["temp"] + layers * per["temp"],
          "arguments": m0["arguments"] + layers * per["arguments"],
          "per_layer_temp": per["temp"]}


def report(p: Plan) -> str:
  """The plan as lines: each item in GB per device, the total and the
  verdict."""
  lines = [f"memory per device (analytic), {p.devices} devices "
           f"{p.mesh}, {p.grad_accum} microbatch(es) of {p.micro_rows:g} "
           f"rows, remat={p.remat!r}:"]
  width = max(len(k) for k in p.items)
  for k, v in p.items.items():
    lines.append(f"  {k:<{width}}  {v / GB:8.2f} GB")
  lines.append(f"  {'total':<{width}}  {p.total / GB:8.2f} GB")
  if p.budget is not None:
    verdict = "fits" if p.fits else "DOES NOT FIT"
    lines.append(f"{verdict}: budget {p.budget / GB:.1f} GB "
                 f"(device_memory_gb x {HEADROOM})")
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
  """`python -m fp4jax.plan --config=FILE[:ARGS] [--config.key=value ...]
  [--devices=N] [--platform=gpu]`: prints the plan; exit 0 when it fits (or no
  mesh.device_memory_gb is set), 3 when not, 1 on a bad config (one line).
  """
  # Flags are defined here, not at import: configs/paper.py imports this
  # module inside fp4jax.main, which defines its own --config.
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from fp4jax import errtext  # pylint: disable=g-import-not-at-top
  fv = flags.FlagValues()
  cfg_flag = config_flags.DEFINE_config_file("config", lock_config=True,
                                             flag_values=fv)
  devices = flags.DEFINE_integer(
      "devices", 0, "devices of the cluster for a -1 mesh axis (0 = this "
      "machine's)", flag_values=fv)
  with_xla = flags.DEFINE_bool(
      "compile", False, "also compile the step at 1 and 2 layers on this "
      "machine's devices (CPU: as many fake devices as the mesh has) and "
      "print XLA's per-device figures extrapolated to the full depth",
      flag_values=fv)
  platform = flags.DEFINE_string(
      "platform", "gpu", "the devices the run will use: gpu (model.attention"
      "='auto' is cuDNN flash attention) or cpu", flag_values=fv)
  argv = list(sys.argv if argv is None else argv)
  try:
    fv(argv)
    p = plan(cfg_flag.value, devices=devices.value or None,
             platform=platform.value)
  except Exception as e:  # pylint: disable=broad-except
    print(f"error: {errtext.one_line(e)}", file=sys.stderr)
    return 1
  print(report(p))
  if with_xla.value:
    if jax.default_backend() == "cpu" and jax.device_count() < p.devices:
      print(f"error: --compile needs {p.devices} devices; set "
            f"XLA_FLAGS=--xla_force_host_platform_device_count={p.devices}",
            file=sys.stderr)
      return 1
    try:
      xla = compiled(cfg_flag.value)
    except Exception as e:  # pylint: disable=broad-except
      print(f"error: {errtext.one_line(e)}", file=sys.stderr)
      return 1
    if not xla:
      print(f"XLA ({jax.default_backend()}): no memory analysis")
    else:
      print(f"XLA ({jax.default_backend()}, compiled at 1 and 2 layers, "
            f"extrapolated): temp {xla['temp'] / GB:.2f} GB "
            f"({xla['per_layer_temp'] / GB:.3f} GB a layer), arguments "
            f"{xla['arguments'] / GB:.2f} GB per device")
  return 0 if p.fits else 3


if __name__ == "__main__":
  sys.exit(main())
