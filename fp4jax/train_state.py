"""The train state and the pure, jitted train / eval steps.

Owns: `TrainState`, the masked cross-entropy, `train_step` / `eval_step`
(module-level pure functions) and `make_trainer`, which builds the model,
shards the state from logical axis names, and compiles both steps once
(ahead of time, with explicit in/out shardings and the state donated).

Takes plain values and frozen dataclasses (LlamaConfig, OptimConfig, quant
rules); the benchmark uses it directly.

Must not import: ml_collections, tensorflow_datasets, grain, fp4jax.data,
fp4jax.checkpoint, fp4jax.train, fp4jax.main.
"""

import dataclasses
import functools
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from fp4jax import backend
from fp4jax import comm
from fp4jax import models
from fp4jax import optim
from fp4jax import qconfig
from fp4jax import sharding
from fp4jax import telemetry

# Salt folded into the run key for evaluation, far from any step number.
_EVAL_SALT = 0x7FFF_FFFF
BATCH_KEYS = ("inputs", "targets", "mask", "segment_ids")
BATCH_DTYPES = {"inputs": jnp.int32, "targets": jnp.int32,
                "mask": jnp.float32, "segment_ids": jnp.int32}

Batch = Mapping[str, jax.Array]


@flax.struct.dataclass
class TrainState:
  """Everything a step reads and writes; also what is checkpointed.

  Attributes:
    step: int32 [], optimizer steps taken (skipped ones included).
    params: nnx.State of the model's Params (master dtype).
    opt_state: the optax state of `optim.make_optimizer`.
    rng: typed PRNG key of the run; step s uses fold_in(rng, s).
    skipped: int32 [], steps whose update was dropped as non-finite.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array
  skipped: jax.Array


def cross_entropy(logits_btv: jax.Array, targets_bt: jax.Array,
                  mask_bt: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Masked next-token negative log-likelihood, in float32.

  Args:
    logits_btv: [B, T, V] logits.
    targets_bt: [B, T] int token ids.
    mask_bt: [B, T] weights (1 = count this target, 0 = ignore).

  Returns:
    (sum of nll * mask, sum of mask), both f32 scalars.
  """
  logits = logits_btv.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  picked = jnp.take_along_axis(logits, targets_bt[..., None], axis=-1)[..., 0]
  mask = mask_bt.astype(jnp.float32)
  return jnp.sum((lse - picked) * mask), jnp.sum(mask)


def _nll_sum(params, graphdef, batch: Batch, key, segment_ids: bool):
  model = nnx.merge(graphdef, params)
  logits = model(batch["inputs"], key=key,
                 segment_ids=batch["segment_ids"] if segment_ids else None)
  return cross_entropy(logits, batch["targets"], batch["mask"])


def _loss(params, graphdef, batch: Batch, key, segment_ids: bool):
  nll, n = _nll_sum(params, graphdef, batch, key, segment_ids)
  return nll / jnp.maximum(n, 1.0)


