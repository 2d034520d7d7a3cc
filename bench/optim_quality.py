"""Final validation loss: paper optimizer moments vs f32 moments.

Trains the Gutenberg config (the demo model) once per moment mode through the
command line entry point, then prints the final validation loss of each run,
read from `<workdir>/metrics.jsonl` (the last record with a "val_loss" key):

  python bench/optim_quality.py --out_dir=runs/optim_quality
  python bench/optim_quality.py --steps=50 --override=config.seed=1

Each run is `python -m fp4jax.main --config=configs/gutenberg.py
--workdir=<out_dir>/<mode> --config.optim.moments=<mode>
--config.num_steps=<steps>` plus any --override flags. Workdirs must be new
so no run resumes from an older checkpoint.

Uses only the standard library; the training itself runs in subprocesses.
"""

import argparse
import json
import pathlib
import subprocess
import sys
import tempfile

_ROOT = pathlib.Path(__file__).resolve().parents[1]


def final_val_loss(metrics_path: pathlib.Path) -> tuple[int | None, float]:
  """(step, val_loss) of the last record of a metrics.jsonl with val_loss.

  Raises:
    ValueError: the file is missing, has a bad line, or no val_loss record.
  """
  if not metrics_path.is_file():
    raise ValueError(f"metrics file {metrics_path} does not exist")
  last = None
  with metrics_path.open() as f:
    for n, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{metrics_path}:{n}: not JSON ({e})") from e
      if isinstance(rec, dict) and "val_loss" in rec:
        last = rec
  if last is None:
    raise ValueError(f"{metrics_path} has no record with 'val_loss'")
  return last.get("step"), float(last["val_loss"])


def train(mode: str, workdir: pathlib.Path, args: argparse.Namespace) -> None:
  """Runs one training job in a subprocess; raises if it fails."""
  if workdir.exists() and any(workdir.iterdir()):
    raise ValueError(f"--out_dir: workdir {workdir} is not empty; a run "
                     "there would resume instead of starting fresh")
  cmd = [args.python, "-m", "fp4jax.main", f"--config={args.config}",
         f"--workdir={workdir}", f"--config.optim.moments={mode}",
         f"--config.num_steps={args.steps}"]
  cmd += [f"--{o}" for o in args.override]
  print("+", " ".join(cmd), flush=True)
  subprocess.run(cmd, cwd=_ROOT, check=True)


def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out_dir", type=pathlib.Path, default=None,
                      help="parent of the per-mode workdirs (default: new "
                      "temporary directory)")
  parser.add_argument("--steps", type=int, default=300,
                      help="training steps per run")
  parser.add_argument("--modes", default="paper,fp32",
                      help="comma-separated optim.moments values")
  parser.add_argument("--config", default="configs/gutenberg.py",
                      help="config file, relative to the repository root")
  parser.add_argument("--override", action="append", default=[],
                      help="extra config override without the leading "
                      "dashes, e.g. config.seed=1 (repeatable)")
  parser.add_argument("--python", default=sys.executable,
                      help="interpreter that runs fp4jax.main")
  args = parser.parse_args(argv)
  if args.steps < 1:
    parser.error(f"--steps must be >= 1, got {args.steps}")
  modes = [m for m in args.modes.split(",") if m]
  if not modes:
    parser.error("--modes is empty")
  out_dir = args.out_dir or pathlib.Path(
      tempfile.mkdtemp(prefix="optim_quality_"))
  out_dir = out_dir.resolve()

  results = {}
  for mode in modes:
    workdir = out_dir / mode
    train(mode, workdir, args)
    results[mode] = final_val_loss(workdir / "metrics.jsonl")

  print(f"\nfinal validation loss after {args.steps} steps "
        f"({args.config}; workdirs under {out_dir})")
  print(f"{'optim.moments':<14} {'step':>6} {'val_loss':>10}")
  for mode, (step, loss) in results.items():
    print(f"{mode:<14} {str(step):>6} {loss:>10.4f}")
  if "paper" in results and "fp32" in results:
    paper, ref = results["paper"][1], results["fp32"][1]
    print(f"paper - fp32: {paper - ref:+.4f} "
          f"({100 * (paper - ref) / ref:+.2f}% of fp32)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
