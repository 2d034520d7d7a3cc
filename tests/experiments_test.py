"""The experiment runner's bookkeeping: arm configs, dedup ids, paired
statistics and verdicts (no arm trains here; the arms are plain configs),
and what a user meets: its command line, where results go, the plots, and
the log of a training run."""

import hashlib
import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

from experiments import arms as arms_lib
from experiments import lr_sweep
from experiments import mechanism
from experiments import run

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _cli(*args, env=None):
  return subprocess.run(
      [sys.executable, "-m", "experiments.run", *args], cwd=ROOT,
      capture_output=True, text=True, timeout=300,
      env={**os.environ, **(env or {})})


def _one_error_line(r, match):
  assert r.returncode == 1, r.stdout + r.stderr
  assert "Traceback" not in r.stdout + r.stderr, r.stderr
  lines = r.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
  assert match in lines[0], r.stderr


def _snapshot(folder: pathlib.Path) -> dict[str, str]:
  return {p.name: hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(folder.iterdir())}


def _finished_workdir(runner, arm, seed, val):
  """A workdir holding a finished run of (arm, seed) at runner.steps."""
  wd = pathlib.Path(runner.workdir(arm, seed))
  wd.mkdir(parents=True)
  recs = [{"step": runner.steps, "loss": val + 0.5},
          {"step": runner.steps, "val_loss": val}]
  (wd / "metrics.jsonl").write_text(
      "".join(json.dumps(r) + "\n" for r in recs))
  return wd


def test_shared_arms_have_one_workdir_id():
  same = (run.arm_hash(mechanism.get_config("arm=f32,seed=1")),
          run.arm_hash(lr_sweep.get_config("arm=f32_lr0.001,seed=1")))
  assert same[0] == same[1]
  # Seed, steps, LR and per-arm settings all change the id.
  ids = {run.arm_hash(c) for c in (
      mechanism.get_config("arm=f32,seed=0"),
      mechanism.get_config("arm=f32,seed=1"),
      mechanism.get_config("arm=f32,seed=1,steps=100"),
      lr_sweep.get_config("arm=f32_lr0.003,seed=1"),
      mechanism.get_config("arm=f32_proj_lr0.69,seed=1"))}
  assert len(ids) == 5


def test_arm_id_of_a_workdir_config_json_equals_the_arm_config():
  c = mechanism.get_config("arm=fp4_paper_ste,seed=1")
  saved = json.loads(json.dumps(c.to_dict()))     # as config.json holds it
  saved["data"]["tfds_data_dir"] = "/somewhere/_data/tfds"   # runner flags
  saved["data"]["tokenizer_model"] = "/somewhere/tok.model"
  assert run.arm_hash(saved) == run.arm_hash(c)
  # A key at its default value does not count (configs gain keys over time).
  saved["telemetry_every"] = 0
  assert run.arm_hash(saved) == run.arm_hash(c)
  saved["telemetry_every"] = 50
  assert run.arm_hash(saved) != run.arm_hash(c)


def test_arm_configs_apply_their_deltas():
  c = mechanism.get_config("arm=f32_proj_lr0.69,seed=2")
  assert (c.optim.proj_lr_scale, c.seed, c.quant.recipe,
          c.model.compute_dtype) == (0.69, 2, "bf16", "float32")
  c = lr_sweep.get_config("arm=fp4_paper_ste_lr0.003")
  assert c.optim.lr == 0.003 and dict(c.quant.overrides) == {"dge_k": None}
  assert lr_sweep.ARMS["fp4_paper_ste_lr0.003"].arg("lr") == 0.003
  with pytest.raises(ValueError, match="unknown arm"):
    mechanism.get_config("arm=nope")


def test_paired_differences_and_verdicts():
  base = {0: 5.0, 1: 5.2, 2: 4.8}
  better = run.paired({0: 4.95, 1: 5.1, 2: 4.79}, base)
  assert better["n"] == 3 and better["verdict"] == "better"
  assert better["per_seed"][0] == pytest.approx(-1.0)
  mixed = run.paired({0: 4.95, 1: 5.3, 2: 4.8}, base)
  assert mixed["verdict"] == "no difference"
  one = run.paired({0: 5.5}, base)
  assert one["verdict"].startswith("1 seed") and one["std"] is None
  assert run.paired({7: 1.0}, base) is None   # no common seed


