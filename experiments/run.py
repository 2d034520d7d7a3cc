r"""Runs the arms of one experiment, then writes its table, plots and summary.

  python -m experiments.run lr_sweep                 # every arm, its seeds
  python -m experiments.run lr_sweep --seeds 3 --arms f32_lr0.001,fp4_paper_lr0.001
  python -m experiments.run mechanism --steps 100    # a shorter variant
  python -m experiments.run lr_sweep --report_only   # tables from what ran

Each (arm, seed, steps) trains in its own workdir under
`<root>/arms/<hash of its config>/`, one `fp4jax.main` process at a time, so
arms that two experiments share (the f32 baseline) run once; a finished arm
is skipped and a killed one resumes from its checkpoint. Seeds run in the
outer loop: seed 0 of every arm finishes first. The corpus is prepared and
the tokenizer trained once under `<root>/_data`. Results go to
`experiments/results/<name>/`: `table.md`, `summary.json`, `loss_curves.png`,
`final_val.png` and `finished.json`, the ledger of every finished run (config
hash -> final validation loss and training-loss curve). Reports read the
ledgers of all experiments as well as the workdirs, so results committed
from one machine still count, and are not rerun, on another with an empty
`<root>`.

Comparisons are paired: arm and baseline share seed, hence init and data
order; the difference of final validation losses is taken per seed, in % of
the baseline's. A mean difference whose seed range includes 0 is reported
as "no difference"; one seed gives no verdict.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import math
import os
import subprocess
import sys
from typing import Any

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS = os.path.join(ROOT, "experiments", "results")
_MAX_SEEDS = 10


# Set by the runner for every arm alike, not part of an arm's identity.
_RUNNER_KEYS = ("data.tfds_data_dir", "data.tokenizer_model")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v and k != "overrides":
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def arm_hash(config: Any) -> str:
  """Stable id of a run's configuration (seed and steps included).

  Only the keys whose value differs from configs/default.py count, so a
  config key added later with a neutral default does not orphan the
  workdirs of arms that already ran. Accepts a ConfigDict or the "config"
  dict of a workdir's config.json.
  """
  from configs import default  # pylint: disable=g-import-not-at-top
  d = config.to_dict() if hasattr(config, "to_dict") else config
  base = _flat(json.loads(json.dumps(default.get_config().to_dict())))
  cur = _flat(json.loads(json.dumps(d)))   # tuples -> lists, as on disk
  delta = {k: v for k, v in cur.items()
           if k not in _RUNNER_KEYS and (k not in base or base[k] != v)}
  text = json.dumps(delta, sort_keys=True, default=str)
  return hashlib.sha1(text.encode()).hexdigest()[:12]


def read_metrics(workdir: str) -> list[dict[str, Any]]:
  """metrics.jsonl records (a torn last line is skipped)."""
  path = os.path.join(workdir, "metrics.jsonl")
  out = []
  if not os.path.exists(path):
    return out
  with open(path) as f:
    for line in f:
      try:
        out.append(json.loads(line))
      except json.JSONDecodeError:
        continue
  return out


def _ledger_path(name: str) -> str:
  return os.path.join(RESULTS, name, "finished.json")


def read_ledgers() -> dict[str, dict[str, Any]]:
  """{config hash: {"arm", "seed", "steps", "val", "curve"}} over every
  experiment's committed finished.json."""
  out: dict[str, dict[str, Any]] = {}
  if not os.path.isdir(RESULTS):
    return out
  for name in sorted(os.listdir(RESULTS)):
    path = _ledger_path(name)
    if os.path.exists(path):
      with open(path) as f:
        out.update(json.load(f))
  return out


def final_val(records: list[dict[str, Any]], steps: int) -> float | None:
  for r in records:
    if r.get("step") == steps and "val_loss" in r:
      return float(r["val_loss"])
  return None


def paired(values: dict[int, float], base: dict[int, float]
           ) -> dict[str, Any] | None:
  """Per-seed (arm - base) / base in %, with mean, std, range, verdict."""
  seeds = sorted(set(values) & set(base))
  if not seeds:
    return None
  d = np.array([100.0 * (values[s] - base[s]) / base[s] for s in seeds])
  out = {"n": len(seeds), "per_seed": {s: float(x) for s, x in zip(seeds, d)},
         "mean": float(d.mean()),
         "std": float(d.std(ddof=1)) if len(d) > 1 else None,
         "min": float(d.min()), "max": float(d.max())}
  if len(d) < 2:
    out["verdict"] = "1 seed: no verdict"
  elif d.min() <= 0 <= d.max():
    out["verdict"] = "no difference"
  else:
    out["verdict"] = "worse" if d.mean() > 0 else "better"
  return out


