"""What a compiled XLA program costs: its kernels read from the HLO text.

Owns: parsing a compiled module's text (`as_text()` of a
`jax.stages.Compiled`) into the kernels it launches (`kernels`), each a
GEMM (FLOPs and operand element types), the attention core (by the
`llama.ATTENTION_SCOPE` name in its metadata) or another kernel (bytes it
reads and writes), and a roofline estimate of their time on a named GPU
(`estimate`, `GPUS`).

The estimate is a model, not a measurement: each GEMM at its operand types'
peak rate times `gemm_efficiency`, every other kernel at the HBM bandwidth
times `memory_efficiency`, plus a fixed launch cost, nothing overlapped.
Bytes of a kernel are its operands' and results' sizes (a fusion reading a
broadcast parameter counts it whole). Loops count their body times the trip
count XLA recorded.

Must not import: jax (the text is all it reads), any fp4jax module.
"""

import dataclasses
import math
import re
from collections.abc import Iterable, Mapping

# Bits per element of HLO element types.
_BITS = {"pred": 8, "s8": 8, "u8": 8, "s16": 16, "u16": 16, "s32": 32,
         "u32": 32, "s64": 64, "u64": 64, "f16": 16, "bf16": 16, "f32": 32,
         "f64": 64, "f8e4m3fn": 8, "f8e5m2": 8, "f8e4m3": 8,
         "f8e4m3fnuz": 8, "f8e5m2fnuz": 8, "f8e8m0fnu": 8, "f4e2m1fn": 4,
         "s4": 4, "u4": 4, "c64": 64, "c128": 128, "token": 0}
# Instructions that launch nothing.
_FREE = {"parameter", "constant", "bitcast", "get-tuple-element", "tuple",
         "after-all", "partition-id", "replica-id", "opt-barrier",
         "add-dependency", "domain"}
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute")
_SHAPE = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEAD = re.compile(r"^(ENTRY\s+)?%([\w\.\-]+)\s.*\{\s*$")
_CUBLAS = re.compile(r'custom_call_target="(__cublas\$[\w\$]+)"')


@dataclasses.dataclass(frozen=True)
class Gpu:
  """Peak rates (FLOP/s, dense) by GEMM operand class, and HBM bytes/s."""
  name: str
  flops: Mapping[str, float]
  hbm: float


GPUS = {
    # NVIDIA datasheet dense peaks (SXM). f32 GEMMs at HIGHEST precision
    # run on CUDA cores; "tf32" is XLA's default precision for f32.
    "h200": Gpu("H200", {"fp8": 1979e12, "bf16": 989e12, "tf32": 494e12,
                         "f32": 67e12}, 4.8e12),
    "h100": Gpu("H100", {"fp8": 1979e12, "bf16": 989e12, "tf32": 494e12,
                         "f32": 67e12}, 3.35e12),
    "b200": Gpu("B200", {"fp4": 9000e12, "fp8": 4500e12, "bf16": 2250e12,
                         "tf32": 1100e12, "f32": 80e12}, 8.0e12),
}


@dataclasses.dataclass
class Kernel:
  """One launched kernel.

  Attributes:
    name: the instruction's name.
    kind: "gemm", "attention", "collective" or "other".
    flops: GEMM FLOPs (2 M N K), 0 otherwise.
    operands: a GEMM's operand element types, e.g. ("f8e4m3fn",
      "f8e4m3fn"); () otherwise.
    bytes: bytes read and written (operands and results).
    count: launches (a loop body's kernels: its trip count).
    op_name: the metadata op_name (jax's name stack).
  """
  name: str
  kind: str
  flops: float
  operands: tuple[str, ...]
  bytes: float
  count: int
  op_name: str

  def gemm_class(self) -> str:
    """The rate class of a GEMM's operand types: fp4, fp8, bf16 or f32."""
    bits = [_BITS.get(t, 32) for t in self.operands]
    if bits and max(bits) <= 4:
      return "fp4"
    if bits and max(bits) <= 8:
      return "fp8"
    if bits and max(bits) <= 16:
      return "bf16"
    return "f32"