def test_final_val_reads_the_last_step_and_skips_a_torn_line(tmp_path):
  recs = [{"step": 100, "loss": 5.0, "val_loss": 5.5},
          {"step": 200, "loss": 4.9}, {"step": 200, "val_loss": 5.25}]
  text = "".join(json.dumps(r) + "\n" for r in recs) + '{"step": 2'
  (tmp_path / "metrics.jsonl").write_text(text)
  got = run.read_metrics(str(tmp_path))
  assert len(got) == 3
  assert run.final_val(got, 200) == 5.25
  assert run.final_val(got, 300) is None


def test_lr_arms_names_and_groups():
  arms = arms_lib.lr_arms({"a": "recipe=f32"}, (1e-3, 3e-4))
  assert list(arms) == ["a_lr0.001", "a_lr0.0003"]
  assert {a.group for a in arms.values()} == {"a"}


def test_best_lr_is_chosen_on_common_seeds(monkeypatch, tmp_path):
  r = run.Runner("lr_sweep", steps=200, seeds=1, root=str(tmp_path),
                 arms=None)
  # lr 1e-3 ran an easy seed 1 too; on the shared seed 0, 3e-3 is better.
  runs = {"f32_lr0.001": {"val": {0: 5.49, 1: 5.43}},
          "f32_lr0.003": {"val": {0: 5.48}}}
  summary = {"arms": {a: {"group": "f32", "lr": float(a[6:]),
                          "mean": float(sum(v["val"].values()) /
                                        len(v["val"]))}
                      for a, v in runs.items()}}
  best = r._best_lr(summary, runs)   # pylint: disable=W0212
  assert best["f32"]["arm"] == "f32_lr0.003"


def test_ledger_keeps_finished_runs_when_workdirs_are_gone(monkeypatch,
                                                           tmp_path):
  # No committed ledger here: only what this test writes counts.
  monkeypatch.setattr(run, "RESULTS", str(tmp_path / "committed"))
  results = tmp_path / "results"
  root = tmp_path / "root"
  r = run.Runner("lr_sweep", steps=200, seeds=1, root=str(root),
                 arms=["f32_lr0.001"], results=str(results))
  wd = r.workdir("f32_lr0.001", 0)
  (root / "arms").mkdir(parents=True)
  (tmp_path / "root" / "arms" / wd.rsplit("/", 1)[1]).mkdir()
  recs = [{"step": 100, "loss": 5.9}, {"step": 200, "loss": 5.4},
          {"step": 200, "val_loss": 5.47}]
  with open(f"{wd}/metrics.jsonl", "w") as f:
    f.write("".join(json.dumps(x) + "\n" for x in recs))
  first = r.collect()
  ledger = json.loads((results / "lr_sweep" / "finished.json").read_text())
  assert [e["val"] for e in ledger.values()] == [5.47]
  # A fresh machine: no workdir. Another experiment sharing the arm (the
  # mechanism's f32 is lr_sweep's f32_lr0.001) finds it in the ledger.
  fresh = run.Runner("mechanism", steps=200, seeds=1,
                     root=str(tmp_path / "empty"), arms=["f32"],
                     results=str(results))
  got = fresh.collect()
  assert got["f32"]["val"] == {0: 5.47} == first["f32_lr0.001"]["val"]
  assert got["f32"]["curves"][0] == [(100, 5.9), (200, 5.4)]
  # A different config (more steps) is not taken from the ledger.
  longer = run.Runner("mechanism", steps=300, seeds=1,
                      root=str(tmp_path / "empty"), arms=["f32"],
                      results=str(results))
  assert "f32" not in longer.collect()


# ------------------------------------- the command line, as a user meets it


@pytest.mark.parametrize("args, match", [
    (("nope",), "unknown experiment 'nope'; experiments: dge_k, "),
    (("arms",), "unknown experiment 'arms'"),           # a helper module
    (("recipes_gutenberg",), "unknown experiment"),     # a config, no arms
    (("mechanism", "--steps", "0"), "--steps must be >= 1, got 0"),
    (("mechanism", "--steps", "-5"), "--steps must be >= 1, got -5"),
    (("mechanism", "--seeds", "0"), "--seeds must be >= 1, got 0"),
    (("mechanism", "--seeds", "-2"), "--seeds must be >= 1, got -2"),
    (("mechanism", "--first_seed", "-1"), "--first_seed must be >= 0"),
    (("mechanism", "--first_seed", "3"), "--first_seed 3 leaves no seed"),
    (("mechanism", "--steps", "x"), "argument --steps: invalid int value"),
], ids=lambda a: " ".join(a) if isinstance(a, tuple) else "")
def test_a_bad_argument_is_one_error_line(tmp_path, args, match):
  # Today's defaults must not stand in for 0 or a negative count.
  r = _cli(*args, "--report_only", "--root", str(tmp_path / "root"))
  _one_error_line(r, match)
  assert not (tmp_path / "root").exists()