def microbatch_keys(key: jax.Array, n: int) -> jax.Array:
  """[n] keys, one per microbatch: independent stochastic rounding."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(jnp.arange(n))


def split_microbatches(batch: Batch, n: int, ways: int) -> dict[str, Any]:
  """[B, T] rows -> [n, B / n, T] microbatches that move no row between
  devices.

  The batch's rows are split into `ways` contiguous shards (one per device
  group of the batch axes); microbatch i takes the i-th of n contiguous
  chunks of every shard, so each device's rows stay on it. `comm`'s
  per-shard path splits its local rows the same way.

  Args:
    batch: arrays of [B, T]; B divisible by ways * n.
    n: microbatches.
    ways: row shards (product of the batch mesh axes' sizes).

  Returns:
    The same keys, each [n, B / n, T].
  """
  def split(x):
    rows = x.shape[0] // (ways * n)
    x = x.reshape(ways, n, rows, *x.shape[1:])
    return jnp.swapaxes(x, 0, 1).reshape(n, ways * rows, *x.shape[3:])
  return {k: split(v) for k, v in batch.items()}


def _accumulated_grads(grad_params, graphdef, batch: Batch, key, *,
                       segment_ids: bool, n: int, ways: int,
                       row_spec: PartitionSpec):
  """(mean loss, f32 gradient) of the whole batch, as a `lax.scan` over n
  microbatches (optim.grad_accum): one microbatch's activations are live at
  a time.

  Each microbatch's loss is its nll sum over the whole batch's target
  count, so the gradients add up to the one-batch gradient (up to the
  order of the f32 sums) and the backward sees the same cotangent scale.
  Microbatch i draws its stochastic rounding from fold_in(key, i).
  """
  micro = split_microbatches(batch, n, ways)
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty:
    micro = {k: jax.lax.with_sharding_constraint(
        v, NamedSharding(mesh, PartitionSpec(None, *row_spec)))
             for k, v in micro.items()}
  denom = jnp.maximum(jnp.sum(batch["mask"].astype(jnp.float32)), 1.0)

  def micro_loss(params, rows, k):
    nll, _ = _nll_sum(params, graphdef, rows, k, segment_ids)
    return nll / denom

  def body(acc, xs):
    rows, k = xs
    loss, g = jax.value_and_grad(micro_loss)(grad_params, rows, k)
    acc_loss, acc_g = acc
    acc_g = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc_g, g)
    return (acc_loss + loss, acc_g), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32),
                       grad_params)
  (loss, grads), _ = jax.lax.scan(
      body, (jnp.zeros([], jnp.float32), zeros),
      (micro, microbatch_keys(key, n)))
  return loss, grads


def train_step(state: TrainState, batch: Batch, *, graphdef: Any,
               tx: optax.GradientTransformation, optim_cfg: Any,
               schedule: Callable[[jax.Array], jax.Array],
               skip_nonfinite: bool = False, segment_ids: bool = False,
               metrics_fn: Callable[..., Mapping[str, Any]] | None = None,
               comm_dtype: str = "float32",
               comm_axes: tuple[str, ...] = ("data", "fsdp"),
               comm_specs: Any = None
               ) -> tuple[TrainState, dict[str, Any]]:
  """One optimizer step on a global batch.

  With optim_cfg.grad_accum = n > 1 the batch's gradient is accumulated
  over n microbatches, in f32: with f32 communication and replicated
  parameters inside `comm.data_parallel_grads`, reduced once per step;
  with sharded parameters by XLA (`_accumulated_grads`) or, with a
  low-precision comm_dtype, by `comm.data_parallel_grads`, each
  microbatch's gradient reduce-scattered onto the shards.

  Args:
    state: the current TrainState.
    batch: {"inputs", "targets", "segment_ids"}: int32 [B, T]; "mask": f32.
    graphdef: the model's nnx GraphDef (static).
    tx: the optax optimizer (static).
    optim_cfg: `optim.OptimConfig` (static) for master-weight updates.
    schedule: step -> learning rate, for the "lr" metric.
    skip_nonfinite: if True, a step whose loss or gradient norm is not
      finite keeps the old params and optimizer state (step still advances,
      so the data and key move on) and counts in `skipped`.
    segment_ids: pass batch["segment_ids"] to the model (packed documents).
    metrics_fn: optional (params=, grads=) -> nested dict of scalars merged
      into the metrics (per-layer telemetry).
    comm_dtype: comm.grad_dtype: what the gradient reduction moves.
    comm_axes: the mesh axes the batch rows are split over.
    comm_specs: PartitionSpecs of the params (FSDP: the gradient is
      reduce-scattered onto them); None = replicated.

  Returns:
    The new state and {"loss", "grad_norm", "lr", "nonfinite", ...} as f32 /
    int32 scalars ("nonfinite" is 1 if this step's loss or grad norm was
    NaN/inf).
  """
  key = jax.random.fold_in(state.rng, state.step)
  model_key, round_key = jax.random.split(key)
  grad_params = optim.params_for_grad(state.params, optim_cfg)
  n = optim_cfg.grad_accum
  mesh = jax.sharding.get_abstract_mesh()
  # Replicated parameters (every leaf's spec on axes of size 1): f32
  # accumulation inside fp4jax.comm's per-shard step costs no memory and
  # reduces once per step. With sharded parameters (fsdp, tensor) XLA's own
  # accumulation keeps gradients sharded and so reduce-scatters each
  # microbatch's: an unreduced full-size f32 accumulator per device is
  # what FSDP exists to avoid.
  def sharded(spec):
    return any(mesh.shape[a] > 1 for entry in spec for a in
               ((entry,) if isinstance(entry, str) else tuple(entry or ())))
  replicated = comm_specs is None or not any(
      sharded(s) for s in jax.tree.leaves(
          comm_specs, is_leaf=lambda x: isinstance(x, PartitionSpec)))
  per_shard = comm_dtype != "float32" or (n > 1 and replicated
                                          and not mesh.empty)
  if not per_shard and n == 1:
    loss, grads = jax.value_and_grad(_loss)(grad_params, graphdef, batch,
                                            model_key, segment_ids)
  elif not per_shard:
    ways = 1 if mesh.empty else math.prod(mesh.shape[a] for a in comm_axes)
    loss, grads = _accumulated_grads(
        grad_params, graphdef, batch, model_key, segment_ids=segment_ids,
        n=n, ways=ways, row_spec=(comm_axes,) if comm_axes else ())
  else:
    # Per-shard gradients reduced moving `comm_dtype` (fp4jax.comm):
    # FSDP-sharded leaves reduce-scattered in the backward, per
    # microbatch; replicated ones accumulated and reduced once.
    def loss_sum(params, rows, key):
      return _nll_sum(params, graphdef, rows, key, segment_ids)
    keys = (model_key,) if n == 1 else (microbatch_keys(model_key, n),)
    loss, grads = comm.data_parallel_grads(
        loss_sum, grad_params, batch, mesh=jax.sharding.get_abstract_mesh(),
        batch_axes=comm_axes, grad_dtype=comm_dtype, args=keys,
        param_specs=comm_specs, microbatches=n)
  # In f32 whatever the gradients' dtype (a bf16 master's are bf16): the
  # norm of a bf16 sum of squares depends on how the leaves are laid out.
  grad_norm = optax.tree.norm(jax.tree.map(
      lambda g: g.astype(jnp.float32), grads))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  # The key makes low-memory (2-byte) master weights round stochastically,
  # so updates below half an ulp still count in expectation.
  params = optim.apply_updates(state.params, updates, optim_cfg, round_key)
  ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  skipped = state.skipped
  if skip_nonfinite:
    keep = functools.partial(jax.tree.map, lambda new, old: jnp.where(
        ok, new, old))
    params = keep(params, state.params)
    opt_state = keep(opt_state, state.opt_state)
    skipped = skipped + (~ok).astype(jnp.int32)
  # A skipped step keeps the optimizer state, schedule count included, so
  # the applied learning rate follows the steps actually taken.
  metrics = {"loss": loss, "grad_norm": grad_norm,
             "lr": jnp.asarray(schedule(state.step - state.skipped),
                               jnp.float32),
             "nonfinite": (~ok).astype(jnp.int32)}
  if metrics_fn is not None:
    metrics.update(metrics_fn(params=state.params, grads=grads))
  new = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                      skipped=skipped)
  return new, metrics


def eval_step(params: Any, rng: jax.Array, batch: Batch, *, graphdef: Any,
              segment_ids: bool = False) -> dict[str, jax.Array]:
  """Summed nll and target count of one batch (no update).

  Returns:
    {"nll_sum": f32 [], "tokens": f32 []}; the val loss of several batches
    is sum(nll_sum) / sum(tokens).
  """
  model = nnx.merge(graphdef, params)
  key = jax.random.fold_in(rng, _EVAL_SALT)
  logits = model(batch["inputs"], key=key,
                 segment_ids=batch["segment_ids"] if segment_ids else None)
  nll, n = cross_entropy(logits, batch["targets"], batch["mask"])
  return {"nll_sum": nll, "tokens": n}


def telemetry_step(params: Any, rng: jax.Array, batch: Batch, *,
                   graphdef: Any, segment_ids: bool = False,
                   paths: Sequence[str] = ()) -> dict[str, Any]:
  """Per-projection quantization stats of one batch (no update).

  One forward and backward with a `telemetry.Probe` active: the forward
  records each quantized projection's activation (x) and weight (w)
  operands, and gradient taps on `paths` return the stats of their
  upstream gradient (g) through the backward.

  Returns:
    {"telemetry": {path: {"x": {...}, "w": {...}, "g": {...}}}} of f32
    scalars (see `telemetry.operand_stats`).
  """
  taps = {p: jnp.zeros([len(telemetry.STAT_KEYS)], jnp.float32)
          for p in paths}
  key = jax.random.fold_in(rng, _EVAL_SALT - 1)

  tapped: set[str] = set()   # a trace-time fact, not an array

  def loss(taps):
    with telemetry.probing(taps) as probe:
      value = _loss(params, graphdef, batch, key, segment_ids)
    tapped.update(probe.tapped)
    return value, probe.stats

  (_, stats), tap_grads = jax.value_and_grad(loss, has_aux=True)(taps)
  out = {}
  for path, entry in stats.items():
    entry = dict(entry)
    if path in tapped:
      entry["g"] = telemetry.unpack_tap(tap_grads[path])
    out[path] = entry
  return {"telemetry": out}


@dataclasses.dataclass
class Trainer:
  """A model with its sharded state layout and compiled steps.

  Attributes:
    model_cfg: the LlamaConfig.
    graphdef: the model's nnx GraphDef.
    quant_table: projection path -> recipe name ("none" = plain).
    mesh: the device mesh.
    state_shardings: TrainState-shaped pytree of NamedSharding.
    abstract_state: TrainState of ShapeDtypeStruct (with shardings): the
      restore target.
    batch_sharding: NamedSharding of every [B, T] batch array.
    init: () -> TrainState, created already sharded.
    train_step: compiled (state, batch) -> (state, metrics); donates state.
    eval_step: compiled (params, rng, batch) -> {"nll_sum", "tokens"}.
    compile_seconds: wall time spent lowering and compiling all steps.
    train_compile_seconds: of which the train step's.
    telemetry_step: compiled (params, rng, batch) -> per-layer stats (see
      `telemetry_step`), or None when not asked for.
    train_step_hlo: the train step as lowered (StableHLO text, before the
      backend's passes: the dtypes the program asks its collectives to
      move; a backend without FP8 collectives may widen them when it
      compiles).
  """
  model_cfg: Any
  graphdef: Any
  quant_table: dict[str, str]
  mesh: jax.sharding.Mesh
  state_shardings: Any
  abstract_state: Any
  batch_sharding: NamedSharding
  init: Callable[[], TrainState]
  train_step: Callable[..., tuple[TrainState, dict[str, Any]]]
  eval_step: Callable[..., dict[str, jax.Array]]
  compile_seconds: float
  telemetry_step: Callable[..., dict[str, Any]] | None = None
  train_step_hlo: str = ""
  train_compile_seconds: float = 0.0

  def put_batch(self, local: Mapping[str, Any]) -> dict[str, jax.Array]:
    """This process's numpy rows -> global arrays placed per batch_sharding."""
    return {k: jax.make_array_from_process_local_data(
        self.batch_sharding, np.asarray(local[k], BATCH_DTYPES[k]))
            for k in BATCH_KEYS}


def layer_table(model_cfg: Any,
                quant_rules: Sequence[tuple[str, Any]] | None
                ) -> dict[str, Any]:
  """{projection path: Recipe or None}: the layer rules resolved over the
  model's projection paths (`models.layer_table`), once per trainer."""
  return models.layer_table(model_cfg, quant_rules)


def param_path(path: str, model_cfg: Any) -> str:
  """Where projection `path`'s parameters live: "layers.3.attn.q_proj" is
  "layers.attn.q_proj" (slice 3 of its leading axis) when the layers are
  stacked (model.scan_layers), else itself."""
  if model_cfg.scan_layers and path.startswith("layers."):
    return "layers." + path.split(".", 2)[2]
  return path


def _weight_blocks(table: Mapping[str, Any], model_cfg: Any
                   ) -> dict[str, dict[int, int]]:
  """{kernel path: {dim: block}} of the block-scaled weight operands of a
  `layer_table`.

  The forward scales w [K, N] along its `axis`; a re-quantizing backward
  scales it again for dgrad as its own spec says (along N). A stacked
  kernel [L, K, N] has them one dim later.
  """
  out = {}
  for path, r in table.items():
    if r is None:
      continue
    specs = [q for q in (r.w, r.dgrad.rhs)
             if isinstance(q, qconfig.TensorQuant) and q.block]
    if not specs:
      continue
    dims = {}
    for q in specs:
      for d in ((0, 1) if q.block_2d else (q.axis % 2,)):
        dims[d] = q.block
    where = param_path(path, model_cfg)
    lead = int(where != path)
    out[f"{where}.kernel"] = {d + lead: b for d, b in dims.items()}
  return out


def kernel_mask(kernels: frozenset[str]) -> Callable[[Any], Any]:
  """params-shaped tree -> Python bools: True on the leaves whose dotted
  path ("layers.0.attn.q_proj.kernel") is in `kernels`."""
  def mask(tree):
    # Leaves of an nnx.State sit under each Variable's ".value".
    return jax.tree_util.tree_map_with_path(
        lambda path, _: sharding.path_str(path).removesuffix(".value")
        in kernels, tree)
  return mask


def fp8_grad_mask(table: Mapping[str, Any], model_cfg: Any
                  ) -> Callable[[Any], Any]:
  """True on the kernels of a `layer_table`'s quantized projections: the
  weight gradients the paper keeps in FP8 (RECIPE §6)."""
  return kernel_mask(frozenset(f"{param_path(p, model_cfg)}.kernel"
                               for p, r in table.items()
                               if r is not None and r.quantizes))


def projection_mask(model_cfg: Any) -> Callable[[Any], Any]:
  """True on the block projections' kernels (RECIPE §5), quantized or not."""
  rx = re.compile(qconfig.PROJECTION_PATTERN)
  return kernel_mask(frozenset(f"{param_path(p, model_cfg)}.kernel" for p in
                               models.projection_paths(model_cfg)
                               if rx.fullmatch(p)))


def layer_mask(model_cfg: Any) -> Callable[[Any], Any]:
  """params-shaped tree -> bools: True on the leaves with a leading layer
  axis (every "layers." leaf when model.scan_layers, else none); the
  optimizer keeps their per-tensor scales per layer (`optim`)."""
  def mask(tree):
    return jax.tree_util.tree_map_with_path(
        lambda path, _: model_cfg.scan_layers and
        sharding.path_str(path).startswith("layers."), tree)
  return mask


def _axes(entry: Any) -> tuple[str, ...]:
  """A PartitionSpec entry as a tuple of mesh axis names."""
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


def check_fit(model_cfg: Any,
              quant_rules: Sequence[tuple[str, Any]] | None, *,
              mesh: jax.sharding.Mesh, global_batch: int, seq_len: int,
              logical_rules: sharding.Rules = sharding.LOGICAL_RULES,
              comm_dtype: str = "float32", grad_accum: int = 1) -> Any:
  """Checks that the model, batch and sequence fit the mesh; compiles nothing.

  The checks of `make_trainer` that need no compilation (shapes only, by
  `nnx.eval_shape`), so a run can reject a bad config before its data stage.

  Returns:
    The abstract model (`models.abstract`: shapes only).

  Raises:
    ValueError: naming the config key when batch, sequence or parameter
      dims do not fit the mesh or model.
  """
  comm.check(comm_dtype, mesh)
  if seq_len > model_cfg.max_seq_len:
    raise ValueError(f"data.seq_len={seq_len} exceeds the model's "
                     f"max_seq_len={model_cfg.max_seq_len}")
  batch_sh = sharding.batch_sharding(mesh, logical_rules)
  batch_ways = 1
  for axes in batch_sh.spec[:1]:
    for a in (axes,) if isinstance(axes, str) else tuple(axes or ()):
      batch_ways *= mesh.shape[a]
  if global_batch % batch_ways:
    raise ValueError(f"data.global_batch={global_batch} is not divisible by "
                     f"the {batch_ways} batch shards of the mesh "
                     f"{dict(mesh.shape)}")
  rows = global_batch // batch_ways
  if rows % grad_accum:
    raise ValueError(f"optim.grad_accum={grad_accum} does not divide the "
                     f"{rows} rows each of the {batch_ways} batch shards "
                     f"gets (data.global_batch={global_batch}); use a "
                     f"divisor of {rows}")
  table = layer_table(model_cfg, quant_rules)
  abstract_model = models.abstract(model_cfg, table)
  _, abstract_params, _ = nnx.split(abstract_model, nnx.Param, ...)
  # The gradient communication's layout limits, before anything traces.
  comm.check(comm_dtype, mesh, param_specs=jax.tree.map(
      lambda sh: sh.spec, sharding.state_shardings(
          abstract_params, mesh, logical_rules)),
             batch_axes=_axes(batch_sh.spec[0]))
  sharding.check_divisible(
      abstract_params, mesh, logical_rules,
      blocks=_weight_blocks(table, model_cfg))
  return abstract_model


def _state_layout(abstract_model: Any, model_cfg: Any,
                  quant_rules: Sequence[tuple[str, Any]] | None,
                  optim_cfg: Any, *, num_steps: int, mesh: jax.sharding.Mesh,
                  seed: int, logical_rules: sharding.Rules,
                  schedule: Any = None):
  """(tx, init, graphdef, abstract sharded TrainState, its shardings)."""
  table = layer_table(model_cfg, quant_rules)
  tx = optim.make_optimizer(
      optim_cfg, num_steps, fp8_grad_mask(table, model_cfg),
      proj_mask=projection_mask(model_cfg), schedule=schedule,
      layer_mask=layer_mask(model_cfg))

  def build_model(key):
    return models.build(model_cfg, table, nnx.Rngs(params=key))

  def init() -> TrainState:
    root = jax.random.key(seed)
    params = nnx.state(build_model(jax.random.fold_in(root, 0)), nnx.Param)
    params = optim.cast_master(params, optim_cfg, layer_mask(model_cfg))
    return TrainState(step=jnp.zeros([], jnp.int32), params=params,
                      opt_state=tx.init(params),
                      rng=jax.random.fold_in(root, 1),
                      skipped=jnp.zeros([], jnp.int32))

  graphdef, _, rest = nnx.split(abstract_model, nnx.Param, ...)
  if jax.tree.leaves(rest):
    raise NotImplementedError("model state other than nnx.Param is not "
                              f"supported: {rest}")
  abstract = jax.eval_shape(init)
  state_sh = sharding.state_shardings(abstract, mesh, logical_rules)
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, state_sh)
  return tx, init, graphdef, abstract, state_sh


