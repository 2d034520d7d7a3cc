"""The experiment runner's bookkeeping: arm configs, dedup ids, paired
statistics and verdicts (no training here; the arms are plain configs)."""

import json

import pytest

from experiments import arms as arms_lib
from experiments import lr_sweep
from experiments import mechanism
from experiments import run


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
  results = tmp_path / "results"
  monkeypatch.setattr(run, "RESULTS", str(results))
  root = tmp_path / "root"
  r = run.Runner("lr_sweep", steps=200, seeds=1, root=str(root),
                 arms=["f32_lr0.001"])
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
                     root=str(tmp_path / "empty"), arms=["f32"])
  got = fresh.collect()
  assert got["f32"]["val"] == {0: 5.47} == first["f32_lr0.001"]["val"]
  assert got["f32"]["curves"][0] == [(100, 5.9), (200, 5.4)]
  # A different config (more steps) is not taken from the ledger.
  longer = run.Runner("mechanism", steps=300, seeds=1,
                      root=str(tmp_path / "empty"), arms=["f32"])
  assert "f32" not in longer.collect()