@pytest.mark.parametrize("how", ["flag", "env"])
def test_a_missing_corpus_is_one_line_saying_how_to_name_it(tmp_path, how):
  nowhere = tmp_path / "nowhere"
  args = ["mechanism", "--steps", "3", "--seeds", "1", "--arms", "f32",
          "--root", str(tmp_path / "root")]
  env = {}
  if how == "flag":
    args += ["--corpus", str(nowhere)]
  else:
    env = {"FP4JAX_CORPUS": str(nowhere)}
  r = _cli(*args, env=env)
  _one_error_line(r, f"corpus file gutenberg_en_train.txt not found in "
                  f"{nowhere}; name the folder holding it with --corpus DIR "
                  f"or FP4JAX_CORPUS=DIR")
  assert not (tmp_path / "root").exists()


def test_every_committed_arm_is_found_wherever_the_corpus_lies(tmp_path):
  # A clone in another folder, with or without the books: the same ids.
  elsewhere = tmp_path / "elsewhere"
  found = 0
  for name in sorted(os.listdir(run.RESULTS)):
    mod = importlib.import_module(f"experiments.{name}")
    ledger = json.loads(
        (pathlib.Path(run.RESULTS) / name / "finished.json").read_text())
    for key, e in ledger.items():
      c = mod.get_config(f"arm={e['arm']},seed={e['seed']},"
                         f"steps={e['steps']}")
      assert run.arm_hash(c) == key, (name, e)
      for files in ("train_files", "val_files"):
        c.data[files] = tuple(str(elsewhere / os.path.basename(p))
                              for p in c.data[files])
      assert run.arm_hash(c) == key, (name, e)
      found += 1
  assert found > 100


def test_report_only_elsewhere_reproduces_the_committed_table(tmp_path):
  results = tmp_path / "root" / "results"    # the default: under --root
  r = _cli("lr_sweep", "--report_only", "--root", str(tmp_path / "root"),
           env={"FP4JAX_CORPUS": str(tmp_path / "nowhere")})
  assert r.returncode == 0, r.stderr
  committed = pathlib.Path(run.RESULTS) / "lr_sweep"
  assert (json.loads((results / "lr_sweep" / "summary.json").read_text())
          == json.loads((committed / "summary.json").read_text()))
  table = (committed / "table.md").read_text()
  assert (results / "lr_sweep" / "table.md").read_text() == table
  assert r.stdout.startswith(table)    # printed, too


def test_workdirs_and_ledgers_of_earlier_runners_are_adopted(tmp_path):
  # Earlier runners keyed both by the corpus's path: a finished or killed
  # run of theirs still counts or resumes.
  root, results = tmp_path / "root", tmp_path / "results"
  r = run.Runner("mechanism", steps=5, seeds=2, root=str(root),
                 arms=["f32"], results=str(results))
  old_wd = root / "arms" / run.arm_hash(r.config("f32", 0), legacy=True)
  old_wd.mkdir(parents=True)
  (old_wd / "metrics.jsonl").write_text('{"step": 5, "val_loss": 6.0}\n')
  (results / "mechanism").mkdir(parents=True)
  (results / "mechanism" / "finished.json").write_text(json.dumps({
      run.arm_hash(r.config("f32", 1), legacy=True): {
          "arm": "f32", "seed": 1, "steps": 5, "val": 6.1, "curve": []}}))
  assert r.collect()["f32"]["val"] == {0: 6.0, 1: 6.1}
  assert not old_wd.exists()
  assert (root / "arms" / run.arm_hash(r.config("f32", 0))).is_dir()
  ledger = json.loads((results / "mechanism" / "finished.json").read_text())
  assert set(ledger) == {run.arm_hash(r.config("f32", s)) for s in (0, 1)}