def _shapes(text: str) -> list[tuple[str, tuple[int, ...]]]:
  return [(t, tuple(int(d) for d in dims.split(",") if d))
          for t, dims in _SHAPE.findall(text)]


def _nbytes(text: str) -> float:
  return sum(_BITS.get(t, 32) / 8 * math.prod(dims)
             for t, dims in _shapes(text))


@dataclasses.dataclass
class _Instr:
  name: str
  type: str        # the result type text
  op: str
  args: list[str]  # operand instruction names
  rest: str        # attributes after the operand list


def _split_instr(line: str) -> _Instr | None:
  line = line.strip()
  if line.startswith("ROOT "):
    line = line[5:]
  if not line.startswith("%") or " = " not in line:
    return None
  name, rhs = line[1:].split(" = ", 1)
  # The result type: a tuple in parentheses, or one shape.
  if rhs.startswith("("):
    depth = 0
    for i, c in enumerate(rhs):
      depth += (c == "(") - (c == ")")
      if depth == 0:
        break
    rtype, rest = rhs[:i + 1], rhs[i + 1:].lstrip()
  else:
    rtype, _, rest = rhs.partition(" ")
  op, _, rest = rest.partition("(")
  depth, i = 1, 0
  while i < len(rest) and depth:
    depth += (rest[i] == "(") - (rest[i] == ")")
    i += 1
  args = re.findall(r"%([\w\.\-]+)", rest[:i - 1])
  return _Instr(name, rtype, op.strip(), args, rest[i:])


def parse(text: str) -> tuple[dict[str, list[_Instr]], str]:
  """The module's computations (name -> instructions) and its entry's
  name."""
  comps: dict[str, list[_Instr]] = {}
  entry, current = "", None
  for line in text.splitlines():
    head = _HEAD.match(line)
    if head and " = " not in line.split("{")[0]:
      current = head.group(2)
      comps[current] = []
      if head.group(1):
        entry = current
      continue
    if current is not None:
      if line.startswith("}"):
        current = None
        continue
      instr = _split_instr(line)
      if instr is not None:
        comps[current].append(instr)
  return comps, entry


def _dot_cost(instrs: list[_Instr], dot: _Instr
              ) -> tuple[float, tuple[str, ...]]:
  table = {i.name: i for i in instrs}
  out = _shapes(dot.type)
  operands = [table[a] for a in dot.args[:2] if a in table]
  if len(operands) < 2 or not out:
    return 0.0, ()
  lhs = _shapes(operands[0].type)[0]
  m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", dot.rest)
  dims = [int(d) for d in m.group(1).split(",") if d] if m else []
  k = math.prod(lhs[1][d] for d in dims)
  types = tuple(_shapes(o.type)[0][0] for o in operands)
  return 2.0 * math.prod(out[0][1]) * k, types


def _cublas_cost(instrs: list[_Instr], call: _Instr
                 ) -> tuple[float, tuple[str, ...]]:
  table = {i.name: i for i in instrs}
  operands = [table[a] for a in call.args[:2] if a in table]
  out = _shapes(call.type)
  if len(operands) < 2 or not out:
    return 0.0, ()
  lhs = _shapes(operands[0].type)[0]
  m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', call.rest)
  dims = [int(d) for d in re.findall(r"\d+", m.group(1))] if m else []
  k = math.prod(lhs[1][d] for d in dims)
  types = tuple(_shapes(o.type)[0][0] for o in operands)
  return 2.0 * math.prod(out[0][1]) * k, types


def _op_name(instr: _Instr) -> str:
  m = re.search(r'op_name="([^"]*)"', instr.rest)
  return m.group(1) if m else ""