def abstract_state(model_cfg: Any,
                   quant_rules: Sequence[tuple[str, Any]] | None,
                   optim_cfg: Any, *, num_steps: int, mesh: jax.sharding.Mesh,
                   seed: int = 0,
                   logical_rules: sharding.Rules = sharding.LOGICAL_RULES,
                   abstract_model: Any = None) -> tuple[Any, Any]:
  """(graphdef, abstract TrainState) of a run, compiling nothing.

  What a checkpoint of that run restores into (`checkpoint.Checkpointer`)
  without building a Trainer: evaluation and export.

  Args:
    abstract_model: `check_fit`'s result when the caller has it (else
      built here).

  Returns:
    The model's nnx GraphDef and a TrainState of `jax.ShapeDtypeStruct`s
    carrying their shardings on `mesh`.
  """
  if abstract_model is None:
    abstract_model = models.abstract(model_cfg,
                                     layer_table(model_cfg, quant_rules))
  _, _, graphdef, abstract, _ = _state_layout(
      abstract_model, model_cfg, quant_rules, optim_cfg, num_steps=num_steps,
      mesh=mesh, seed=seed, logical_rules=logical_rules)
  return graphdef, abstract


def _train_step_parts(model_cfg, quant_rules, optim_cfg, *, num_steps, mesh,
                      global_batch, seq_len, seed, logical_rules,
                      skip_nonfinite=False, segment_ids=False,
                      metrics_fn=None, comm_dtype="float32"):
  """What make_trainer and lower_train_step share: (abstract model, batch
  sharding, init fn, graphdef, abstract state, state shardings, abstract
  batch, train step fn)."""
  abstract_model = check_fit(model_cfg, quant_rules, mesh=mesh,
                             global_batch=global_batch, seq_len=seq_len,
                             logical_rules=logical_rules,
                             comm_dtype=comm_dtype,
                             grad_accum=optim_cfg.grad_accum)
  batch_sh = sharding.batch_sharding(mesh, logical_rules)
  schedule = optim.make_schedule(optim_cfg, num_steps)
  tx, init, graphdef, abstract, state_sh = _state_layout(
      abstract_model, model_cfg, quant_rules, optim_cfg,
      num_steps=num_steps, mesh=mesh, seed=seed, logical_rules=logical_rules,
      schedule=schedule)
  abstract_batch = {k: jax.ShapeDtypeStruct((global_batch, seq_len),
                                            BATCH_DTYPES[k], sharding=batch_sh)
                    for k in BATCH_KEYS}
  step_fn = functools.partial(
      train_step, graphdef=graphdef, tx=tx, optim_cfg=optim_cfg,
      schedule=schedule, skip_nonfinite=skip_nonfinite,
      segment_ids=segment_ids, metrics_fn=metrics_fn, comm_dtype=comm_dtype,
      comm_axes=_axes(batch_sh.spec[0]),
      comm_specs=jax.tree.map(lambda sh: sh.spec, state_sh.params))
  return (abstract_model, batch_sh, init, graphdef, abstract, state_sh,
          abstract_batch, step_fn)


