"""The target platform decides the program, not the process's backend.

Lowered for CUDA from this CPU process (`lowering_platforms=("cuda",)`, no
GPU plugin needed), under the GPU target the quantized matmul is the GPU
program: its grid GEMMs are FP8 dot_generals with f32 accumulation; under
the CPU target (the default here) the same code is the f32 reference. The
StableHLO text is the oracle: what the program asks XLA for.
"""

import re

import dataclasses
import jax
import jax.numpy as jnp
import pytest

from fp4jax import backend
from fp4jax import qconfig
from fp4jax import qdot
from fp4jax import sharding

M, K, N = 64, 128, 96


def _hlo(recipe, platform: str, grads: bool = True,
         execution: qconfig.Execution | None = None) -> str:
  """StableHLO of qmatmul's forward (and both gradients) for CUDA."""
  def f(x, w):
    return qdot.qmatmul(x, w, recipe, key=jax.random.key(0),
                        execution=execution).astype(jnp.float32).sum()

  fn = jax.grad(f, argnums=(0, 1)) if grads else f
  x = jax.ShapeDtypeStruct((M, K), jnp.bfloat16)
  w = jax.ShapeDtypeStruct((K, N), jnp.float32)
  with backend.targeting(platform):
    return jax.jit(fn).trace(x, w).lower(
        lowering_platforms=("cuda",)).as_text()


def _dots(text: str) -> list[str]:
  """The operand element types of every dot_general without batch dims
  (the projections' and lm_head's GEMMs; attention's are batched), e.g.
  'f8E4M3FN x f8E4M3FN -> f32'."""
  out = []
  for line in text.splitlines():
    if "stablehlo.dot_general" not in line or "batching_dims" in line:
      continue
    sig = line.rsplit(":", 1)[1]
    types = [t.split("x")[-1] for t in re.findall(r"tensor<([^>]*)>", sig)]
    out.append(f"{types[0]} x {types[1]} -> {types[-1]}")
  return out


def test_target_defaults_to_the_process_backend_and_nests():
  assert backend.target() == backend.normalize(jax.default_backend())
  with backend.targeting("cuda"):
    assert backend.target() == "gpu"
    with backend.targeting("cpu"):
      assert backend.target() == "cpu"
    with backend.targeting(None):
      assert backend.target() == "gpu"
    assert backend.target() == "gpu"
  assert backend.target() == "cpu"
  with pytest.raises(ValueError, match="unknown platform 'metal'"):
    backend.normalize("metal")


def test_a_mesh_context_targets_its_devices():
  mesh = sharding.make_mesh(devices=jax.devices()[:2])
  assert backend.of_devices(mesh) == "cpu"
  with backend.targeting("gpu"):
    with sharding.use_mesh(mesh):
      assert backend.target() == "cpu"
    assert backend.target() == "gpu"


def test_the_gpu_target_lowers_fp8_grid_gemms_with_f32_accumulation():
  recipe = qconfig.get_recipe("fp4_paper")
  xla = qconfig.Execution(impl="xla")
  gpu = _dots(_hlo(recipe, "gpu", grads=False, execution=xla))
  assert "f8E4M3FN x f8E4M3FN -> f32" in gpu, gpu
  cpu = _dots(_hlo(recipe, "cpu", grads=False, execution=xla))
  # On the CPU target FP8 dots carry no GPU algorithm (f32 accumulation is
  # what CPU FP8 dots do anyway); the grid GEMM is still the FP8 one.
  assert "f8E4M3FN x f8E4M3FN -> f32" in cpu, cpu
  # The GPU target asks for f32 accumulation explicitly (Execution
  # accumulation "fp32"; cuBLASLt's default for FP8 is its fast mode).
  assert xla.accumulation == "fp32"
  fp8 = "lhs_precision_type = f8E4M3FN, rhs_precision_type = f8E4M3FN, "
  fp8 += "accumulation_type = f32"
  assert fp8 in _hlo(recipe, "gpu", grads=False, execution=xla)
  assert "accumulation_type" not in _hlo(recipe, "cpu", grads=False,
                                         execution=xla)


