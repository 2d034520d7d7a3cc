r"""Runs the arms of one experiment, then writes its table, plots and summary.

  python -m experiments.run lr_sweep                 # every arm, its seeds
  python -m experiments.run lr_sweep --seeds 3 --arms f32_lr0.001,fp4_paper_lr0.001
  python -m experiments.run mechanism --steps 100    # a shorter variant
  python -m experiments.run lr_sweep --report_only   # tables from what ran
  python -m experiments.run lr_sweep --corpus DIR    # the books in DIR
  python -m experiments.run lr_sweep --results experiments/results  # commit

The arms train on the Gutenberg books (gutenberg_en_train.txt and
gutenberg_en_val.txt) of the shared data folder next to the repository
(its corpus/); `--corpus DIR` or FP4JAX_CORPUS=DIR names another folder
holding them. A training run without them stops at once with one line.

Each (arm, seed, steps) trains in its own workdir under `<root>/arms/<id>/`,
one `fp4jax.main` process at a time. The id hashes the config's non-default
keys with every data file by the sha256 of its content, not its path, so a
clone anywhere computes the same ids: arms that two experiments share (the
f32 baseline) run once, a finished arm is skipped and a killed one resumes
from its checkpoint. Seeds run in the outer loop: seed 0 of every arm
finishes first. The tokenizer is trained once per corpus content under
`<root>/_data`.

Results go to `<results>/<name>/` (default `<root>/results`): `table.md`,
`summary.json`, `loss_curves.png`, `final_val.png` and `finished.json`, the
ledger of every finished run (id -> final validation loss and
training-loss curve); the table is printed at the end. The committed
findings in `experiments/results/` are written only when named with
`--results experiments/results`, so a smoke run never replaces them.
Reports read the committed ledgers, those of the results directory and the
workdirs, so committed results count, and are not rerun, on a machine with
an empty `<root>` and without the corpus files (a missing shared-corpus
file is identified by the sha256 its README publishes).

Comparisons are paired: arm and baseline share seed, hence init and data
order; the difference of final validation losses is taken per seed, in % of
the baseline's. A mean difference whose seed range includes 0 is reported
as "no difference"; one seed gives no verdict.
"""

from __future__ import annotations

import argparse
import functools
import hashlib
import importlib
import json
import math
import os
import signal
import subprocess
import sys
from typing import Any

import numpy as np

from experiments import arms as arms_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The committed findings: always read, written only when named (--results).
RESULTS = os.path.join(ROOT, "experiments", "results")
LEDGER = "finished.json"
_MAX_SEEDS = 10
# Modules of experiments/ that are not experiments.
_NOT_EXPERIMENTS = ("run", "arms")