def test_a_smoke_run_reports_under_its_root_and_prints_the_table(tmp_path):
  committed = pathlib.Path(run.RESULTS) / "mechanism"
  before = _snapshot(committed)
  root = tmp_path / "root"
  r = run.Runner("mechanism", steps=3, seeds=1, root=str(root),
                 arms=["f32"])
  _finished_workdir(r, "f32", 0, 6.5)
  # Nothing left to train: no corpus, tokenizer or training needed.
  out = _cli("mechanism", "--steps", "3", "--seeds", "1", "--arms", "f32",
             "--root", str(root))
  assert out.returncode == 0, out.stderr
  assert "| `f32` | 0.001 | 1 | 6.5000 |" in out.stdout
  assert f"results in {root / 'results' / 'mechanism'}" in out.stdout
  assert "at step 3" in (root / "results" / "mechanism" /
                         "table.md").read_text()
  # The committed findings are written only when named.
  assert _snapshot(committed) == before
  named = tmp_path / "named"
  out = _cli("mechanism", "--steps", "3", "--report_only", "--root",
             str(root), "--results", str(named))
  assert out.returncode == 0, out.stderr
  assert sorted(os.listdir(named / "mechanism")) == [
      "final_val.png", "finished.json", "loss_curves.png", "summary.json",
      "table.md"]
  assert _snapshot(committed) == before


def test_plots_show_single_points_and_the_paired_differences(tmp_path,
                                                            monkeypatch):
  pytest.importorskip("matplotlib")
  from matplotlib import collections  # pylint: disable=g-import-not-at-top
  from matplotlib import figure  # pylint: disable=g-import-not-at-top
  saved = {}
  savefig = figure.Figure.savefig

  def keep(fig, path, *args, **kwargs):
    saved[os.path.basename(path)] = fig
    return savefig(fig, path, *args, **kwargs)
  monkeypatch.setattr(figure.Figure, "savefig", keep)
  monkeypatch.setattr(run, "RESULTS", str(tmp_path / "committed"))
  r = run.Runner("mechanism", steps=10, seeds=2, root=str(tmp_path),
                 arms=None)
  # A short run: one logged point per seed.
  runs = {"f32": {"group": "f32", "lr": 1e-3, "val": {0: 5.0, 1: 5.2},
                  "curves": {0: [(10, 6.0)], 1: [(10, 6.2)]}},
          "fp4_paper": {"group": "fp4_paper", "lr": 1e-3,
                        "val": {0: 4.95, 1: 5.1},
                        "curves": {0: [(10, 5.9)], 1: [(10, 6.1)]}}}
  monkeypatch.setattr(r, "collect", lambda: runs)
  r.report()
  lines = saved["loss_curves.png"].axes[0].lines
  assert len(lines) == 2
  assert all(line.get_marker() not in (None, "None", "", " ")
             for line in lines)
  fig = saved["final_val.png"]
  assert "mechanism" in fig.get_suptitle()
  paired = fig.axes[1]
  assert "paired by seed vs f32" in paired.get_title()
  xs = sorted(float(x) for c in paired.collections
              if isinstance(c, collections.PathCollection)   # the dots
              for x, _ in c.get_offsets())
  # fp4_paper vs f32 per seed (dots), in %: -1.0 and -1.92.
  assert xs == pytest.approx([-100 * 0.1 / 5.2, -1.0], abs=1e-6)


def _text_corpus(path: pathlib.Path) -> None:
  words = "the quick brown fox jumps over a lazy dog while it sleeps".split()
  lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12))
           for i in range(400)]
  path.write_text("".join("\n".join(lines[i:i + 10]) + "\n<|endoftext|>\n"
                          for i in range(0, 400, 10)))


@pytest.mark.entry
def test_a_run_log_is_quiet_and_ends_with_a_summary_line(tmp_path):
  # An arm's log.txt is fp4jax.main's output, not a terminal; the runner
  # prints its last line after each arm.
  corpus = tmp_path / "corpus.txt"
  _text_corpus(corpus)
  wd = tmp_path / "run"
  r = subprocess.run(
      [sys.executable, "-m", "fp4jax.main",
       "--config=configs/demo.py:smoke,recipe=bf16", f"--workdir={wd}",
       "--config.data.source=text_files",
       f"--config.data.train_files={corpus}", "--config.data.vocab_size=300",
       "--config.data.val_fraction=0.1", "--config.num_steps=2"],
      cwd=ROOT, capture_output=True, text=True, timeout=600)
  log = r.stdout + r.stderr
  assert r.returncode == 0, log
  for noise in ("Downloading and preparing", "downloaded and prepared",
                "Using custom data configuration", "has no dataset_info",
                "\r", "\x1b["):
    assert noise not in log, noise
  last = r.stderr.strip().splitlines()[-1]
  assert last.startswith("finished: step 2/2 | loss "), log
  assert " | val " in last and " | 512 tokens | " in last
  assert last.endswith(f" | checkpoint {wd / 'checkpoints' / '2'}")