class Runner:
  """Runs and reports one experiment module."""

  def __init__(self, name: str, *, steps: int | None, seeds: int | None,
               root: str, arms: list[str] | None, first_seed: int = 0):
    self.name = name
    self.mod = importlib.import_module(f"experiments.{name}")
    self.steps = steps or self.mod.STEPS
    self.seeds = list(range(first_seed, seeds or self.mod.SEEDS))
    self.root = root
    unknown = sorted(set(arms or ()) - set(self.mod.ARMS))
    if unknown:
      raise SystemExit(f"error: unknown arms {unknown}; {name} has "
                       f"{list(self.mod.ARMS)}")
    self.arms = arms or list(self.mod.ARMS)
    self.data_dir = os.path.join(root, "_data")

  def config(self, arm: str, seed: int):
    return self.mod.get_config(f"arm={arm},seed={seed},steps={self.steps}")

  def workdir(self, arm: str, seed: int) -> str:
    return os.path.join(self.root, "arms", arm_hash(self.config(arm, seed)))

  def _data_flags(self) -> list[str]:
    """Prepares the corpus and tokenizer once; flags that reuse them."""
    c = self.config(self.arms[0], 0)
    tfds_dir = os.path.join(self.data_dir, "tfds")
    tok_dir = os.path.join(self.data_dir, f"tokenizer_{c.data.vocab_size}")
    tok = os.path.join(tok_dir, "tokenizer.model")
    if not os.path.exists(tok):
      from fp4jax import data  # pylint: disable=g-import-not-at-top
      c.data.tfds_data_dir = tfds_dir
      data.make_input(c.data, split="train", seed=0, workdir=tok_dir)
    return [f"--config.data.tfds_data_dir={tfds_dir}",
            f"--config.data.tokenizer_model={tok}"]

  def run(self) -> int:
    flags = self._data_flags()
    failed = []
    for seed in self.seeds:
      for arm in self.arms:
        wd = self.workdir(arm, seed)
        if (final_val(read_metrics(wd), self.steps) is not None
            or os.path.basename(wd) in read_ledgers()):
          continue
        os.makedirs(wd, exist_ok=True)
        with open(os.path.join(wd, "arm.json"), "w") as f:
          json.dump({"experiment": self.name, "arm": arm, "seed": seed,
                     "steps": self.steps}, f)
        print(f"[{self.name}] arm {arm} seed {seed} -> {wd}", flush=True)
        cmd = [sys.executable, "-m", "fp4jax.main",
               f"--config=experiments/{self.name}.py:arm={arm},seed={seed},"
               f"steps={self.steps}", f"--workdir={wd}", *flags]
        with open(os.path.join(wd, "log.txt"), "a") as log:
          rc = subprocess.call(cmd, cwd=ROOT, stdout=log,
                               stderr=subprocess.STDOUT)
        if rc:
          failed.append((arm, seed, rc))
          print(f"[{self.name}] arm {arm} seed {seed} failed (exit {rc}); "
                f"see {wd}/log.txt", flush=True)
        self.report()   # results land as each arm finishes
    return 1 if failed else 0

  # ------------------------------------------------------------ report
  def collect(self) -> dict[str, dict[str, Any]]:
    """Finished runs of every arm, from the workdirs and the ledgers; updates
    this experiment's ledger with what the workdirs hold."""
    out = {}
    ledgers = read_ledgers()
    mine_path = _ledger_path(self.name)
    mine = {}
    if os.path.exists(mine_path):
      with open(mine_path) as f:
        mine = json.load(f)
    for arm in self.mod.ARMS:
      spec = self.mod.ARMS[arm]
      vals, curves = {}, {}
      # Every finished seed counts, also those run by an earlier, larger
      # --seeds than this call's.
      for seed in range(max(len(self.seeds), _MAX_SEEDS)):
        h = arm_hash(self.config(arm, seed))
        recs = read_metrics(os.path.join(self.root, "arms", h))
        v = final_val(recs, self.steps)
        if v is not None:
          curve = [(r["step"], r["loss"]) for r in recs
                   if "loss" in r and r.get("step", 0) > 0]
          mine[h] = {"arm": arm, "seed": seed, "steps": self.steps,
                     "val": v, "curve": curve}
        elif h in ledgers:
          v, curve = ledgers[h]["val"], ledgers[h]["curve"]
          mine.setdefault(h, ledgers[h])
        else:
          continue
        vals[seed] = v
        if curve:   # runs recorded before curves were kept have none
          curves[seed] = [tuple(p) for p in curve]
      if vals:
        out[arm] = {"group": spec.group or arm, "lr": spec.arg("lr", 1e-3),
                    "val": vals, "curves": curves}
    if mine:
      os.makedirs(os.path.dirname(mine_path), exist_ok=True)
      _write(mine_path, json.dumps(mine, sort_keys=True))
    return out

  def report(self) -> dict[str, Any] | None:
    runs = self.collect()
    if not runs:
      return None
    base = self.mod.BASELINE
    base_vals = runs.get(base, {}).get("val", {})
    summary: dict[str, Any] = {
        "experiment": self.name, "steps": self.steps, "baseline": base,
        "arms": {}}
    for arm, r in runs.items():
      v = np.array(list(r["val"].values()))
      summary["arms"][arm] = {
          "group": r["group"], "lr": r["lr"],
          "val_loss": {str(s): x for s, x in r["val"].items()},
          "mean": float(v.mean()),
          "std": float(v.std(ddof=1)) if len(v) > 1 else None,
          "vs_baseline": (paired(r["val"], base_vals)
                          if arm != base else None)}
    summary["best_lr"] = self._best_lr(summary, runs)
    out = os.path.join(RESULTS, self.name)
    os.makedirs(out, exist_ok=True)
    _write(os.path.join(out, "summary.json"),
           json.dumps(summary, indent=1, sort_keys=True))
    _write(os.path.join(out, "table.md"), self._table(summary))
    self._plots(runs, out)
    return summary

  def _best_lr(self, summary, runs) -> dict[str, Any] | None:
    """Per group with several LRs: the LR of lowest mean val loss over the
    seeds all its LRs ran, and the paired comparison of each group's best
    with the baseline group's."""
    groups: dict[str, list[str]] = {}
    for arm, a in summary["arms"].items():
      groups.setdefault(a["group"], []).append(arm)
    if all(len({summary["arms"][a]["lr"] for a in arms}) < 2
           for arms in groups.values()):
      return None
    def best_of(arms):
      # Compared on the seeds every LR of the group has: seeds differ in
      # difficulty by more than the LRs do, so unequal seed sets would
      # pick the LR that happened to run the easy seeds.
      common = set.intersection(*(set(runs[a]["val"]) for a in arms))
      return min(arms, key=lambda a: np.mean(
          [runs[a]["val"][s] for s in common]))
    best = {g: best_of(arms) for g, arms in groups.items()}
    base_group = summary["arms"].get(self.mod.BASELINE, {}).get("group")
    out = {}
    for g, arm in best.items():
      ref = best.get(base_group)
      out[g] = {"arm": arm, "lr": summary["arms"][arm]["lr"],
                "mean": summary["arms"][arm]["mean"],
                "n": len(runs[arm]["val"]),
                "vs_best_baseline": (paired(runs[arm]["val"],
                                            runs[ref]["val"])
                                     if ref and g != base_group else None)}
    return out

  def _table(self, s) -> str:
    lines = [f"# {self.name}: final validation loss at step {self.steps}",
             "", f"Baseline: `{s['baseline']}`. Differences are paired by "
             "seed, in % of the baseline (negative = lower loss).", "",
             "| arm | lr | seeds | val loss (mean ± std) | Δ vs baseline % "
             "(mean ± std [min, max]) | verdict |", "|---|---|---|---|---|---|"]
    for arm, a in s["arms"].items():
      lines.append(f"| `{arm}` | {a['lr']:g} | {len(a['val_loss'])} | "
                   f"{_pm(a['mean'], a['std'], 4)} | {_delta(a['vs_baseline'])}"
                   f" | {(a['vs_baseline'] or {}).get('verdict', '-')} |")
    if s["best_lr"]:
      lines += ["", "## Each group at its own best LR", "",
                "| group | best lr | arm | seeds | val loss | Δ vs baseline's "
                "best % | verdict |", "|---|---|---|---|---|---|---|"]
      for g, b in s["best_lr"].items():
        p = b["vs_best_baseline"]
        lines.append(f"| {g} | {b['lr']:g} | `{b['arm']}` | {b['n']} | "
                     f"{b['mean']:.4f} | {_delta(p)} | "
                     f"{(p or {}).get('verdict', '-')} |")
    return "\n".join(lines) + "\n"

  def _plots(self, runs, out) -> None:
    try:
      import matplotlib  # pylint: disable=g-import-not-at-top
      matplotlib.use("Agg")
      import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    except ImportError:
      print("matplotlib is not installed: no plots (pip install -e "
            "'.[notebooks]')", flush=True)
      return
    if any(r["curves"] for r in runs.values()):
      # Runs recorded only by their final loss (ledgers from before curves
      # were kept) have no line; n counts the seeds that have one.
      fig, ax = plt.subplots(figsize=(8, 5))
      for arm, r in runs.items():
        curve = _mean_curve(list(r["curves"].values()))
        if curve:
          ax.plot(*zip(*curve), label=f"{arm} (n={len(r['curves'])})")
      ax.set_xlabel("step")
      ax.set_ylabel("train loss (mean over seeds)")
      ax.set_title(f"{self.name}: training loss")
      ax.set_yscale("log")
      ax.legend(fontsize=7)
      fig.tight_layout()
      fig.savefig(os.path.join(out, "loss_curves.png"), dpi=110)
      plt.close(fig)
    fig, ax = plt.subplots(figsize=(8, 0.5 + 0.4 * len(runs)))
    names = list(runs)
    for i, arm in enumerate(names):
      v = list(runs[arm]["val"].values())
      ax.scatter(v, [i] * len(v), s=14, color="gray")
      ax.errorbar([np.mean(v)], [i], xerr=[[np.mean(v) - min(v)],
                                           [max(v) - np.mean(v)]],
                  fmt="o", color="C0", capsize=3)
    ax.set_yticks(range(len(names)), names, fontsize=7)
    ax.set_xlabel(f"validation loss at step {self.steps} (dots: seeds; "
                  "bar: range)")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "final_val.png"), dpi=110)
    plt.close(fig)


