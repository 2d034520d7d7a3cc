"""fp4jax.hlo_cost on a hand-written compiled module: every figure is
worked out by hand from the shapes below (the oracle), so a parser that
misreads a shape, a contraction, a loop or an attention scope fails."""

import pytest

from fp4jax import hlo_cost

# A module in XLA:GPU's compiled-text form: a Triton FP8 GEMM fusion
# [64,128] x [128,32], a cuBLAS bf16 GEMM [16,8] x [8,4] (lhs contracting
# dim 1), an elementwise fusion on [64,32] f32, a while loop whose body
# holds one [64,32] f32 copy and runs 5 times, and one attention-core
# kernel.
MODULE = """HloModule jit_step, is_scheduled=true

%fused_gemm (p0: f8e4m3fn[64,128], p1: f8e4m3fn[128,32]) -> f32[64,32] {
  %p0 = f8e4m3fn[64,128]{1,0} parameter(0)
  %p1 = f8e4m3fn[128,32]{1,0} parameter(1)
  ROOT %dot.1 = f32[64,32]{1,0} dot(%p0, %p1), lhs_contracting_dims={1}, rhs_contracting_dims={0}
}

%fused_add (q0: f32[64,32]) -> f32[64,32] {
  %q0 = f32[64,32]{1,0} parameter(0)
  ROOT %add.1 = f32[64,32]{1,0} add(%q0, %q0)
}

%body (b0: (s32[], f32[64,32])) -> (s32[], f32[64,32]) {
  %b0 = (s32[], f32[64,32]{1,0}) parameter(0)
  %gte.1 = f32[64,32]{1,0} get-tuple-element(%b0), index=1
  %copy.1 = f32[64,32]{1,0} copy(%gte.1)
  %gte.0 = s32[] get-tuple-element(%b0), index=0
  ROOT %t = (s32[], f32[64,32]{1,0}) tuple(%gte.0, %copy.1)
}

%cond (c0: (s32[], f32[64,32])) -> pred[] {
  %c0 = (s32[], f32[64,32]{1,0}) parameter(0)
  ROOT %c = pred[] constant(true)
}

ENTRY %main (a: f8e4m3fn[64,128], b: f8e4m3fn[128,32], x: bf16[16,8], y: bf16[8,4], s: bf16[2,4,4]) -> f32[64,32] {
  %a = f8e4m3fn[64,128]{1,0} parameter(0)
  %b = f8e4m3fn[128,32]{1,0} parameter(1)
  %x = bf16[16,8]{1,0} parameter(2)
  %y = bf16[8,4]{1,0} parameter(3)
  %s = bf16[2,4,4]{2,1,0} parameter(4)
  %gemm = f32[64,32]{1,0} fusion(%a, %b), kind=kCustom, calls=%fused_gemm, metadata={op_name="jit(step)/jvp()/dot_general"}, backend_config={"fusion_backend_config":{"kind":"__triton_nested_gemm_fusion"}}
  %cublas = (bf16[16,4]{1,0}, s8[1024]{0}) custom-call(%x, %y), custom_call_target="__cublas$gemm", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"]}}}
  %sum = f32[64,32]{1,0} fusion(%gemm), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/jvp()/add"}
  %soft = bf16[2,4,4]{2,1,0} fusion(%s), kind=kLoop, calls=%fused_add, metadata={op_name="jit(step)/transpose(jvp(attention_core))/exp"}
  %init = s32[] constant(0)
  %tup = (s32[], f32[64,32]{1,0}) tuple(%init, %sum)
  %loop = (s32[], f32[64,32]{1,0}) while(%tup), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"5"}}
  ROOT %out = f32[64,32]{1,0} get-tuple-element(%loop), index=1
}
"""


@pytest.fixture(scope="module")
def kernels():
  return {k.name: k for k in hlo_cost.kernels(MODULE)}


def test_gemms_have_their_flops_and_operand_types(kernels):
  g = kernels["gemm"]
  assert (g.kind, g.flops, g.operands) == (
      "gemm", 2 * 64 * 32 * 128, ("f8e4m3fn", "f8e4m3fn"))
  assert g.gemm_class() == "fp8"
  assert g.bytes == 64 * 128 + 128 * 32 + 64 * 32 * 4
  c = kernels["cublas"]
  assert (c.kind, c.flops, c.gemm_class()) == ("gemm", 2 * 16 * 4 * 8,
                                               "bf16")


def test_other_kernels_loops_and_attention(kernels):
  assert set(kernels) == {"gemm", "cublas", "sum", "soft", "copy.1"}
  s = kernels["sum"]
  assert (s.kind, s.bytes, s.count) == ("other", 2 * 64 * 32 * 4, 1)
  loop = kernels["copy.1"]   # the while body's kernel, 5 trips
  assert (loop.kind, loop.count, loop.bytes) == ("other", 5, 2 * 64 * 32 * 4)
  assert kernels["soft"].kind == "attention"


def test_summary_and_roofline(kernels):
  gpu = hlo_cost.GPUS["h200"]
  model = hlo_cost.Model(gemm_efficiency=0.5, memory_efficiency=1.0,
                         launch_seconds=0.0)
  s = hlo_cost.summarize(kernels.values(), gpu, model)
  assert s["launches"] == 4 + 5
  assert s["gemm_flops_fp8"] == 2 * 64 * 32 * 128
  assert s["gemm_flops_bf16"] == 2 * 16 * 4 * 8
  assert s["other_bytes"] == 2 * 64 * 32 * 4 * 6
  g = kernels["gemm"]
  want = max(g.flops / (gpu.flops["fp8"] * 0.5), g.bytes / gpu.hbm)
  assert hlo_cost.kernel_seconds(g, gpu, model) == pytest.approx(want)
