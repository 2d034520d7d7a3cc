"""Tests for fp4jax.sharding on 8 fake CPU devices (see conftest.py)."""

import dataclasses
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from fp4jax import llama
from fp4jax import sharding
from fp4jax import sizes

GOLDEN = pathlib.Path(__file__).parent / "testdata" / "sharding_tiny.json"
# f32 compute: the sharded forward differs from the 1-device one only in the
# order of f32 partial sums across shards (FSDP splits the contraction dim),
# a few ulps of O(1) logits.
SHARDED_ATOL = 2e-5

TINY_F32 = dataclasses.replace(sizes.get_config("tiny"),
                               compute_dtype="float32")


def abstract_params(cfg):
  model = nnx.eval_shape(lambda: llama.Llama(cfg, rngs=nnx.Rngs(0)))
  return nnx.state(model, nnx.Param)


def spec_list(spec, ndim):
  """PartitionSpec -> JSON-able list of length ndim (tuples -> lists)."""
  entries = list(spec) + [None] * (ndim - len(spec))
  return [list(e) if isinstance(e, tuple) else e for e in entries]


def test_make_mesh_default_uses_all_devices():
  assert jax.device_count() == 8
  mesh = sharding.make_mesh()
  assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  assert mesh.axis_types == (jax.sharding.AxisType.Auto,) * 3


@pytest.mark.parametrize("kw,want", [
    (dict(data=2, fsdp=2, tensor=2), (2, 2, 2)),
    (dict(data=-1, fsdp=2, tensor=1), (4, 2, 1)),
    (dict(data=1, fsdp=-1, tensor=2), (1, 4, 2)),
])
def test_make_mesh_shapes(kw, want):
  mesh = sharding.make_mesh(**kw)
  assert tuple(mesh.shape.values()) == want
  assert mesh.axis_names == sharding.MESH_AXES


def test_make_mesh_one_device():
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  assert mesh.size == 1