def _trip_count(instr: _Instr) -> int:
  m = re.search(r'"known_trip_count":\{"n":"(\d+)"', instr.rest)
  return int(m.group(1)) if m else 1


def kernels(text: str, attention_scope: str = "attention_core"
            ) -> list[Kernel]:
  """The kernels the entry computation launches, loops unrolled by count.

  Args:
    text: a compiled module's HLO text.
    attention_scope: the name-stack scope of the attention core.
  """
  comps, entry = parse(text)
  out: list[Kernel] = []

  def walk(name: str, count: int) -> None:
    instrs = comps.get(name, [])
    table = {i.name: i for i in instrs}
    for ins in instrs:
      if ins.op in _FREE:
        continue
      if ins.op == "while":
        body = re.search(r"body=%([\w\.\-]+)", ins.rest)
        if body:
          walk(body.group(1), count * _trip_count(ins))
        continue
      nbytes = _nbytes(ins.type) + sum(
          _nbytes(table[a].type) for a in ins.args if a in table)
      op_name = _op_name(ins)
      flops, types, kind = 0.0, (), "other"
      called = re.search(r"calls=%([\w\.\-]+)", ins.rest)
      if ins.op == "fusion" and "kind=kCustom" in ins.rest and called:
        inner = comps.get(called.group(1), [])
        dots = [i for i in inner if i.op in ("dot", "scaled-dot")]
        if dots:
          for d in dots:
            f, t = _dot_cost(inner, d)
            flops += f
            types = types or t
          kind = "gemm"
      elif ins.op == "custom-call" and _CUBLAS.search(ins.rest):
        flops, types = _cublas_cost(instrs, ins)
        kind = "gemm"
      elif ins.op == "dot":
        flops, types = _dot_cost(instrs, ins)
        kind = "gemm"
      elif ins.op.split("-start")[0] in _COLLECTIVES:
        kind = "collective"
      if attention_scope and f"{attention_scope})" in op_name or (
          f"/{attention_scope}/" in op_name):
        kind = "attention"
      out.append(Kernel(ins.name, kind, flops, types, nbytes, count,
                        op_name))

  walk(entry, 1)
  return out


@dataclasses.dataclass(frozen=True)
class Model:
  """The roofline's fudge factors (fitted once, stated with the result)."""
  gemm_efficiency: float = 0.7
  memory_efficiency: float = 0.8
  launch_seconds: float = 4e-6


def kernel_seconds(k: Kernel, gpu: Gpu, model: Model) -> float:
  """One kernel's modelled time (all its launches)."""
  if k.kind in ("gemm", "attention") and k.flops:
    rate = gpu.flops.get(k.gemm_class(), gpu.flops["bf16"])
    t = max(k.flops / (rate * model.gemm_efficiency),
            k.bytes / (gpu.hbm * model.memory_efficiency))
  else:
    t = k.bytes / (gpu.hbm * model.memory_efficiency)
  return k.count * (t + model.launch_seconds)


def summarize(ks: Iterable[Kernel], gpu: Gpu, model: Model
              ) -> dict[str, float]:
  """Totals: GEMM FLOPs by rate class and seconds, attention and other
  seconds and bytes, kernel launches, total seconds."""
  s: dict[str, float] = {"launches": 0, "seconds": 0.0}
  for k in ks:
    t = kernel_seconds(k, gpu, model)
    s["launches"] += k.count
    s["seconds"] += t
    if k.kind == "gemm":
      cls = k.gemm_class()
      s[f"gemm_flops_{cls}"] = s.get(f"gemm_flops_{cls}", 0) + k.count * k.flops
      s["gemm_seconds"] = s.get("gemm_seconds", 0) + t
    else:
      s[f"{k.kind}_bytes"] = s.get(f"{k.kind}_bytes", 0) + k.count * k.bytes
      s[f"{k.kind}_seconds"] = s.get(f"{k.kind}_seconds", 0) + t
  return s