def lower_train_step(model_cfg: Any,
                     quant_rules: Sequence[tuple[str, Any]] | None,
                     optim_cfg: Any, *, num_steps: int,
                     mesh: jax.sharding.Mesh, global_batch: int,
                     seq_len: int, seed: int = 0,
                     logical_rules: sharding.Rules = sharding.LOGICAL_RULES,
                     segment_ids: bool = False,
                     comm_dtype: str = "float32",
                     platform: str | None = None) -> Any:
  """The train step of `make_trainer`, lowered for `mesh`'s devices and
  not compiled (nothing is initialised or run): for reading or compiling
  the program of devices this process may not have (a deviceless GPU
  topology). Arguments as `make_trainer`, and `platform`: lower for it
  instead of the mesh's devices ("cuda": the GPU program's StableHLO from
  a CPU mesh, for reading only; it cannot be compiled without the GPU
  plugin).

  Returns:
    jax.stages.Lowered of train_step(state, batch).
  """
  (_, batch_sh, _, _, abstract, state_sh, abstract_batch,
   step_fn) = _train_step_parts(
       model_cfg, quant_rules, optim_cfg, num_steps=num_steps, mesh=mesh,
       global_batch=global_batch, seq_len=seq_len, seed=seed,
       logical_rules=logical_rules, segment_ids=segment_ids,
       comm_dtype=comm_dtype)
  replicated = NamedSharding(mesh, PartitionSpec())
  with sharding.use_mesh(mesh, logical_rules), backend.targeting(platform):
    jitted = jax.jit(step_fn, in_shardings=(state_sh, batch_sh),
                     out_shardings=(state_sh, replicated), donate_argnums=0)
    if platform is None:
      return jitted.lower(abstract, abstract_batch)
    return jitted.trace(abstract, abstract_batch).lower(
        lowering_platforms=(platform,))