@pytest.mark.parametrize("kw,field", [
    (dict(data=-1, fsdp=3), "mesh.fsdp"),       # 3 does not divide 8
    (dict(data=3, fsdp=1, tensor=1), "mesh.data"),  # product 3 != 8
    (dict(data=-1, fsdp=-1), "mesh.data"),      # two free axes
    (dict(data=0), "mesh.data"),
    (dict(data=2, tensor=2.0), "mesh.tensor"),
])
def test_bad_mesh(kw, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    sharding.make_mesh(**kw)


def test_logical_to_spec():
  assert sharding.logical_to_spec(("embed", "mlp")) == P("fsdp", "tensor")
  assert sharding.logical_to_spec(("act_batch", "act_seq", None)) == P(
      ("data", "fsdp"), None, None)
  with pytest.raises(ValueError, match="'nope'"):
    sharding.logical_to_spec(("nope",))
  with pytest.raises(ValueError, match="twice"):
    sharding.logical_to_spec(("mlp", "heads"))


def test_param_specs_match_golden():
  golden = json.loads(GOLDEN.read_text())
  mesh = sharding.make_mesh(**golden["mesh"])
  state = abstract_params(sizes.get_config(golden["size"]))
  specs = sharding.flat_specs(state)
  named = jax.tree.leaves(sharding.state_shardings(state, mesh))
  shapes = [x.shape for x in jax.tree.leaves(state)]
  got = {}
  for path, sh, shape in zip(specs, named, shapes):
    assert sh.mesh == mesh and sh.spec == specs[path], path
    got[path] = spec_list(sh.spec, len(shape))
  assert got == golden["specs"], json.dumps(got, indent=2)
  sharding.check_divisible(state, mesh)


def test_check_divisible_names_param_and_dim():
  cfg = dataclasses.replace(sizes.get_config("tiny"), d_ff=100)
  mesh = sharding.make_mesh(data=1, fsdp=1, tensor=8)
  with pytest.raises(ValueError,
                     match=r"layers\.0\.mlp\.down_proj\.kernel dim 0"):
    sharding.check_divisible(abstract_params(cfg), mesh)


def test_batch_sharding_and_constrain_without_mesh():
  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  assert sharding.batch_sharding(mesh).spec == P(("data", "fsdp"), None)
  x = jnp.ones((4, 3))
  assert sharding.constrain(x, ("act_batch", "act_embed")) is x


def n_constraints(hlo_text):
  # Shardy spells it sdy.sharding_constraint, GSPMD a @Sharding custom call.
  return hlo_text.count("sharding_constraint") + hlo_text.count("@Sharding")


@pytest.fixture(scope="module")
def tiny_model():
  return llama.Llama(TINY_F32, rngs=nnx.Rngs(0))


def test_sharded_forward_equals_single_device(tiny_model):
  tokens = jax.random.randint(jax.random.key(1), (4, 16), 0,
                              TINY_F32.vocab_size, dtype=jnp.int32)
  graphdef, state = nnx.split(tiny_model)

  def fwd(state, tokens):
    return nnx.merge(graphdef, state)(tokens)

  one = sharding.make_mesh(devices=jax.devices()[:1])
  with sharding.use_mesh(one):
    want = np.asarray(jax.jit(fwd)(state, tokens))

  mesh = sharding.make_mesh(data=2, fsdp=2, tensor=2)
  state_sh = sharding.state_shardings(state, mesh)
  batch_sh = sharding.batch_sharding(mesh)
  placed = jax.device_put(state, state_sh)
  q = placed["layers"][0]["attn"]["q_proj"]["kernel"][...]
  assert q.sharding.shard_shape(q.shape) == (32, 32)  # fsdp x tensor
  with sharding.use_mesh(mesh):
    step = jax.jit(fwd, in_shardings=(state_sh, batch_sh))
    got = step(placed, jax.device_put(tokens, batch_sh))
    # The block-boundary constraint shards the batch over data x fsdp.
    hlo = step.lower(placed, tokens).as_text()
  # Embedding output plus two residual points per block, at least.
  assert n_constraints(hlo) >= 1 + 2 * TINY_F32.n_layers
  assert n_constraints(jax.jit(fwd).lower(state, tokens).as_text()) == 0
  np.testing.assert_allclose(np.asarray(got), want, atol=SHARDED_ATOL, rtol=0)


GOLDEN_STATE = (pathlib.Path(__file__).parent / "testdata" /
                "sharding_125m_state.json")


def _state_specs(size: str, mesh_shape: dict[str, int]) -> dict[str, list]:
  """PartitionSpec of every TrainState leaf (params + paper-moment Adam)."""
  from fp4jax import optim, train_state  # pylint: disable=g-import-not-at-top
  cfg = sizes.get_config(size)
  ocfg = optim.OptimConfig(moments="paper")
  tx = optim.make_optimizer(ocfg, 100)

  def init():
    params = optim.cast_master(
        nnx.state(llama.Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param), ocfg)
    return train_state.TrainState(
        step=jnp.int32(0), params=params, opt_state=tx.init(params),
        rng=jax.random.key(0), skipped=jnp.int32(0))

  abstract = jax.eval_shape(init)
  mesh = sharding.make_mesh(**mesh_shape)
  shardings = sharding.state_shardings(abstract, mesh)
  flat = jax.tree_util.tree_flatten_with_path(abstract)[0]
  out = {}
  for (path, leaf), sh in zip(flat, jax.tree.leaves(shardings)):
    out[jax.tree_util.keystr(path)] = spec_list(sh.spec, len(leaf.shape))
  return out


def test_125m_state_specs_match_golden():
  # Every parameter and optimizer leaf of the 125m model on a (data 2,
  # fsdp 2, tensor 2) mesh: a change of the logical rules shows here.
  golden = json.loads(GOLDEN_STATE.read_text())
  got = _state_specs(golden["size"], golden["mesh"])
  assert got == golden["specs"], json.dumps(
      {k: v for k, v in got.items() if golden["specs"].get(k) != v},
      indent=1)[:2000]
