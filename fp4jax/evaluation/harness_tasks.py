"""The local task files as stock lm-evaluation-harness tasks, offline.

lm-eval's own `piqa`, `hellaswag`, ... download their data from the
Hugging Face hub. `write(data_dir, out_dir, names)` turns the files that
`fp4jax.evaluation.tasks` reads into a folder lm-eval loads with
`--include_path out_dir`: per task a JSON-lines file of the documents and
a task config `fp4jax_<name>.yaml` (JSON, which is YAML) that reads it
with the `json` dataset builder. The harness then builds the requests,
calls the model and computes the metrics itself, so its numbers are an
independent check of `python -m fp4jax.evaluate` on the same items.

Documents hold what our readers produce: the prompt (`context`), the
choice texts without lm-eval's target delimiter (`choices`, the harness
prepends its " " as for its own tasks and normalises `acc_norm` by their
length) and `gold`. LAMBADA becomes a `loglikelihood` task (`target` " "
+ the last word; `acc` is "greedy", `perplexity` exp(-mean log p)), as
lm-eval's `lambada_openai`.

Must not import: jax, lm_eval (this only writes files).
"""

from __future__ import annotations

import json
import os

from fp4jax.evaluation import tasks

PREFIX = "fp4jax_"

_MEAN = {"aggregation": "mean", "higher_is_better": True}


def task_name(name: str) -> str:
  """The harness task name of one of `tasks.TASKS`."""
  return PREFIX + name


def _config(name: str, docs_path: str) -> dict:
  config = {
      "task": task_name(name),
      "dataset_path": "json",
      "dataset_kwargs": {"data_files": {"test": docs_path}},
      "test_split": "test",
      "doc_to_text": "context",
      "target_delimiter": tasks.DELIMITER,
  }
  if tasks.TASKS[name].kind == "lambada":
    config.update(
        output_type="loglikelihood", doc_to_target="target",
        target_delimiter="",
        metric_list=[{"metric": "perplexity", "aggregation": "perplexity",
                      "higher_is_better": False},
                     {"metric": "acc", **_MEAN}])
  else:
    config.update(
        output_type="multiple_choice", doc_to_choice="choices",
        doc_to_target="gold",
        metric_list=[{"metric": "acc", **_MEAN},
                     {"metric": "acc_norm", **_MEAN}])
  return config


def _doc(name: str, item: tasks.Item) -> dict:
  if tasks.TASKS[name].kind == "lambada":
    # A loglikelihood task's request is (context, doc_to_target) as it is:
    # the harness prepends no delimiter there (lm-eval's lambada_openai
    # puts the space into its target too).
    return {"context": item.context, "target": item.choices[0]}
  return {"context": item.context, "choices": list(item.choice_texts()),
          "gold": item.gold}


def write(data_dir: str, out_dir: str, names: list[str],
          limit: int | None = None) -> list[str]:
  """Writes `out_dir/<name>.jsonl` and `out_dir/fp4jax_<name>.yaml` for
  each task in `names` (text-file `ppl` has no harness twin); returns the
  harness task names. Raises ValueError naming an unknown task or a
  missing / malformed file, before anything is written."""
  loaded = {n: tasks.load(n, data_dir, limit) for n in names}
  os.makedirs(out_dir, exist_ok=True)
  for name, items in loaded.items():
    docs_path = os.path.abspath(os.path.join(out_dir, f"{name}.jsonl"))
    with open(docs_path, "w", encoding="utf-8") as f:
      for item in items:
        f.write(json.dumps(_doc(name, item), ensure_ascii=False) + "\n")
    with open(os.path.join(out_dir, f"{task_name(name)}.yaml"), "w",
              encoding="utf-8") as f:
      json.dump(_config(name, docs_path), f, indent=1)
  return [task_name(n) for n in names]
