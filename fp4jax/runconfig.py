"""The run's config, translated once: ConfigDict in, plain values out.

Owns: turning the ConfigDict's sections into what the library takes
(`model_config` -> the model's config, `gemm_execution` -> its GEMMs'
execution, `quant_rules` -> layer rules and the main recipe,
`switch_back_step` / `switched_rules` / `rules_at_step` for
quant.switch_back, `optim.OptimConfig`), the checks of the loop's own keys
(`check_loop_keys`, `profile_steps`) and the model's run identity
(`model_identity`: what a workdir's checkpoints are bound to). `translate`
does all of it in one call, before anything reads data or compiles.

Must not import: tensorflow_datasets, grain, fp4jax.data, fp4jax.train,
fp4jax.main (evaluation and benchmarks read configs through it).
"""

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax

from fp4jax import llama
from fp4jax import models
from fp4jax import optim
from fp4jax import qconfig
from fp4jax import qdot
from fp4jax import sharding

# LlamaConfig fields that choose how the model is executed, not what it
# computes: changing them between starts of one run is legitimate (a new
# cluster wants another remat policy or attention kernel), so they are not
# part of the identity a workdir's checkpoints are bound to.
EXECUTION_FIELDS = ("attention", "remat", "scan_layers", "gemm")


def model_identity(model_cfg: Any) -> dict[str, Any]:
  """The LlamaConfig fields a checkpoint is bound to (all but
  EXECUTION_FIELDS), as a JSON-able dict: config.json's "model"."""
  return {k: v for k, v in dataclasses.asdict(model_cfg).items()
          if k not in EXECUTION_FIELDS}


def model_config(model: Mapping[str, Any], data_vocab: int,
                 gemm: qconfig.Execution | None = None) -> Any:
  """The model's config from the `model` section: its family's size table
  plus non-zero overrides.

  Args:
    model: the `model` config section (family (default "llama"), size, and
      the family config's fields, where 0 means "from the size table" and
      vocab_size 0 means "from the data").
    data_vocab: the input pipeline's vocabulary size.
    gemm: the GEMMs' execution (`gemm_execution`); default Execution().

  Raises:
    ValueError: unknown family or size, invalid field, or a vocabulary
      smaller than the data's.
  """
  family = models.get_family(model.get("family", "llama"))
  fields = {f.name for f in dataclasses.fields(family.config)}
  overrides = {}
  for key, value in model.items():
    if key in ("size", "family"):
      continue
    if key not in fields or key == "gemm":
      raise ValueError(f"model.{key} is not a {family.config.__name__} "
                       "field")
    unset = (not isinstance(value, bool) and isinstance(value, (int, float))
             and value == 0)
    if not unset:
      overrides[key] = value
  if gemm is not None:
    overrides["gemm"] = gemm
  if "vocab_size" not in overrides:
    overrides["vocab_size"] = data_vocab
  elif overrides["vocab_size"] < data_vocab:
    raise ValueError(f"model.vocab_size={overrides['vocab_size']} is smaller "
                     f"than the data's vocabulary ({data_vocab})")
  return models.get_config(family.name, model["size"], **overrides)


def _split(quant: Mapping[str, Any]):
  """quant.overrides as (recipe, Execution, layer-rule) keys."""
  overrides = quant.get("overrides") or {}
  if not hasattr(overrides, "items"):     # a dict or a ConfigDict
    raise ValueError(f"quant.overrides must be a dict of recipe overrides, "
                     f"got {overrides!r}")
  return qconfig.split_overrides(dict(overrides.items()))


def gemm_execution(config) -> qconfig.Execution:
  """The `gemm` section as a qconfig.Execution; the earlier spelling, run
  keys in quant.overrides ({'impl': 'xla'}), still counts, where the
  section leaves that field at its default.

  Raises:
    ValueError: an unknown key or value, or one field set both ways to
      different values.
  """
  section = dict(config.get("gemm") or {})
  fields = {f.name for f in dataclasses.fields(qconfig.Execution)}
  unknown = sorted(set(section) - fields)
  if unknown:
    raise ValueError(f"gemm.{unknown[0]} is not a gemm key; expected one of "
                     f"{sorted(fields)}")
  default = qconfig.Execution()
  _, run, _ = _split(config.quant)
  for key, value in run.items():
    if section.get(key, getattr(default, key)) not in (
        getattr(default, key), value):
      raise ValueError(f"gemm.{key}={section[key]!r} and quant.overrides "
                       f"{key}={value!r} disagree; set gemm.{key} only")
    section[key] = value
  try:
    return qconfig.Execution(**section)
  except ValueError as e:
    raise ValueError(f"gemm: {e}") from None