def make_trainer(model_cfg: Any,
                 quant_rules: Sequence[tuple[str, Any]] | None,
                 optim_cfg: Any, *, num_steps: int, mesh: jax.sharding.Mesh,
                 global_batch: int, seq_len: int, seed: int,
                 logical_rules: sharding.Rules = sharding.LOGICAL_RULES,
                 skip_nonfinite: bool = False, segment_ids: bool = False,
                 metrics_fn: Callable[..., Mapping[str, Any]] | None = None,
                 telemetry_on: bool = False,
                 comm_dtype: str = "float32") -> Trainer:
  """Builds the model, its sharded state layout and the compiled steps.

  Args:
    model_cfg: model shape and numerics.
    quant_rules: (regex, Recipe | None) pairs over the model's projection
      paths (`models.layer_table`); None = none.
    optim_cfg: `optim.OptimConfig`.
    num_steps: schedule length.
    mesh: device mesh (axes data, fsdp, tensor).
    global_batch: B; divisible by the data x fsdp mesh size.
    seq_len: T; at most model_cfg.max_seq_len.
    seed: init and run key seed.
    logical_rules: logical -> mesh axis rules.
    skip_nonfinite: see `train_step`.
    segment_ids: see `train_step`.
    metrics_fn: see `train_step`.
    telemetry_on: also compile `telemetry_step`.
    comm_dtype: comm.grad_dtype (see `train_step`).

  Returns:
    A Trainer.

  Raises:
    ValueError: naming the config key when batch, sequence or parameter
      dims do not fit the mesh or model.
  """
  (abstract_model, batch_sh, init, graphdef, abstract, state_sh,
   abstract_batch, step_fn) = _train_step_parts(
       model_cfg, quant_rules, optim_cfg, num_steps=num_steps, mesh=mesh,
       global_batch=global_batch, seq_len=seq_len, seed=seed,
       logical_rules=logical_rules, skip_nonfinite=skip_nonfinite,
       segment_ids=segment_ids, metrics_fn=metrics_fn, comm_dtype=comm_dtype)
  replicated = NamedSharding(mesh, PartitionSpec())
  eval_fn = functools.partial(eval_step, graphdef=graphdef,
                              segment_ids=segment_ids)
  t0 = time.perf_counter()
  # Trace inside the mesh context so activation constraints take effect;
  # compiling ahead of time means each step is traced exactly once.
  with sharding.use_mesh(mesh, logical_rules):
    init_c = jax.jit(init, out_shardings=state_sh).lower().compile()
    t_train = time.perf_counter()
    train_l = jax.jit(step_fn, in_shardings=(state_sh, batch_sh),
                      out_shardings=(state_sh, replicated),
                      donate_argnums=0).lower(abstract, abstract_batch)
    train_c = train_l.compile()
    train_seconds = time.perf_counter() - t_train
    eval_c = jax.jit(eval_fn, in_shardings=(state_sh.params, replicated,
                                            batch_sh),
                     out_shardings=replicated).lower(
                         abstract.params, abstract.rng, abstract_batch
                     ).compile()
    tele_c = None
    if telemetry_on:
      quantized = tuple(p for p, r in abstract_model.quant_table.items()
                        if r != "none")
      tele_fn = functools.partial(telemetry_step, graphdef=graphdef,
                                  segment_ids=segment_ids, paths=quantized)
      tele_c = jax.jit(tele_fn, in_shardings=(state_sh.params, replicated,
                                              batch_sh),
                       out_shardings=replicated).lower(
                           abstract.params, abstract.rng, abstract_batch
                       ).compile()
  seconds = time.perf_counter() - t0
  logging.info("compiled init/train/eval steps in %.1f s", seconds)
  return Trainer(model_cfg=model_cfg, graphdef=graphdef,
                 quant_table=dict(abstract_model.quant_table), mesh=mesh,
                 state_shardings=state_sh, abstract_state=abstract,
                 batch_sharding=batch_sh, init=init_c, train_step=train_c,
                 eval_step=eval_c, compile_seconds=seconds,
                 telemetry_step=tele_c, train_step_hlo=train_l.as_text(),
                 train_compile_seconds=train_seconds)