def _write(path: str, text: str) -> None:
  # Atomic: two runners of one experiment may report at the same time.
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def _mean_curve(curves: list[list[tuple[int, float]]]
                ) -> list[tuple[int, float]]:
  if not curves:
    return []
  common = set.intersection(*({s for s, _ in c} for c in curves))
  return [(s, float(np.mean([dict(c)[s] for c in curves])))
          for s in sorted(common)]


def _pm(mean: float, std: float | None, digits: int) -> str:
  return (f"{mean:.{digits}f}" if std is None or not math.isfinite(std)
          else f"{mean:.{digits}f} ± {std:.{digits}f}")


def _delta(p: dict[str, Any] | None) -> str:
  if not p:
    return "-"
  return f"{_pm(p['mean'], p['std'], 2)} [{p['min']:.2f}, {p['max']:.2f}]"


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("name", help="experiment module in experiments/")
  parser.add_argument("--steps", type=int, default=None)
  parser.add_argument("--seeds", type=int, default=None,
                      help="seeds 0..S-1 (default: the experiment's)")
  parser.add_argument("--first_seed", type=int, default=0,
                      help="run seeds first_seed..S-1 only")
  parser.add_argument("--arms", default="",
                      help="comma-separated subset of the arms")
  parser.add_argument("--root", default=os.path.join(ROOT, "runs",
                                                     "experiments"))
  parser.add_argument("--report_only", action="store_true")
  a = parser.parse_args(argv)
  if not os.path.exists(os.path.join(ROOT, "experiments", f"{a.name}.py")):
    raise SystemExit(f"error: no experiment experiments/{a.name}.py")
  r = Runner(a.name, steps=a.steps, seeds=a.seeds, root=a.root,
             arms=[x for x in a.arms.split(",") if x] or None,
             first_seed=a.first_seed)
  if a.report_only:
    s = r.report()
    print(f"no finished arms of {a.name}" if s is None else r._table(s))  # pylint: disable=W0212
    return 0
  return r.run()


if __name__ == "__main__":
  sys.exit(main())
