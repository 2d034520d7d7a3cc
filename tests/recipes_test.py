"""The other papers' FP4 recipes and their pieces against float64 numpy:
the random Hadamard transform, 16x16 weight tiles, stochastic rounding of
NVFP4 / MXFP4 gradients, QuEST and round-up E8M0 scales, the BF16 tail rule
set, and each recipe's GEMMs end to end."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp4jax import hadamard
from fp4jax import llama
from fp4jax import numerics
from fp4jax import qconfig
from fp4jax import qdot
from fp4jax import quant
from fp4jax.qconfig import TensorQuant
import np_ref

# float32 matmuls of O(1) values over 16-64 terms against float64: a few
# ulps of the sums.
F32_RTOL = 1e-5
NEW = ("nvfp4_nvidia", "mxfp4_tseng", "quartet")
_NV = dict(fmt="e2m1", block=16, scale="e4m3_tensor")
_MX = dict(fmt="e2m1", block=32, scale="e8m0", rounding="rne")


def _rand(shape, seed):
  return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# ------------------------------------------------------------- Hadamard
@pytest.mark.parametrize("b", [2, 16, 32])
def test_rotation_is_an_orthonormal_signed_hadamard(b):
  r = hadamard.rotation(b)
  np.testing.assert_allclose(r @ r.T, np.eye(b), atol=1e-12)
  np.testing.assert_allclose(np.abs(r), 1 / np.sqrt(b), rtol=1e-12)
  # diag(s) H: rows are the Hadamard rows times one sign each, so the
  # columns after undoing the signs are mutually orthogonal +-1 vectors
  # whose first one is constant (Sylvester's construction).
  h = r * np.sqrt(b) * r[:, :1] * np.sqrt(b)
  assert np.all(h[:, 0] == 1)
  with pytest.raises(ValueError, match="power of two"):
    hadamard.rotation(12)


def test_rotate_is_blockwise_along_the_axis_and_inverts():
  x = _rand((32, 6), 0)
  got = np.asarray(hadamard.rotate(jnp.asarray(x), 16, axis=0), np.float64)
  r = hadamard.rotation(16)
  blocks = np.kron(np.eye(2), r)          # block-diagonal, 2 blocks of 16
  want = blocks.T @ x.astype(np.float64)  # x R along axis 0 = R^T x
  np.testing.assert_allclose(got, want, rtol=F32_RTOL, atol=1e-6)
  back = hadamard.rotate(hadamard.rotate(jnp.asarray(x), 16, 0), 16, 0,
                         inverse=True)
  np.testing.assert_allclose(np.asarray(back), x, atol=1e-6)
  with pytest.raises(ValueError, match="does not divide"):
    hadamard.rotate(jnp.asarray(x), 16, axis=1)


def test_rotating_both_wgrad_operands_along_tokens_keeps_x_t_g():
  # wgrad = (H X)^T (H G) = X^T G before quantization.
  x, g = _rand((64, 24), 1), _rand((64, 8), 2)
  xr = np.asarray(hadamard.rotate(jnp.asarray(x), 16, 0), np.float64)
  gr = np.asarray(hadamard.rotate(jnp.asarray(g), 16, 0), np.float64)
  want = x.astype(np.float64).T @ g.astype(np.float64)
  np.testing.assert_allclose(xr.T @ gr, want, rtol=F32_RTOL, atol=1e-4)
  # ... and only along the contracted axis: rotating the other one does not.
  xk = np.asarray(hadamard.rotate(jnp.asarray(x), 8, 1), np.float64)
  assert np.abs(xk.T @ g - want).max() > 0.1


# ------------------------------------------------------ block scales
def test_2d_tiles_quantize_w_and_w_transposed_identically():
  w = _rand((64, 32), 3) * np.exp(_rand((64, 32), 4))   # uneven magnitudes
  q = TensorQuant(axis=0, rounding="rne", block_2d=True, **_NV)
  a = quant.quantize(jnp.asarray(w), q)
  b = quant.quantize(jnp.asarray(w.T), q)
  np.testing.assert_array_equal(np.asarray(a.values).T, np.asarray(b.values))
  np.testing.assert_array_equal(np.asarray(a.scale).T, np.asarray(b.scale))
  # One scale per 16x16 tile, from that tile's amax (numpy): the decode
  # scale amax/6 in E4M3 relative to the tensor scale.
  sf = np.asarray(a.scale)
  tiles = np.abs(w).reshape(4, 16, 2, 16).max(axis=(1, 3))
  for i in range(4):
    for j in range(2):
      t = sf[16 * i:16 * i + 16, 16 * j:16 * j + 16]
      assert np.all(t == t[0, 0])
  order = np.argsort(tiles.ravel())
  assert np.all(np.diff(sf[::16, ::16].ravel()[order]) <= 0)  # bigger amax, smaller sf
  # 1-D blocks of W (along K) differ from W^T's (along N): the tiles matter.
  q1 = TensorQuant(axis=0, rounding="rne", **_NV)
  one = quant.quantize(jnp.asarray(w), q1).values
  other = quant.quantize(jnp.asarray(w.T), q1).values
  assert not np.array_equal(np.asarray(one).T, np.asarray(other))


@pytest.mark.parametrize("spec", [
    TensorQuant(axis=1, rounding="stochastic", **_NV),
    TensorQuant(axis=0, **dict(_MX, rounding="stochastic"), scale_mult=0.75),
])
def test_gradient_stochastic_rounding_is_unbiased_neighbours(spec):
  g = jnp.asarray(_rand((32, 32), 5))
  n = 400
  keys = jax.random.split(jax.random.key(0), n)
  qs = jax.vmap(lambda k: quant.quantize(g, spec, k))(keys)
  sf = np.asarray(qs.scale[0])
  assert np.all(np.asarray(qs.scale) == sf)   # the scale is not random
  vals = np.asarray(qs.values, np.float64)
  scaled = np.asarray(g, np.float64) * sf
  grid = np.concatenate([-np.array([6, 4, 3, 2, 1.5, 1, .5])[::-1] * -1,
                         [0., .5, 1, 1.5, 2, 3, 4, 6]])
  grid = np.unique(np.concatenate([grid, -grid]))
  lo = grid[np.clip(np.searchsorted(grid, scaled, "right") - 1, 0, None)]
  hi = grid[np.clip(np.searchsorted(grid, scaled, "left"), None,
                    len(grid) - 1)]
  assert np.all((vals == lo) | (vals == hi))     # always a neighbour
  # CLT: the mean of n draws is within 5 standard errors of the input
  # (std of one draw <= half the gap).
  inside = np.abs(scaled) <= 6
  se = (hi - lo) / 2 / np.sqrt(n)
  err = np.abs(vals.mean(0) - scaled)
  assert np.all(err[inside] <= 5 * se[inside] + 1e-6)
  assert np.count_nonzero(hi != lo) > 0.9 * g.size   # really random


def test_quest_and_round_up_scales_against_numpy():
  x = _rand((4, 64), 6)
  quest = TensorQuant(axis=1, scale_rule="quest", **_MX)
  sf = np.asarray(quant.compute_scale(jnp.asarray(x), quest))
  blocks = x.astype(np.float64).reshape(4, 2, 32)
  want = 2.0 ** np.floor(np.log2(blocks.std(-1) * 2.92247856 / 6))
  np.testing.assert_allclose(1 / sf[:, ::32], want.reshape(4, 2), rtol=1e-6)
  up = TensorQuant(axis=1, **dict(_MX, scale="e8m0_up"))
  sf = np.asarray(quant.compute_scale(jnp.asarray(x), up))
  amax = np.abs(blocks).max(-1).reshape(4, 2)
  want = 2.0 ** np.ceil(np.log2(amax / 6))
  np.testing.assert_allclose(1 / sf[:, ::32], want, rtol=1e-6)
  assert np.all(np.abs(x) * sf <= 6)     # nothing saturates
  ocp = TensorQuant(axis=1, **_MX)
  assert np.any(np.abs(x) * np.asarray(quant.compute_scale(
      jnp.asarray(x), ocp)) > 6)          # OCP's floor does saturate
  # Rounding the exponent up is an E8M0 rule: refused on E4M3 scales, as
  # a scale format and as the earlier operand flag.
  with pytest.raises(ValueError, match="round_up"):
    numerics.ScaleFormat("e4m3", round_up=True, tensor_scale=True)
  with pytest.raises(ValueError, match="e8m0_round_up"):
    qconfig.get_recipe("nvfp4", x__e8m0_round_up=True)


# --------------------------------------------------------- BF16 tail
@pytest.mark.parametrize("n,share,want", [
    (4, 0.16, (3,)), (62, 0.16, tuple(range(52, 62))), (10, 0.25, (7, 8, 9)),
    (4, 0.0, ()), (4, 0.1, ()), (2, 0.9, (0, 1))])
def test_bf16_tail_picks_the_last_blocks(n, share, want):
  assert qconfig.bf16_tail_blocks(n, share) == want


def test_bf16_tail_rules_keep_exactly_those_blocks_plain():
  cfg = llama.LlamaConfig(64, 32, 4, 2, 2, 64, 16)
  paths = llama.projection_paths(cfg)
  table = qconfig.resolve_rules(paths, qconfig.default_rules(
      "nvfp4_nvidia", cfg.n_layers))
  plain = {p for p, r in table.items() if r is None and p != "lm_head"}
  assert plain == {p for p in paths if p.startswith("layers.3.")}
  assert len(plain) == 7      # q k v o gate up down of the last block
  with pytest.raises(ValueError, match="needs n_layers"):
    qconfig.default_rules("nvfp4_nvidia")
  off = qconfig.default_rules("nvfp4_nvidia", 4, bf16_tail=0.0)
  assert len(off) == 1
  # The tail is a layer rule, not part of the recipe.
  with pytest.raises(ValueError, match="bf16_tail"):
    qconfig.get_recipe("nvfp4_nvidia", bf16_tail=0.0)


# ------------------------------------------------------------ recipes
def _exact(x, w, g):
  x, w, g = (np.asarray(a, np.float64) for a in (x, w, g))
  return x @ w, g @ w.T, x.T @ g


def _run(recipe, x, w, g, key):
  f = lambda x, w: jnp.sum(qdot.qmatmul(x, w, recipe, key) * g)
  dx, dw = jax.grad(f, argnums=(0, 1))(x, w)
  return qdot.qmatmul(x, w, recipe, key), dx, dw


def _rel(a, b):
  return float(np.linalg.norm(np.asarray(a, np.float64) - b)
               / np.linalg.norm(b))


# Loose FP4 sanity bounds on relative Frobenius error vs the exact product
# (4-bit elements, 16-32 element blocks, 64-term sums): quantization must
# happen (> 1%) and stay an approximation (< 25%); qdot_test sets the same.
FP4_REL_ERR_MIN, FP4_REL_ERR_MAX = 1e-2, 0.25
# Quartet's backward re-quantizes the forward's QuEST-quantized X and W
# (its released code), which are themselves ~23% from X and W (y's error
# here: the E8M0 floor clips at 1.46-2.92 std); its gradients carry that
# plus their own rounding (measured 0.27-0.29 on three seeds).
QUARTET_GRAD_REL_ERR_MAX = 0.35


@pytest.mark.parametrize("name", NEW)
def test_new_recipes_quantize_all_three_gemms(name):
  x, w, g = _rand((64, 64), 7), _rand((64, 32), 8) * 0.1, _rand((64, 32), 9)
  # Quartet's trust mask zeroes the gradient of every entry its QuEST scale
  # saturates; with the E8M0 floor that is |x| beyond 1.46-2.92 std, ~10%
  # of Gaussian entries, so dx is off by ~sqrt(0.1) by design (the mask
  # has its own test below): compared here without it.
  over = {"clip_mask": False} if name == "quartet" else {}
  got = _run(qdot.get_recipe(name, **over),
             *(jnp.asarray(a) for a in (x, w, g)), jax.random.key(1))
  for a, b, what in zip(got, _exact(x, w, g), ("y", "dx", "dw")):
    err = _rel(a, b)
    top = (QUARTET_GRAD_REL_ERR_MAX if name == "quartet" and what != "y"
           else FP4_REL_ERR_MAX)
    assert FP4_REL_ERR_MIN < err < top, (name, what, err)


@pytest.mark.parametrize("name,piece", [
    ("nvfp4_nvidia", {"rht_wgrad": 0}), ("nvfp4_nvidia", {"weight_2d": False}),
    ("nvfp4_nvidia", {"grad_sr": False}), ("mxfp4_tseng", {"rht_dgrad": 0}),
    ("mxfp4_tseng", {"e8m0_round_up": True}), ("quartet", {"rht_fwd": 0}),
    ("quartet", {"clip_mask": False})])
def test_each_piece_switches_and_changes_the_result(name, piece):
  x, w, g = _rand((64, 64), 10), _rand((64, 32), 11) * 0.1, _rand((64, 32), 12)
  # Heavy outliers so that clipping and rotations matter.
  x[:, 3] *= 30.
  args = [jnp.asarray(a) for a in (x, w, g)]
  key = jax.random.key(2)
  base = _run(qdot.get_recipe(name), *args, key)
  other = _run(qdot.get_recipe(name, **piece), *args, key)
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(base, other))


def test_quartet_trust_mask_zeroes_saturated_entries():
  # A huge entry saturates under QuEST's std-based scale: its gradient is 0.
  x = _rand((32, 32), 13)
  x[0, 5] = 80.
  w, g = _rand((32, 32), 14) * 0.1, _rand((32, 32), 15)
  r = qdot.get_recipe("quartet", rht_fwd=0)   # mask in the unrotated space
  _, dx, _ = _run(r, jnp.asarray(x), jnp.asarray(w), jnp.asarray(g),
                  jax.random.key(3))
  assert float(dx[0, 5]) == 0.0
  assert np.count_nonzero(np.asarray(dx)) > 0.8 * dx.size


# ------------------------------------------- Quartet's backward (oracle)
def _rot64(a, axis, inverse=False, b=32):
  """float64: every b-run along `axis` times R (R^T if inverse)."""
  r = hadamard.rotation(b)
  m = np.moveaxis(a, axis, -1)
  out = (m.reshape(*m.shape[:-1], -1, b) @ (r.T if inverse else r))
  return np.moveaxis(out.reshape(m.shape), -1, axis)


def _blockwise(a, axis, fn, b=32):
  """fn on [..., blocks, b] runs along `axis`, reassembled to a's shape."""
  m = np.moveaxis(a, axis, -1)
  out = fn(m.reshape(*m.shape[:-1], -1, b))
  return np.moveaxis(out.reshape(m.shape), -1, axis)