def test_impl_auto_is_the_fast_program_on_the_gpu_target():
  recipe = qconfig.get_recipe("fp4_paper")
  assert qconfig.Execution().impl == "auto"
  gpu = _dots(_hlo(recipe, "gpu"))
  cpu = _dots(_hlo(recipe, "cpu"))
  # auto = "fast" (bf16 GEMMs) for a GPU, "reference" (f32) for the CPU.
  assert any(d.startswith("bf16 x bf16") for d in gpu), gpu
  assert not any("f32 x f32" in d for d in gpu), gpu
  assert all(d.startswith("f32 x f32") for d in cpu), cpu


def test_no_sort_in_the_gpu_programs_top_k():
  # OCC's quantile: the GPU target takes an unstable top_k (a TopK custom
  # call on XLA:GPU) or bisection, never a full sort.
  text = _hlo(qconfig.get_recipe("fp4_paper"), "gpu")
  assert "stablehlo.sort" not in text


def _train_step_hlo(recipe: str, impl: str, **fields) -> str:
  """StableHLO of a 1-layer tiny train step lowered for CUDA under the
  GPU target (XLA attention: cuDNN's needs the GPU plugin to trace)."""
  from fp4jax import optim, sizes, train_state  # pylint: disable=g-import-not-at-top
  cfg = dataclasses.replace(sizes.get_config("tiny"), n_layers=1,
                            attention="xla", compute_dtype="bfloat16",
                            gemm=qconfig.Execution(impl=impl, **fields))
  rules = qconfig.default_rules(recipe)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  return train_state.lower_train_step(
      cfg, rules, optim.OptimConfig(), num_steps=10, mesh=mesh,
      global_batch=2, seq_len=16, platform="cuda").as_text()


@pytest.mark.parametrize("recipe,impl,fp8_gemms", [
    # 7 projections: the forward GEMM on FP8 grid values only (the paper's
    # simulation: BF16 backward).
    ("fp4_paper", "fp8", 7),
    # "xla" adds the backward GEMMs where the scales factor out: fp4_paper's
    # per-token X / per-channel W factor out of the forward only.
    ("fp4_paper", "xla", 7),
    # The fp8 recipe's per-tensor scales factor out of all three GEMMs.
    ("fp8", "xla", 21),
    ("fp8", "fp8", 7),
    ("bf16", "auto", 0),
])
def test_a_train_step_for_cuda_has_its_fp8_projection_gemms(
    recipe, impl, fp8_gemms):
  dots = _dots(_train_step_hlo(recipe, impl))
  fp8 = [d for d in dots if d.startswith("f8")]
  assert len(fp8) == fp8_gemms, dots
  assert all(d.endswith("-> f32") for d in fp8), fp8
  # Nothing on the GPU target runs an f32 x f32 projection GEMM outside
  # the reference impl. (XLA attention's backward does: its score
  # cotangent is f32; the GPU default is cuDNN's kernel.)
  assert not any(d.startswith("f32 x f32") for d in dots), dots


def test_fast_accumulation_fp8_gemms_write_bf16_where_the_product_goes_out():
  # The fp8 recipe: the forward and dgrad GEMMs write the bf16 the model
  # rounds to anyway (no f32 [M, N] and convert pass; the scales are
  # applied after); the wgrad's product meets the f32 weight gradient.
  dots = _dots(_train_step_hlo("fp8", "xla", accumulation="fast"))
  fp8 = [d for d in dots if d.startswith("f8")]
  assert len(fp8) == 21, dots
  assert sum(d.endswith("-> bf16") for d in fp8) == 14, fp8
  # w4a4_direct: only its forward is FP8 (per-token / per-channel scales
  # lie along the backward contractions) and it writes bf16.
  fp8 = [d for d in _dots(_train_step_hlo("w4a4_direct", "xla",
                                          accumulation="fast"))
         if d.startswith("f8")]
  assert len(fp8) == 7 and all(d.endswith("-> bf16") for d in fp8), fp8
  # Exact simulation (fp32 accumulation), and fp4_paper's forward (the
  # compensation is added to it in f32), keep the f32 product.
  for recipe, fields in (("fp8", {}), ("fp4_paper",
                                       {"accumulation": "fast"})):
    fp8 = [d for d in _dots(_train_step_hlo(recipe, "xla", **fields))
           if d.startswith("f8")]
    assert fp8 and all(d.endswith("-> f32") for d in fp8), (recipe, fp8)