# Set by the runner for every arm alike, not part of an arm's identity.
_RUNNER_KEYS = ("data.tfds_data_dir", "data.tokenizer_model")
# Keys naming data files: an arm's id takes their content, not their path.
_DATA_FILE_KEYS = ("data.train_files", "data.val_files")


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  out = {}
  for k, v in d.items():
    if isinstance(v, dict) and v and k != "overrides":
      out.update(_flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


@functools.lru_cache(maxsize=None)
def _sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def file_digest(path: str) -> str:
  """sha256 of a data file's bytes.

  A missing file of the shared corpus gets the digest its README publishes
  (what the committed results were trained on), so reports work on a
  machine without it.

  Raises:
    FileNotFoundError: any other missing file.
  """
  if os.path.isfile(path):
    return _sha256(os.path.abspath(path))
  name = os.path.basename(path)
  if name in arms_lib.SHARED_CORPUS:
    return arms_lib.SHARED_CORPUS[name]
  raise FileNotFoundError(f"data file {path} not found: its content "
                          f"identifies the arm")


def arm_hash(config: Any, *, legacy: bool = False) -> str:
  """Stable id of a run's configuration (seed and steps included).

  Only the keys whose value differs from configs/default.py count, so a
  config key added later with a neutral default does not orphan the
  workdirs of arms that already ran; data files count by content, so the
  id is the same wherever the corpus lies. `legacy`: the id of earlier
  runners, which hashed the files' paths (to adopt their workdirs and
  ledgers). Accepts a ConfigDict or the "config" dict of a workdir's
  config.json.
  """
  from configs import default  # pylint: disable=g-import-not-at-top
  d = config.to_dict() if hasattr(config, "to_dict") else config
  base = _flat(json.loads(json.dumps(default.get_config().to_dict())))
  cur = _flat(json.loads(json.dumps(d)))   # tuples -> lists, as on disk
  delta = {k: v for k, v in cur.items()
           if k not in _RUNNER_KEYS and (k not in base or base[k] != v)}
  if not legacy:
    for key in _DATA_FILE_KEYS:
      if key in delta:
        delta[key] = [f"sha256:{file_digest(p)}" for p in delta[key]]
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


def read_ledgers(*dirs: str) -> dict[str, dict[str, Any]]:
  """{arm id: {"arm", "seed", "steps", "val", "curve"}} over every
  experiment's finished.json in the results directories `dirs` (default:
  the committed experiments/results/)."""
  out: dict[str, dict[str, Any]] = {}
  for d in dict.fromkeys(os.path.abspath(x) for x in dirs or (RESULTS,)):
    if not os.path.isdir(d):
      continue
    for name in sorted(os.listdir(d)):
      path = os.path.join(d, name, LEDGER)
      if os.path.exists(path):
        with open(path) as f:
          out.update(json.load(f))
  return out


def experiment_names() -> list[str]:
  """The experiments: modules of experiments/ that define arms."""
  out = []
  for f in sorted(os.listdir(os.path.join(ROOT, "experiments"))):
    name, ext = os.path.splitext(f)
    if ext != ".py" or name in _NOT_EXPERIMENTS:
      continue
    mod = importlib.import_module(f"experiments.{name}")
    if all(hasattr(mod, a) for a in ("ARMS", "BASELINE", "SEEDS", "STEPS",
                                     "get_config")):
      out.append(name)
  return out


def _load_experiment(name: str):
  if name.isidentifier() and name not in _NOT_EXPERIMENTS and os.path.isfile(
      os.path.join(ROOT, "experiments", f"{name}.py")):
    mod = importlib.import_module(f"experiments.{name}")
    if hasattr(mod, "ARMS"):
      return mod
  raise SystemExit(f"error: unknown experiment {name!r}; experiments: "
                   f"{', '.join(experiment_names())}")


def _count(flag: str, value: int | None, default: int, low: int) -> int:
  """A count from the command line; None = the experiment's default."""
  if value is None:
    return default
  if value < low:
    raise SystemExit(f"error: {flag} must be >= {low}, got {value}")
  return value


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
  """Runs and reports one experiment module.

  Args:
    name: the experiment (a module of experiments/ with ARMS).
    steps, seeds: None = the experiment's STEPS / SEEDS; seeds
      first_seed..seeds-1 run.
    root: run directory: arms/<id>/ workdirs, _data/ (tokenizer, corpus).
    arms: a subset of the arms (None = all).
    results: where tables, plots and the ledger go (None = <root>/results).
    corpus: the folder holding the corpus files (None = $FP4JAX_CORPUS,
      else the shared data folder next to the repository).

  Raises:
    SystemExit: one `error:` line naming a bad argument.
  """

  def __init__(self, name: str, *, steps: int | None = None,
               seeds: int | None = None, root: str,
               arms: list[str] | None = None, first_seed: int = 0,
               results: str | None = None, corpus: str | None = None):
    self.name = name
    self.mod = _load_experiment(name)
    self.steps = _count("--steps", steps, self.mod.STEPS, 1)
    top = _count("--seeds", seeds, self.mod.SEEDS, 1)
    first = _count("--first_seed", first_seed, 0, 0)
    if first >= top:
      raise SystemExit(f"error: --first_seed {first} leaves no seed to run "
                       f"(seeds 0..{top - 1}); raise --seeds")
    self.seeds = list(range(first, top))
    self.root = os.path.abspath(root)
    unknown = sorted(set(arms or ()) - set(self.mod.ARMS))
    if unknown:
      raise SystemExit(f"error: unknown arms {unknown}; {name} has "
                       f"{list(self.mod.ARMS)}")
    self.arms = arms or list(self.mod.ARMS)
    self.data_dir = os.path.join(self.root, "_data")
    self.results = os.path.abspath(results or os.path.join(self.root,
                                                           "results"))
    corpus = corpus or os.environ.get(arms_lib.CORPUS_ENV) or None
    self.corpus = os.path.abspath(corpus) if corpus else None

  def config(self, arm: str, seed: int):
    c = self.mod.get_config(f"arm={arm},seed={seed},steps={self.steps}")
    if self.corpus:
      arms_lib.point_corpus(c, self.corpus)
    return c

  def workdir(self, arm: str, seed: int) -> str:
    """`<root>/arms/<id>`. A workdir an earlier runner made under the id of
    the corpus's path is moved there, so its run resumes or counts."""
    c = self.config(arm, seed)
    wd = os.path.join(self.root, "arms", arm_hash(c))
    old = os.path.join(self.root, "arms", arm_hash(c, legacy=True))
    if not os.path.exists(wd) and os.path.isdir(old):
      os.rename(old, wd)
      print(f"[{self.name}] arm {arm} seed {seed}: moved {old} to {wd} "
            f"(ids now take data by content)", flush=True)
    return wd

  def _ledgers(self) -> dict[str, dict[str, Any]]:
    return read_ledgers(RESULTS, self.results)

  def _finished(self, arm: str, seed: int) -> bool:
    wd = self.workdir(arm, seed)
    return (final_val(read_metrics(wd), self.steps) is not None
            or os.path.basename(wd) in self._ledgers())

  def _data_files(self) -> list[str]:
    c = self.config(self.arms[0], 0)
    return [*c.data.train_files, *c.data.val_files]

  def check_corpus(self) -> None:
    """One line naming a missing corpus file and how to name the folder;
    a note when the files differ from the shared corpus."""
    for path in self._data_files():
      if not os.path.isfile(path):
        raise SystemExit(
            f"error: corpus file {os.path.basename(path)} not found in "
            f"{os.path.dirname(path)}; name the folder holding it with "
            f"--corpus DIR or {arms_lib.CORPUS_ENV}=DIR (by default the "
            f"shared data folder's corpus/ next to the repository)")
    other = [os.path.basename(p) for p in self._data_files()
             if arms_lib.SHARED_CORPUS.get(os.path.basename(p)) not in (
                 None, file_digest(p))]
    if other:
      print(f"[{self.name}] note: {', '.join(other)} in "
            f"{os.path.dirname(self._data_files()[0])} differ from the "
            f"shared corpus: committed results do not count for these arms",
            flush=True)

  def _data_flags(self) -> list[str]:
    """Prepares the corpus and tokenizer once; flags that reuse them."""
    c = self.config(self.arms[0], 0)
    tfds_dir = os.path.join(self.data_dir, "tfds")
    # Keyed by the training text's content: another corpus gets its own.
    digests = [file_digest(p) for p in c.data.train_files]
    key = hashlib.sha1(" ".join(digests).encode()).hexdigest()[:12]
    tok_dir = os.path.join(self.data_dir,
                           f"tokenizer_{c.data.vocab_size}_{key}")
    old = os.path.join(self.data_dir, f"tokenizer_{c.data.vocab_size}")
    shared = [arms_lib.SHARED_CORPUS.get(os.path.basename(p))
              for p in c.data.train_files]
    if not os.path.exists(tok_dir) and os.path.isdir(old) and (
        digests == shared):
      # Earlier runners kept one tokenizer per vocabulary size, always
      # trained on the shared corpus (the only one they could use).
      os.rename(old, tok_dir)
    tok = os.path.join(tok_dir, "tokenizer.model")
    if not os.path.exists(tok):
      from fp4jax import data  # pylint: disable=g-import-not-at-top
      c.data.tfds_data_dir = tfds_dir
      data.make_input(c.data, split="train", seed=0, workdir=tok_dir)
    return [f"--config.data.tfds_data_dir={tfds_dir}",
            f"--config.data.tokenizer_model={tok}"]

  def run(self) -> int:
    pending = [(arm, seed) for seed in self.seeds for arm in self.arms
               if not self._finished(arm, seed)]
    flags = []
    if pending:   # a finished experiment needs neither corpus nor tokenizer
      self.check_corpus()
      flags = self._data_flags()
    env = dict(os.environ)
    if self.corpus:   # the arms' configs, rebuilt in each process, see it
      env[arms_lib.CORPUS_ENV] = self.corpus
    failed = []
    for arm, seed in pending:
      if self._finished(arm, seed):   # another runner did it meanwhile
        continue
      wd = self.workdir(arm, seed)
      os.makedirs(wd, exist_ok=True)
      with open(os.path.join(wd, "arm.json"), "w") as f:
        json.dump({"experiment": self.name, "arm": arm, "seed": seed,
                   "steps": self.steps,
                   "data": {p: file_digest(p) for p in self._data_files()}},
                  f)
      print(f"[{self.name}] arm {arm} seed {seed} -> {wd}", flush=True)
      cmd = [sys.executable, "-m", "fp4jax.main",
             f"--config=experiments/{self.name}.py:arm={arm},seed={seed},"
             f"steps={self.steps}", f"--workdir={wd}", *flags]
      log_path = os.path.join(wd, "log.txt")
      with open(log_path, "a") as log:
        rc = _train(cmd, log, env)
      if rc == 128 + signal.SIGINT:
        print(f"interrupted: arm {arm} seed {seed} stopped with its "
              f"checkpoint saved (see {log_path}); rerun the same command "
              f"to resume", file=sys.stderr)
        return rc
      if rc:
        failed.append((arm, seed, rc))
        print(f"[{self.name}] arm {arm} seed {seed} failed (exit {rc}); "
              f"see {log_path}", flush=True)
      else:
        print(f"[{self.name}] arm {arm} seed {seed}: "
              f"{_last_line(log_path, 'finished:')}", flush=True)
      self.report()   # results land as each arm finishes
    summary = self.report()
    if summary is not None:
      print(self.table(summary), end="")
      print(f"[{self.name}] results in {os.path.join(self.results, self.name)}")
    if failed:
      print(f"[{self.name}] {len(failed)} run(s) failed: " + ", ".join(
          f"{a} seed {s} (exit {rc})" for a, s, rc in failed), flush=True)
    return 1 if failed else 0

  # ------------------------------------------------------------ report
  def collect(self) -> dict[str, dict[str, Any]]:
    """Finished runs of every arm, from the workdirs and the ledgers; updates
    this experiment's ledger with what the workdirs hold."""
    out = {}
    ledgers = self._ledgers()
    mine_path = os.path.join(self.results, self.name, LEDGER)
    mine = {}
    if os.path.exists(mine_path):
      with open(mine_path) as f:
        mine = json.load(f)
    for arm in self.mod.ARMS:
      spec = self.mod.ARMS[arm]
      vals, curves = {}, {}
      # Every finished seed counts, also those run by an earlier, larger
      # --seeds than this call's.
      for seed in range(max(self.seeds[-1] + 1, _MAX_SEEDS)):
        wd = self.workdir(arm, seed)
        h = os.path.basename(wd)
        # A ledger written by an earlier runner keys the run by its legacy
        # id (the corpus's path on that machine).
        old = arm_hash(self.config(arm, seed), legacy=True)
        recs = read_metrics(wd)
        v = final_val(recs, self.steps)
        if v is not None:
          curve = [(r["step"], r["loss"]) for r in recs
                   if "loss" in r and r.get("step", 0) > 0]
          mine[h] = {"arm": arm, "seed": seed, "steps": self.steps,
                     "val": v, "curve": curve}
        elif h in ledgers or old in ledgers:
          entry = ledgers[h] if h in ledgers else ledgers[old]
          v, curve = entry["val"], entry["curve"]
          mine.setdefault(h, entry)
        else:
          continue
        if old != h:   # this ledger keeps the run under its id only
          mine.pop(old, None)
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
    out = os.path.join(self.results, self.name)
    os.makedirs(out, exist_ok=True)
    _write(os.path.join(out, "summary.json"),
           json.dumps(summary, indent=1, sort_keys=True))
    _write(os.path.join(out, "table.md"), self.table(summary))
    self._plots(runs, summary, out)
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

  def table(self, s) -> str:
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

  def _plots(self, runs, summary, out) -> None:
    try:
      import matplotlib  # pylint: disable=g-import-not-at-top
      matplotlib.use("Agg")
      import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
    except ImportError:
      print("matplotlib is not installed: no plots (pip install -e "
            "'.[experiments]')", flush=True)
      return
    if any(r["curves"] for r in runs.values()):
      # Runs recorded only by their final loss (ledgers from before curves
      # were kept) have no line; n counts the seeds that have one.
      fig, ax = plt.subplots(figsize=(8, 5))
      for arm, r in runs.items():
        curve = _mean_curve(list(r["curves"].values()))
        if curve:
          # Markers: a short run logs one point, which a line alone hides.
          ax.plot(*zip(*curve), marker="o", markersize=3,
                  label=f"{arm} (n={len(r['curves'])})")
      ax.set_xlabel("step")
      ax.set_ylabel("train loss (mean over seeds)")
      ax.set_title(f"{self.name}: training loss")
      ax.set_yscale("log")
      ax.legend(fontsize=7)
      fig.tight_layout()
      fig.savefig(os.path.join(out, "loss_curves.png"), dpi=110)
      plt.close(fig)
    names = list(runs)
    base = summary["baseline"]
    fig, (left, right) = plt.subplots(
        1, 2, figsize=(12, 1.2 + 0.4 * len(names)), sharey=True)
    for i, arm in enumerate(names):
      v = list(runs[arm]["val"].values())
      left.scatter(v, [i] * len(v), s=14, color="gray", zorder=3)
      left.errorbar([np.mean(v)], [i], xerr=[[np.mean(v) - min(v)],
                                             [max(v) - np.mean(v)]],
                    fmt="o", color="C0", capsize=3)
      # What the table concludes from: the per-seed paired differences.
      p = summary["arms"][arm]["vs_baseline"]
      if p:
        d = list(p["per_seed"].values())
        right.scatter(d, [i] * len(d), s=14, color="gray", zorder=3)
        right.errorbar([p["mean"]], [i], xerr=[[p["mean"] - p["min"]],
                                               [p["max"] - p["mean"]]],
                       fmt="o", capsize=3, color={
                           "better": "C2", "worse": "C3"}.get(
                               p["verdict"], "C0"))
    right.axvline(0, color="black", lw=0.8)
    left.set_yticks(range(len(names)), names, fontsize=7)
    left.invert_yaxis()   # the table's order, top down
    left.set_xlabel(f"validation loss at step {self.steps}")
    left.set_title("final validation loss", fontsize=9)
    right.set_xlabel(f"Δ vs {base}, % of its loss (negative = lower)")
    right.set_title(f"paired by seed vs {base} (green better, red worse)",
                    fontsize=9)
    fig.suptitle(f"{self.name}: final validation loss at step {self.steps} "
                 f"(dots: seeds; marker: mean; bar: seed range)")
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


class _Parser(argparse.ArgumentParser):

  def error(self, message):
    # One line and exit 1, as for every other bad input here.
    raise SystemExit(f"error: {message} (python -m experiments.run --help)")


def main(argv=None) -> int:
  parser = _Parser(
      prog="python -m experiments.run", description=__doc__.split("\n")[0],
      epilog=f"experiments: {', '.join(experiment_names())}")
  parser.add_argument("name", help="experiment module in experiments/")
  parser.add_argument("--steps", type=int, default=None,
                      help="optimizer steps (default: the experiment's)")
  parser.add_argument("--seeds", type=int, default=None,
                      help="seeds 0..S-1 (default: the experiment's)")
  parser.add_argument("--first_seed", type=int, default=0,
                      help="run seeds first_seed..S-1 only")
  parser.add_argument("--arms", default="",
                      help="comma-separated subset of the arms")
  parser.add_argument("--root", default=os.path.join(ROOT, "runs",
                                                     "experiments"),
                      help="run directory (workdirs, tokenizer)")
  parser.add_argument("--results", default=None,
                      help="tables, plots and ledger go to RESULTS/NAME/ "
                      "(default: ROOT/results; the committed findings: "
                      "experiments/results)")
  parser.add_argument("--corpus", default=None,
                      help=f"folder holding the corpus files (default: "
                      f"${arms_lib.CORPUS_ENV}, else the shared data "
                      f"folder's corpus/ next to the repository)")
  parser.add_argument("--report_only", action="store_true",
                      help="tables and plots from what has run; trains "
                      "nothing")
  a = parser.parse_args(argv)
  try:
    r = Runner(a.name, steps=a.steps, seeds=a.seeds, root=a.root,
               arms=[x for x in a.arms.split(",") if x] or None,
               first_seed=a.first_seed, results=a.results, corpus=a.corpus)
    if a.report_only:
      s = r.report()
      if s is None:
        print(f"no finished arms of {a.name}")
      else:
        print(r.table(s), end="")
        print(f"[{a.name}] results in {os.path.join(r.results, a.name)}")
      return 0
    return r.run()
  except KeyboardInterrupt:   # preparing the data, in this process
    print("interrupted: nothing trained yet in this call", file=sys.stderr)
    return 128 + signal.SIGINT
  except (OSError, ValueError) as e:
    # A missing or unreadable data file, a results directory that cannot
    # be written, an arm config that does not build.
    text = str(e).strip().splitlines()
    raise SystemExit(f"error: {text[0] if text else repr(e)}") from None


def _train(cmd: list[str], log, env: dict[str, str]) -> int:
  """Runs one arm; its exit code. Ctrl-C reaches the training process too
  (same process group): it saves a checkpoint and exits 130, which the
  runner waits for instead of killing it mid-save."""
  with subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                        env=env) as proc:
    while True:
      try:
        return proc.wait()
      except KeyboardInterrupt:
        continue


def _last_line(path: str, prefix: str) -> str:
  """The last line of a log that starts with `prefix` ("" if none)."""
  found = ""
  with open(path, errors="replace") as f:
    for line in f:
      if line.startswith(prefix):
        found = line.strip()
  return found


if __name__ == "__main__":
  sys.exit(main())