def _quest64(a, axis):
  """QuEST MXFP4 along `axis`: decode 2**floor(log2(2.92 std / 6)) per
  32-block, RNE; returns (dequantized, trust mask |a / decode| <= 6)."""
  def dec(bl):
    c = bl.std(-1, keepdims=True) * quant.QUEST_CLIP
    return np.broadcast_to(2.0 ** np.floor(np.log2(c / 6)), bl.shape)
  d = _blockwise(a, axis, dec)
  return np_ref.round_rne(a / d, "e2m1") * d, np.abs(a / d) <= 6


def _mx_pre34(a, axis):
  """OCP MXFP4 along `axis` with the 3/4 pre-scale, RNE, dequantized."""
  def dec(bl):
    amax = np.abs(bl).max(-1, keepdims=True)
    return np.broadcast_to(2.0 ** (np.floor(np.log2(amax)) - 2) / 0.75,
                           bl.shape)
  d = _blockwise(a, axis, dec)
  return np_ref.round_rne(a / d, "e2m1") * d


def _quartet64(x, w, g, from_quantized):
  """Quartet's GEMMs in float64 with RNE in place of stochastic rounding:
  X and W rotated along K and QuEST-quantized; dgrad and wgrad rotate
  along N / M and re-quantize G and the forward's quantized W and X
  (from_quantized, the released code) or the unquantized rotated ones;
  the trust masks zero the gradients of saturated entries; gradients are
  rotated back."""
  xr, wr = _rot64(x, 1), _rot64(w, 0)
  (xq, mask_x), (wq, mask_w) = _quest64(xr, 1), _quest64(wr, 0)
  xs, ws = (xq, wq) if from_quantized else (xr, wr)
  dx = _mx_pre34(_rot64(g, 1), 1) @ _mx_pre34(_rot64(ws, 1), 1).T
  dw = _mx_pre34(_rot64(xs, 0), 0).T @ _mx_pre34(_rot64(g, 0), 0)
  return (xq @ wq, _rot64(np.where(mask_x, dx, 0), 1, inverse=True),
          _rot64(np.where(mask_w, dw, 0), 0, inverse=True))