def bf16_tail(quant: Mapping[str, Any]) -> float:
  """The share of the last decoder blocks kept BF16: quant.bf16_tail, or
  the earlier override key, else the named recipe's own (BF16_TAILS)."""
  _, _, layer = _split(quant)
  share = quant.get("bf16_tail")
  if "bf16_tail" in layer:
    if share is not None and share != layer["bf16_tail"]:
      raise ValueError(f"quant.bf16_tail={share!r} and quant.overrides "
                       f"bf16_tail={layer['bf16_tail']!r} disagree; set "
                       "quant.bf16_tail only")
    share = layer["bf16_tail"]
  if share is None:
    return qconfig.default_bf16_tail(quant["recipe"])
  return qconfig.check_share(share, "quant.bf16_tail")


def quant_rules(quant: Mapping[str, Any], n_layers: int | None = None
                ) -> tuple[tuple[tuple[str, Any], ...], qconfig.Recipe]:
  """(rules for llama.Llama, the main recipe) from the `quant` section.

  quant.overrides modify quant.recipe (the run-level and layer-level keys
  among them aside: `gemm_execution`, `bf16_tail`); quant.rules name
  recipes by RECIPES key ("none" = plain), and a rule naming quant.recipe
  gets the overridden one. Empty rules = RECIPE §5's
  (`qconfig.default_rules`). The BF16 tail's rule (`bf16_tail`) goes
  first either way.

  Raises:
    ValueError: unknown recipe, override, or malformed rule.
  """
  recipe_over, _, _ = _split(quant)
  try:
    recipe = qdot.get_recipe(quant["recipe"], **recipe_over)
  except ValueError as e:
    if not recipe_over:
      raise
    raise ValueError(f"quant.overrides={dict(quant['overrides'])!r} on "
                     f"recipe {quant['recipe']!r}: {e}") from None
  tail = qconfig.tail_rules(n_layers, bf16_tail(quant))
  if not quant["rules"]:
    return tail + qconfig.default_rules(recipe, n_layers, 0.0), recipe
  rules = list(tail)
  for rule in quant["rules"]:
    if len(rule) != 2 or not all(isinstance(r, str) for r in rule):
      raise ValueError(f"quant.rules entries must be (regex, recipe name) "
                       f"pairs, got {rule!r}")
    pattern, name = rule
    if name == "none":
      rules.append((pattern, None))
    elif name == quant["recipe"]:
      rules.append((pattern, recipe))
    else:
      rules.append((pattern, qdot.get_recipe(name)))
  return tuple(rules), recipe


SWITCH_BACK_MODES = ("forward", "all")


def switch_back_step(quant: Mapping[str, Any], num_steps: int) -> int | None:
  """The first step trained with the switched-back rules, or None (off).

  Raises:
    ValueError: naming quant.switch_back / quant.switch_back_mode.
  """
  share = qconfig.check_share(quant.get("switch_back", 0.0),
                              "quant.switch_back")
  mode = quant.get("switch_back_mode", "forward")
  if mode not in SWITCH_BACK_MODES:
    raise ValueError(f"quant.switch_back_mode must be one of "
                     f"{SWITCH_BACK_MODES}, got {mode!r}")
  late = int(share * num_steps + 0.5)
  return num_steps - late if late else None


def switched_rules(rules, mode: str):
  """The layer rules for the switched-back steps: every recipe with its
  forward GEMMs in BF16 (X and W unquantized, so no OCC, DGE, rotation or
  trust mask either; the gradients keep their quantization), or no
  quantization at all (mode "all")."""
  out = []
  for pattern, recipe in rules:
    if recipe is None or mode == "all":
      out.append((pattern, None))
      continue
    out.append((pattern, qconfig.bf16_forward(recipe)))
  return tuple(out)


def rules_at_step(quant: Mapping[str, Any], num_steps: int, n_layers: int,
                  step: int) -> tuple[tuple[tuple[str, Any], ...], str]:
  """(layer rules, recipe label) the last step before checkpoint `step`
  was trained with: `quant_rules`, switched back past
  quant.switch_back's step (label "<recipe>+bf16_forward", or "bf16" for
  switch_back_mode "all").

  Raises:
    ValueError: as `quant_rules` and `switch_back_step`.
  """
  rules, recipe = quant_rules(quant, n_layers)
  late = switch_back_step(quant, num_steps)
  if late is None or step <= late:
    return rules, recipe.name
  mode = quant.get("switch_back_mode", "forward")
  label = "bf16" if mode == "all" else f"{recipe.name}+bf16_forward"
  return switched_rules(rules, mode), label


def check_attention(model_cfg: Any, segment_ids: bool) -> None:
  """model.attention="cudnn" where it cannot run: one line before compiling
  (the trace would fail deep inside jax)."""
  if llama.attention_impl(getattr(model_cfg, "attention", "xla"),
                          segment_ids) != "cudnn":
    return
  if jax.default_backend() != "gpu":
    raise ValueError(f"model.attention='cudnn' needs an NVIDIA GPU (the "
                     f"backend is {jax.default_backend()}); use 'auto' or "
                     f"'xla'")
  if segment_ids:
    raise ValueError("model.attention='cudnn' takes no segment masks; set "
                     "data.segment_ids=False or model.attention='auto'")


def check_loop_keys(config) -> None:
  for key, low in (("num_steps", 1), ("log_every", 1), ("eval_every", 0),
                   ("eval_steps", 0), ("checkpoint_every", 1),
                   ("keep_checkpoints", 1), ("telemetry_every", 0)):
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise ValueError(f"{key} must be an int >= {low}, got {value!r}")
  minutes = config.get("checkpoint_every_minutes", 0.0)
  if (isinstance(minutes, bool) or not isinstance(minutes, (int, float))
      or not 0 <= minutes < float("inf")):
    raise ValueError(f"checkpoint_every_minutes must be a number >= 0 (0 = "
                     f"off), got {minutes!r}")
  share = config.max_skipped_fraction
  if isinstance(share, bool) or not 0 <= share <= 1:
    raise ValueError(f"max_skipped_fraction must be in [0, 1], got "
                     f"{share!r}")




def mesh_axes(config) -> dict[str, int]:
  """The mesh section's axis sizes ({"data", "fsdp", "tensor"}), the
  arguments of `sharding.make_mesh` (the section also holds
  device_memory_gb, for `fp4jax.plan`)."""
  return {k: config.mesh[k] for k in sharding.MESH_AXES}


def profile_steps(value: Any) -> tuple[int, int] | None:
  """`profile_steps` ("START,END": a jax.profiler trace of the steps after
  step START up to step END, as the logs number them, into
  <workdir>/profile; "" = off) as (start, end), or None.

  Raises:
    ValueError: one line naming the key.
  """
  if value in ("", None):
    return None
  try:
    start, end = (int(p) for p in str(value).split(","))
  except ValueError:
    start = end = -1
  if not 0 <= start < end:
    raise ValueError(f"profile_steps must be 'START,END' with 0 <= START < "
                     f"END (steps to trace), got {value!r}")
  return start, end


@dataclasses.dataclass(frozen=True)
class Run:
  """A run's settings, translated and checked (no data read, nothing
  compiled).

  Attributes:
    num_steps: optimizer steps of the run (the schedule's length).
    model: the LlamaConfig (vocab_size from data.vocab_size when unset).
    optim: the OptimConfig (its grad_accum = microbatches per step).
    rules: layer rules ((regex, Recipe | None), ...) over the model's
      projection paths.
    recipe: the main recipe (quant.recipe with quant.overrides).
    late_step: first step trained with `late_rules` (quant.switch_back), or
      None.
    late_rules: the switched-back rules, or None.
    seed: init and run-key seed (config.seed).
    data_seed: data order seed (data.shuffle_seed, else seed).
    profile: (start, end) steps to trace (profile_steps), or None.
    run_info: config.json's content: {"model": model_identity, "quant",
      "config"}.
  """
  num_steps: int
  model: Any
  optim: optim.OptimConfig
  rules: tuple
  recipe: Any
  late_step: int | None
  late_rules: tuple | None
  seed: int
  data_seed: int
  profile: tuple[int, int] | None
  run_info: dict[str, Any]


def translate(config) -> Run:
  """Every check of `config` that needs neither data nor devices' memory,
  in the order a user would fix them; then the translated run.

  Raises:
    ValueError: one line naming the first invalid key.
  """
  check_loop_keys(config)
  num_steps = config.num_steps
  optim_cfg = optim.OptimConfig(**config.optim.to_dict())
  optim.validate_schedule(optim_cfg, num_steps)
  # Every text source's tokenizer has exactly data.vocab_size pieces (a
  # trained one by construction, a given one is checked), and synthetic
  # tokens use it too: the model is built and checked before the data.
  model_cfg = model_config(config.model.to_dict(), config.data.vocab_size,
                           gemm_execution(config))
  rules, recipe = quant_rules(config.quant, model_cfg.n_layers)
  for _, r in rules:
    model_cfg.gemm.check(r)
  late_step = switch_back_step(config.quant, num_steps)
  late_rules = (None if late_step is None else
                switched_rules(rules, config.quant.switch_back_mode))
  check_attention(model_cfg, bool(config.data.get("segment_ids", False)))
  seed = config.data.shuffle_seed
  family = models.family_of(model_cfg).name
  run_info = {"model": model_identity(model_cfg),
              # Said only for a family other than the first (config.json
              # files written before there were families stay as they are).
              **({} if family == "llama" else {"model_family": family}),
              "quant": {"recipe": recipe.name,
                        "overrides": dict(config.quant.overrides),
                        "rules": [list(r) for r in config.quant.rules]},
              "config": config.to_dict()}
  return Run(num_steps=num_steps, model=model_cfg, optim=optim_cfg,
             rules=rules, recipe=recipe, late_step=late_step,
             late_rules=late_rules, seed=config.seed,
             data_seed=config.seed if seed < 0 else seed,
             profile=profile_steps(config.get("profile_steps", "")),
             run_info=run_info)