# The two backward sources differ by ~22% (relative Frobenius) on this data;
# anything above this is a wrong source, not rounding.
QUARTET_SOURCE_GAP = 0.1


@pytest.mark.parametrize("from_quantized", [True, False])
def test_quartet_backward_requantizes_what_its_released_code_does(
    from_quantized):
  # RNE everywhere makes every rounding decision deterministic; with this
  # data none of the f32 code's decisions differs from float64's (a value
  # within f32 rounding of a midpoint would show as a ~1e-3 error), so what
  # remains is f32 accumulation: F32_RTOL.
  x, w, g = _rand((64, 64), 16), _rand((64, 64), 17) * 0.1, _rand((64, 64),
                                                                   18)
  r = qdot.get_recipe("quartet", rounding="rne")
  if not from_quantized:
    r = qdot.get_recipe(r, requant_quantized=False)
  got = _run(r, *(jnp.asarray(a) for a in (x, w, g)), None)
  x, w, g = (a.astype(np.float64) for a in (x, w, g))
  want = _quartet64(x, w, g, from_quantized)
  other = _quartet64(x, w, g, not from_quantized)
  for a, b, c, what in zip(got, want, other, ("y", "dx", "dw")):
    assert _rel(a, b) < F32_RTOL, (what, _rel(a, b))
    if what != "y":
      assert _rel(c, b) > QUARTET_SOURCE_GAP, (what, _rel(c, b))


def test_quartet_default_follows_the_released_code():
  assert qdot.get_recipe("quartet").requant_from == "quantized"
  with pytest.raises(ValueError, match="hw_faithful"):
    qdot.get_recipe("nvfp4", hw_faithful=False, requant_quantized=True)


def test_readme_recipe_table_lists_every_named_recipe():
  import pathlib   # pylint: disable=g-import-not-at-top
  text = (pathlib.Path(__file__).parents[1] / "README.md").read_text()
  rows = set(re.findall(r"^\| `([a-z0-9_]+)` \|", text, re.M))
  assert set(qconfig.RECIPES) <= rows, set(qconfig.RECIPES) - rows


def test_backward_specs_need_hw_faithful():
  with pytest.raises(ValueError, match="hw_faithful"):
    qdot.get_recipe("mxfp4_tseng", hw_faithful=False)
  with pytest.raises(ValueError, match="(?i)occ"):
    qdot.get_recipe("fp4_paper", rht_fwd=32, dge_k=None)
