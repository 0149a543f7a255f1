r"""Runs a grid of training runs (a sweep), then collects a results table and plots.

    python scripts/sweep.py --config configs/sweeps/mqar_mechanisms.py
    python scripts/sweep.py --config configs/mqar.py --axis data.seq_len=64,128 \
        --axis model.attention.window=16,32 --set train.steps=300 --workdir runs/sweeps/windows
    python scripts/sweep.py --config configs/mqar.py --set model.num_layers=4 \
        --axis 'model.pattern=3*lightning,softmax;softmax,3*lightning'

A sweep is a base config plus axes of overrides; every combination is a variant that trains in
its own workdir, named from its overrides (`<sweep workdir>/attention=mha,seq_len=64,...`).
--config is either a sweep file (defines `get_sweep()`, see configs/sweeps/) or an ordinary
config file, whose axes then come from --axis; --set adds fixed overrides to either. An axis'
values are separated by commas, or by semicolons when one of them holds commas (a hybrid
stack's model.pattern, whose values must use ';').

Modes:
  --mode=sequential   one variant after another (default when there is one accelerator).
  --mode=parallel     one process per local accelerator (--parallel=N processes; on GPUs each
                      sees one device through CUDA_VISIBLE_DEVICES, on TPU VMs one chip;
                      --per_device=K runs K processes on each GPU, for small models).
  --mode=script       writes one launch command per variant to <workdir>/launch.sh (run the
                      lines on a cluster, a job array, or every host of a TPU pod slice) and
                      stops; collect afterwards with --mode=collect.
  --mode=collect      only collects finished variants into the table and plots.
--filter=REGEX runs (or collects) only the variants whose name matches.

Resumable: a variant whose eval.json is at its final step is skipped; an interrupted one is
started again with the same command and train.py resumes it from its latest checkpoint.

Outputs in the sweep workdir: results.csv, results_over_seeds.csv (mean, std, min, max, n of the
metric per cell without the seed axis), results.md (the best quality per series and sequence
length as mean +- std over seeds of the best `select` setting, e.g. the learning rate, named in
the cell; every cell over seeds; every variant), accuracy_vs_seq_len.png,
tokens_per_sec_vs_seq_len.png, frontier.png (quality vs throughput) and each variant's own
workdir with sweep.log.
"""

from __future__ import annotations

import concurrent.futures
import csv
import dataclasses
import glob
import importlib.util
import itertools
import json
import os
import queue
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
from typing import Any

from absl import app, flags

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_CONFIG = flags.DEFINE_string("config", None, "Sweep file (get_sweep()) or config file.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory; default runs/sweeps/<name>.")
_AXIS = flags.DEFINE_multi_string("axis", [], "key=v1,v2,...: one more axis of the grid "
                                   "(key=v1;v2;... when a value holds commas, e.g. a "
                                   "model.pattern).")
_SET = flags.DEFINE_multi_string("set", [], "key=value: a fixed override of every variant.")
_MODE = flags.DEFINE_enum("mode", None, ["sequential", "parallel", "script", "collect"],
                          "How to run; default: parallel when several accelerators are seen.")
_PARALLEL = flags.DEFINE_integer("parallel", 0, "Processes for --mode=parallel (0: one per "
                                 "local accelerator).")
_PER_DEVICE = flags.DEFINE_integer("per_device", 1, "Processes sharing each accelerator in "
                                   "--mode=parallel (small models leave a GPU mostly idle); "
                                   "each gets 1/N of its memory.")
_EVAL_TASKS = flags.DEFINE_list("eval_tasks", None, "Eval tasks run after training (default: "
                                "the sweep file's, else accuracy).")
_FILTER = flags.DEFINE_string("filter", None, "Regex: run only variants whose name matches "
                              "(re.search), e.g. 'attention=(mha|linear),'.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the variants and commands, run nothing.")
flags.mark_flags_as_required(["config"])


# ----------------------------------------------------------------------------- the grid


@dataclasses.dataclass(frozen=True)
class Variant:
  """One point of the grid: its name, its labels per axis and its config overrides."""

  name: str
  labels: dict[str, str]  # axis -> value label
  overrides: dict[str, Any]  # dotted config key -> value

  def value(self, key: str) -> Any:
    return self.overrides.get(key)


@dataclasses.dataclass
class Sweep:
  name: str
  config: str  # path of the base config file
  axes: dict[str, list]  # axis -> values (scalars, or dicts of overrides with "label")
  fixed: dict[str, Any] = dataclasses.field(default_factory=dict)
  eval_tasks: tuple[str, ...] = ("accuracy",)
  plot_x: str | None = None  # dotted key on the x axis of the plots
  plot_series: str | None = None  # axis whose values are the lines of the plots
  metric: str = "eval_accuracy"  # column plotted as quality
  # Axes tuned per cell: the value with the best mean over seeds is reported (Zoology's best
  # learning rate per mechanism). None: every axis other than plot_x, plot_series and seed.
  # Axes in neither role stay in the tables and get a panel each in the plots.
  select: tuple[str, ...] | None = None

  @property
  def higher_is_better(self) -> bool:
    return not any(word in self.metric for word in ("loss", "perplexity"))


def short_key(key: str) -> str:
  return key.rsplit(".", 1)[-1]


def format_value(value: Any) -> str:
  if isinstance(value, float):
    return f"{value:g}"
  return str(value)


def _axis_entries(axis: str, values: list) -> list[tuple[str, dict[str, Any]]]:
  """(label, overrides) per value of an axis."""
  entries = []
  for value in values:
    if isinstance(value, dict):
      overrides = {k: v for k, v in value.items() if k != "label"}
      label = value.get("label") or ",".join(format_value(v) for v in overrides.values())
    else:
      overrides, label = {axis: value}, format_value(value)
    entries.append((str(label), overrides))
  return entries


def expand(sweep: Sweep, pattern: str | None = None) -> list[Variant]:
  """Every combination of the axes, in order (the last axis varies fastest); with `pattern`,
  only the variants whose name matches it (re.search)."""
  if not sweep.axes:
    raise ValueError("the sweep has no axes: give --axis key=v1,v2 or axes in get_sweep()")
  per_axis = [_axis_entries(axis, values) for axis, values in sweep.axes.items()]
  for axis, entries in zip(sweep.axes, per_axis):
    if not entries:
      raise ValueError(f"sweep axis {axis!r} has no values")
    labels = [label for label, _ in entries]
    if len(set(labels)) != len(labels):
      raise ValueError(f"sweep axis {axis!r} has repeated labels {labels}: give each dict "
                       f"value a distinct 'label'")
  variants = []
  for combo in itertools.product(*per_axis):
    labels, overrides = {}, dict(sweep.fixed)
    for axis, (label, values) in zip(sweep.axes, combo):
      labels[axis] = label
      overrides.update(values)
    name = ",".join(f"{short_key(axis)}={label}" for axis, label in labels.items())
    variants.append(Variant(name=name.replace("/", "_").replace(" ", ""), labels=labels,
                            overrides=overrides))
  if pattern:
    variants = [v for v in variants if re.search(pattern, v.name)]
    if not variants:
      raise ValueError(f"--filter={pattern!r} matches no variant of sweep {sweep.name!r}")
  return variants


def parse_value(text: str) -> Any:
  """'3e-3' -> 0.003, '64' -> 64, 'true' -> True, 'none' -> None, else the string."""
  lowered = text.strip().lower()
  if lowered in ("true", "false"):
    return lowered == "true"
  if lowered == "none":
    return None
  for kind in (int, float):
    try:
      return kind(text)
    except ValueError:
      pass
  return text.strip()


def parse_assignment(text: str, flag: str) -> tuple[str, str]:
  if "=" not in text:
    raise ValueError(f"--{flag}={text!r} must look like key=value (e.g. data.seq_len=64,128)")
  key, value = text.split("=", 1)
  return key.strip().removeprefix("config."), value


def split_axis_values(key: str, text: str) -> list[str]:
  """The values of `--axis key=text`: split on ';' when text holds one (so that a value can hold
  commas, as a model.pattern does: 'model.pattern=3*lightning,softmax;softmax'), else on ','.
  One trailing separator is allowed ('model.pattern=3*lightning,softmax;' is one value)."""
  sep = ";" if ";" in text else ","
  if sep == "," and key == "model.pattern" and "," in text:
    raise ValueError(f"--axis={key}={text}: a pattern's entries are separated by commas, so "
                     f"separate the axis' values with ';' (e.g. --axis '{key}=3*lightning,softmax;"
                     "softmax'; a trailing ';' makes one value)")
  values = [v.strip() for v in text.split(sep)]
  if len(values) > 1 and not values[-1]:
    values.pop()
  if "" in values:
    raise ValueError(f"--axis={key}={text}: an empty value; write key=v1,v2 or, when a value "
                     "holds commas, key=v1;v2 (quoted for the shell)")
  return values


def _load_module(path: str):
  spec = importlib.util.spec_from_file_location(f"_sweep_{abs(hash(path))}", path)
  module = importlib.util.module_from_spec(spec)
  if ROOT not in sys.path:  # sweep files import `configs`
    sys.path.insert(0, ROOT)
  spec.loader.exec_module(module)
  return module


def load_sweep(path: str, axes: list[str], sets: list[str]) -> Sweep:
  """The sweep of a sweep file (get_sweep()) or a config file, plus command-line axes/sets."""
  if not os.path.exists(path):
    raise ValueError(f"--config={path!r} does not exist")
  module = _load_module(path)
  name = os.path.splitext(os.path.basename(path))[0]
  if hasattr(module, "get_sweep"):
    spec = dict(module.get_sweep())
    config = spec.pop("config")
    if not os.path.isabs(config):
      config = os.path.join(ROOT, config)
    sweep = Sweep(name=spec.pop("name", name), config=config, axes=dict(spec.pop("axes", {})),
                  fixed=dict(spec.pop("fixed", {})),
                  eval_tasks=tuple(spec.pop("eval_tasks", ("accuracy",))),
                  plot_x=spec.pop("plot_x", None), plot_series=spec.pop("plot_series", None),
                  metric=spec.pop("metric", "eval_accuracy"))
    if "select" in spec:
      sweep.select = tuple(spec.pop("select"))
    if spec:
      raise ValueError(f"{path}: get_sweep() has unknown keys {sorted(spec)}; known: config, "
                       f"name, axes, fixed, eval_tasks, plot_x, plot_series, metric, select")
    unknown = [a for a in sweep.select or () if a not in sweep.axes]
    if unknown:
      raise ValueError(f"{path}: get_sweep()'s select names {unknown}, which are not axes of "
                       f"the sweep; give axes from {sorted(sweep.axes)}")
  elif hasattr(module, "get_config"):
    sweep = Sweep(name=name, config=os.path.abspath(path), axes={})
  else:
    raise ValueError(f"--config={path!r} defines neither get_sweep() nor get_config()")
  for text in axes:
    key, values = parse_assignment(text, "axis")
    sweep.axes[key] = [parse_value(v) for v in split_axis_values(key, values)]
  for text in sets:
    key, value = parse_assignment(text, "set")
    sweep.fixed[key] = parse_value(value)
  return sweep


# ----------------------------------------------------------------------------- commands


def override_flags(overrides: dict[str, Any]) -> list[str]:
  """--config.key=value flags. None leaves the field at the config file's value: config_flags
  cannot parse None for typed fields (e.g. model.attention.window), and None is their default."""
  return [f"--config.{k}={repr(v) if isinstance(v, float) else format_value(v)}"
          for k, v in overrides.items() if v is not None]


def commands(sweep: Sweep, variant: Variant, workdir: str) -> list[list[str]]:
  """train.py, then eval.py once per eval task, for one variant."""
  train = [sys.executable, os.path.join(ROOT, "train.py"), f"--config={sweep.config}",
           f"--workdir={workdir}", "--config.train.progress_bar=False",
           *override_flags(variant.overrides)]
  evals = [[sys.executable, os.path.join(ROOT, "eval.py"), f"--workdir={workdir}",
            f"--config.eval.task={task}"] for task in sweep.eval_tasks]
  return [train, *evals]


def _report_name(task: str) -> str:
  return "eval.json" if task == "accuracy" else f"eval_{task}.json"


def _read_json(path: str) -> dict | None:
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, json.JSONDecodeError):
    return None


def is_done(sweep: Sweep, workdir: str) -> bool:
  """Trained to its final step and every eval report written at that step."""
  config = _read_json(os.path.join(workdir, "config.json"))
  if config is None:
    return False
  steps = config["train"]["steps"]
  for task in sweep.eval_tasks:
    report = _read_json(os.path.join(workdir, _report_name(task)))
    if report is None or report.get("step") != steps:
      return False
  return True


def check_same_variant(variant: Variant, workdir: str) -> None:
  """A workdir belongs to one set of overrides; a changed sweep must not resume it silently."""
  path = os.path.join(workdir, "variant.json")
  saved = _read_json(path)
  current = json.loads(json.dumps(variant.overrides, default=str))
  if saved is not None and saved.get("overrides") != current:
    raise ValueError(f"{workdir} was run with other overrides ({saved.get('overrides')}); "
                     f"delete it or use another --workdir")
  if saved is None:
    os.makedirs(workdir, exist_ok=True)
    with open(path, "w") as f:
      json.dump({"name": variant.name, "labels": variant.labels, "overrides": current}, f,
                indent=2)


def run_variant(sweep: Sweep, variant: Variant, workdir: str, env: dict[str, str]) -> dict:
  """Runs the variant's commands (output appended to sweep.log); -> status and wall time."""
  check_same_variant(variant, workdir)
  if is_done(sweep, workdir):
    return {"status": "skipped", "seconds": 0.0}
  t0 = time.perf_counter()
  with open(os.path.join(workdir, "sweep.log"), "a") as log:
    for cmd in commands(sweep, variant, workdir):
      log.write(f"$ {shlex.join(cmd)}\n")
      log.flush()
      rc = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
      if rc:
        return {"status": f"failed (exit {rc}, see {workdir}/sweep.log)",
                "seconds": time.perf_counter() - t0}
  seconds = time.perf_counter() - t0
  info = _read_json(os.path.join(workdir, "variant.json")) or {}
  info["seconds"] = info.get("seconds", 0.0) + seconds
  with open(os.path.join(workdir, "variant.json"), "w") as f:
    json.dump(info, f, indent=2)
  return {"status": "done", "seconds": seconds}


def write_launch_script(sweep: Sweep, variants: list[Variant], sweep_dir: str) -> str:
  """One self-contained line per variant (`cd repo && train && eval ...`): variant k (from 0)
  is line k + 3, so `sed -n "$((k + 3))p" launch.sh | bash` runs it (a job array), `bash
  launch.sh` runs them all in turn, and `tail -n +3 launch.sh | xargs -P 4 -I{} bash -c {}`
  four at a time. On a TPU pod slice run a line on every host, with --set
  mesh.distributed=True."""
  path = os.path.join(sweep_dir, "launch.sh")
  lines = ["#!/usr/bin/env bash",
           f"# sweep {sweep.name}: {len(variants)} variants; variant k (from 0) is line k + 3"]
  for v in variants:
    steps = [shlex.join(c) for c in commands(sweep, v, os.path.join(sweep_dir, v.name))]
    lines.append(" && ".join([f"cd {shlex.quote(ROOT)}", *steps]))
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  os.chmod(path, 0o755)
  return path


# ----------------------------------------------------------------------------- devices


def local_accelerators() -> tuple[str, list[str]]:
  """('gpu', ids) from CUDA_VISIBLE_DEVICES / nvidia-smi, ('tpu', chips), or ('cpu', [])."""
  visible = os.environ.get("CUDA_VISIBLE_DEVICES")
  if visible:
    return "gpu", [d for d in visible.split(",") if d.strip()]
  if shutil.which("nvidia-smi"):
    try:
      out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, timeout=20)
      ids = [str(i) for i, line in enumerate(out.stdout.splitlines()) if line.startswith("GPU")]
      if ids:
        return "gpu", ids
    except (OSError, subprocess.SubprocessError):
      pass
  chips = sorted(glob.glob("/dev/accel*")) or sorted(glob.glob("/dev/vfio/[0-9]*"))
  if chips:
    return "tpu", [str(i) for i in range(len(chips))]
  return "cpu", []


def device_env(kind: str, device: str | None, slot: int, per_device: int = 1) -> dict[str, str]:
  env = dict(os.environ)
  env.setdefault("PYTHONUNBUFFERED", "1")
  if device is None:
    return env
  if kind == "gpu":
    env["CUDA_VISIBLE_DEVICES"] = device
    if per_device > 1:  # share the GPU: allocate on demand, leave room for CUDA graphs
      env["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
      env["XLA_PYTHON_CLIENT_MEM_FRACTION"] = f"{0.8 / per_device:.3f}"
  elif kind == "tpu":  # one chip per process on a TPU VM
    env.update(TPU_VISIBLE_CHIPS=device, TPU_CHIPS_PER_PROCESS_BOUNDS="1,1,1",
               TPU_PROCESS_BOUNDS="1,1,1", TPU_PROCESS_PORT=str(8476 + slot),
               TPU_PROCESS_ADDRESSES=f"localhost:{8476 + slot}")
  return env


# ----------------------------------------------------------------------------- results


def _tokens_per_sec(rows: list[dict]) -> tuple[float | None, float | None, float | None]:
  """Median tokens/s, step time and MFU of the logged intervals, the first (compile) dropped."""
  train = [r for r in rows if "train/tokens_per_sec" in r]
  steady = train[1:] or train

  def median(key):
    values = sorted(r[key] for r in steady if key in r)
    return values[len(values) // 2] if values else None

  return median("train/tokens_per_sec"), median("train/step_time"), median("train/mfu")


def collect_row(sweep: Sweep, variant: Variant, workdir: str) -> dict:
  from effattn.train.metrics import read_metrics

  row: dict[str, Any] = {"variant": variant.name}
  for axis, label in variant.labels.items():  # scalar axes keep their value, dict axes a label
    row[axis] = variant.overrides.get(axis, label)
  rows = read_metrics(workdir) if os.path.isdir(workdir) else []
  report = _read_json(os.path.join(workdir, "eval.json"))
  train_rows = [r for r in rows if "train/loss" in r]
  eval_rows = [r for r in rows if "eval/loss" in r]
  config = _read_json(os.path.join(workdir, "config.json"))
  info = _read_json(os.path.join(workdir, "variant.json")) or {}
  row["status"] = ("done" if is_done(sweep, workdir) else
                   "partial" if train_rows else "pending")
  x_key = sweep.plot_x or "data.seq_len"
  if x_key not in row:  # the plots' x value, from the run's saved config when not an axis
    node = config
    for part in x_key.split("."):
      node = node.get(part) if isinstance(node, dict) else None
    row[x_key] = node if node is not None else variant.value(x_key)
  row["step"] = train_rows[-1]["step"] if train_rows else None
  row["train_loss"] = train_rows[-1]["train/loss"] if train_rows else None
  source = report or ({k.removeprefix("eval/"): v for k, v in eval_rows[-1].items()}
                      if eval_rows else {})
  for key in ("accuracy", "loss", "perplexity"):
    row[f"eval_{key}"] = source.get(key)
  for task in (t for t in sweep.eval_tasks if t != "accuracy"):
    # Another task's headline numbers (its report's "summary", e.g. the attention entropy).
    extra = _read_json(os.path.join(workdir, _report_name(task))) or {}
    row.update({f"eval_{key}": value for key, value in (extra.get("summary") or {}).items()})
  row["tokens_per_sec"], row["step_time"], row["mfu"] = _tokens_per_sec(rows)
  row["wall_seconds"] = info.get("seconds")
  row["workdir"] = workdir
  return row


def write_csv(rows: list[dict], path: str) -> None:
  columns = list(dict.fromkeys(k for r in rows for k in r))
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, columns)
    writer.writeheader()
    writer.writerows(rows)


def _cell(value: Any) -> str:
  if value is None:
    return ""
  if isinstance(value, float):
    return f"{value:.4g}" if abs(value) < 1e4 else f"{value:,.0f}"
  return str(value)


def markdown_table(rows: list[dict], columns: list[str]) -> str:
  lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
  lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
  return "\n".join(lines)


def _is_seed_axis(axis: str) -> bool:
  return short_key(axis) == "seed"


def plot_roles(sweep: Sweep) -> tuple[str, str | None]:
  """(x column, series axis) of the plots."""
  x_col = sweep.plot_x or "data.seq_len"
  series = sweep.plot_series
  if series is None:
    others = [a for a in sweep.axes if a != x_col and not _is_seed_axis(a)]
    series = others[0] if others else None
  return x_col, series


def axis_roles(sweep: Sweep) -> dict[str, Any]:
  """x, series, the seed axes (averaged over), the select axes (best mean picked) and the panel
  axes (every other axis: kept in the tables, a panel each in the plots)."""
  x_col, series = plot_roles(sweep)
  seeds = [a for a in sweep.axes if _is_seed_axis(a)]
  rest = [a for a in sweep.axes if a not in (x_col, series) and a not in seeds]
  select = rest if sweep.select is None else [a for a in rest if a in sweep.select]
  return {"x": x_col, "series": series, "seeds": seeds, "select": select,
          "panels": [a for a in rest if a not in select]}


def seed_stats(values: list[float]) -> dict[str, Any]:
  """mean, sample standard deviation (None for a single value), min, max and n."""
  n = len(values)
  mean = sum(values) / n
  std = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5 if n > 1 else None
  return {"mean": mean, "std": std, "min": min(values), "max": max(values), "n": n}


def _median(values: list[float]) -> float | None:
  values = sorted(values)
  return values[len(values) // 2] if values else None


def over_seeds(sweep: Sweep, rows: list[dict]) -> list[dict]:
  """One row per cell of the grid without its seed axes (in the variants' order): every other
  axis' value, the metric's seed_stats over the cell's finished runs and their median tokens/s."""
  roles = axis_roles(sweep)
  keys = list(dict.fromkeys([*(a for a in sweep.axes if a not in roles["seeds"]), roles["x"]]))
  metric = sweep.metric
  cells: dict[tuple, list[dict]] = {}
  for r in rows:
    if r["status"] == "done" and r.get(metric) is not None:
      cells.setdefault(tuple(r.get(k) for k in keys), []).append(r)
  return [{**dict(zip(keys, cell)), **seed_stats([r[metric] for r in rs]),
           "tokens_per_sec": _median([r["tokens_per_sec"] for r in rs if r.get("tokens_per_sec")])}
          for cell, rs in cells.items()]


def aggregate(sweep: Sweep, rows: list[dict]) -> list[dict]:
  """One point per (series, panel, x): quality = the mean over seeds of the best setting of the
  select axes (its std, min, max and n beside it, the setting in "best"); throughput = median
  over every run of the group."""
  roles = axis_roles(sweep)
  x_col, series, panels, select = roles["x"], roles["series"], roles["panels"], roles["select"]
  better = max if sweep.higher_is_better else min
  groups: dict[tuple, list[dict]] = {}
  for cell in over_seeds(sweep, rows):
    key = (cell.get(series, "all") if series else "all", tuple(cell.get(a) for a in panels),
           cell.get(x_col))
    groups.setdefault(key, []).append(cell)
  tps: dict[tuple, list[float]] = {}
  for r in rows:
    if r["status"] == "done" and r.get(sweep.metric) is not None and r.get("tokens_per_sec"):
      key = (r.get(series, "all") if series else "all", tuple(r.get(a) for a in panels),
             r.get(x_col))
      tps.setdefault(key, []).append(r["tokens_per_sec"])
  points = []
  for key, cells in groups.items():
    best = better(cells, key=lambda c: c["mean"])  # the first of equal means
    points.append({"series": key[0], "panel": dict(zip(panels, key[1])), "x": key[2],
                   "quality": best["mean"], "std": best["std"], "min": best["min"],
                   "max": best["max"], "seeds": best["n"],
                   "best": {a: best.get(a) for a in select},
                   "tokens_per_sec": _median(tps.get(key, []))})
  return sorted(points, key=lambda p: (str(p["series"]), _panel_key(p["panel"]),
                                       _sort_key(p["x"])))


def _panel_key(panel: dict) -> tuple:
  return tuple(_sort_key(v) for v in panel.values())


def panel_title(panel: dict) -> str:
  return ", ".join(f"{short_key(a)} = {format_value(v)}" for a, v in panel.items())


def _sort_key(x: Any):
  return (0, float(x), "") if isinstance(x, (int, float)) else (1, 0.0, str(x))


def _numeric(values) -> bool:
  return all(isinstance(v, (int, float)) for v in values)


def pareto(points: list[tuple[float, float]], higher_is_better: bool = True
           ) -> list[tuple[float, float]]:
  """Points (throughput, quality) that no other point beats in both, by decreasing throughput."""
  sign = 1.0 if higher_is_better else -1.0
  front, best = [], float("-inf")
  for x, y in sorted(points, key=lambda p: (-p[0], -sign * p[1])):
    if sign * y > best:
      front.append((x, y))
      best = sign * y
  return front


def _draw_panel(ax, sweep: Sweep, points: list[dict], column: str, ylabel: str, style: dict,
                log_x: bool) -> None:
  """One panel of the quality or tokens/s plot: a line per series over x (bars when x has one
  value); quality shows the mean over seeds, +- std bars and a shaded min..max band."""
  x_col, series = plot_roles(sweep)
  spread = column == "quality"
  xs = sorted({p["x"] for p in points}, key=_sort_key)
  if len(xs) == 1:  # one x value: a bar per series reads better than a column of dots
    bars = [p for p in points if p[column] is not None]
    if bars:
      labels = [str(p["series"]) for p in bars]
      values = [p[column] for p in bars]
      err = [p["std"] or 0.0 for p in bars] if spread and any(p["std"] for p in bars) else None
      ax.barh(labels, values, xerr=err, color=[style[p["series"]][0] for p in bars],
              capsize=3 if err else 0)
      if spread:  # min and max of the seeds
        for i, p in enumerate(bars):
          if p["seeds"] > 1:
            ax.plot([p["min"], p["max"]], [i, i], "k|", ms=8)
      ax.invert_yaxis()
    if column == "tokens_per_sec":
      ax.set_xscale("log")
    ax.set_xlabel(ylabel)
    ax.grid(alpha=0.3, axis="x")
    return
  for n in dict.fromkeys(p["series"] for p in points):
    pts = sorted((p for p in points if p["series"] == n and p[column] is not None),
                 key=lambda p: _sort_key(p["x"]))
    if not pts:
      continue
    px = [p["x"] for p in pts] if _numeric([p["x"] for p in pts]) else [str(p["x"]) for p in pts]
    py = [p[column] for p in pts]
    color, marker = style[n]
    err = [p["std"] or 0.0 for p in pts] if spread and any(p["std"] for p in pts) else None
    ax.errorbar(px, py, yerr=err, marker=marker, color=color, label=str(n), capsize=2)
    if spread and any(p["seeds"] > 1 for p in pts):
      ax.fill_between(px, [p["min"] for p in pts], [p["max"] for p in pts], color=color,
                      alpha=0.15, lw=0)
  if log_x:
    ax.set_xscale("log", base=2)
    ax.set_xticks(xs, [str(v) for v in xs])
  if column == "tokens_per_sec":
    ax.set_yscale("log")
  ax.set_xlabel(short_key(x_col))
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)


def plot_results(sweep: Sweep, points: list[dict], sweep_dir: str) -> list[str]:
  """The three PNGs (a panel per value of the panel axes); returns their paths."""
  from matplotlib.figure import Figure

  x_col, series = plot_roles(sweep)
  names = list(dict.fromkeys(p["series"] for p in points))
  # Ten colors x markers keep more than ten series apart.
  style = {n: (f"C{i % 10}", "os^Dv"[(i // 10) % 5]) for i, n in enumerate(names)}
  legend_kw = dict(fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5)) if len(
      names) > 8 else dict(fontsize=8)
  xs = [p["x"] for p in points]
  log_x = _numeric(xs) and len(set(xs)) > 1 and min(xs) > 0
  panels = sorted({tuple(p["panel"].items()) for p in points},
                  key=lambda t: _panel_key(dict(t)))
  spread = " (mean over seeds, bars +- std, band min..max)" if any(
      p["seeds"] > 1 for p in points) else ""
  paths = []
  for column, ylabel, filename in (
      ("quality", sweep.metric.replace("_", " "),
       f"{sweep.metric.removeprefix('eval_')}_vs_{short_key(x_col)}.png"),
      ("tokens_per_sec", "train tokens / s", f"tokens_per_sec_vs_{short_key(x_col)}.png")):
    fig = Figure(figsize=(6.4 + 4.2 * (len(panels) - 1), 4.2), layout="constrained")
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, panel in zip(axes, panels):
      _draw_panel(ax, sweep, [p for p in points if tuple(p["panel"].items()) == panel], column,
                  ylabel, style, log_x)
      if panel:
        ax.set_title(panel_title(dict(panel)), fontsize=9)
    if len(set(xs)) > 1:
      handles = {}
      for ax in axes:
        for h, lab in zip(*ax.get_legend_handles_labels()):
          handles.setdefault(lab, h)
      axes[-1].legend(handles.values(), handles.keys(),
                      title=short_key(series) if series else None, **legend_kw)
      fig.suptitle(f"{sweep.name}: {ylabel} vs {short_key(x_col)}"
                   f"{spread if column == 'quality' else ''}", fontsize=10)
    else:
      fig.suptitle(f"{sweep.name}: {ylabel} at {short_key(x_col)} = {xs[0]}"
                   f"{spread if column == 'quality' else ''}", fontsize=10)
    path = os.path.join(sweep_dir, filename)
    fig.savefig(path, dpi=120)
    paths.append(path)

  # Frontier: one panel per (panel, x) (a fixed task difficulty), throughput vs quality.
  frames = sorted({(tuple(p["panel"].items()), p["x"]) for p in points},
                  key=lambda t: (_panel_key(dict(t[0])), _sort_key(t[1])))
  fig = Figure(figsize=(4.2 * max(len(frames), 1), 4.0), layout="constrained")
  axes = fig.subplots(1, max(len(frames), 1), squeeze=False)[0]
  for ax, (panel, x) in zip(axes, frames):
    pts = [p for p in points
           if p["x"] == x and tuple(p["panel"].items()) == panel and p["tokens_per_sec"]]
    for p in pts:
      ax.scatter(p["tokens_per_sec"], p["quality"], color=style[p["series"]][0], s=40,
                 marker=style[p["series"]][1], label=str(p["series"]), zorder=3)
    front = pareto([(p["tokens_per_sec"], p["quality"]) for p in pts], sweep.higher_is_better)
    if len(front) > 1:
      fx, fy = zip(*front)
      ax.plot(fx, fy, color="k", lw=1, ls="--", zorder=2, label="frontier")
    ax.set_xscale("log")
    ax.set_xlabel("train tokens / s")
    ax.set_ylabel(sweep.metric.replace("_", " "))
    ax.set_title(", ".join([*filter(None, [panel_title(dict(panel))]),
                            f"{short_key(x_col)} = {x}"]), fontsize=9)
    ax.grid(alpha=0.3)
  handles = {}
  for ax in axes:
    for h, lab in zip(*ax.get_legend_handles_labels()):
      handles.setdefault(lab, h)
  if handles:
    axes[-1].legend(handles.values(), handles.keys(), **legend_kw)
  fig.suptitle(f"{sweep.name}: quality vs throughput")
  path = os.path.join(sweep_dir, "frontier.png")
  fig.savefig(path, dpi=120)
  paths.append(path)
  return paths


def _setting(best: dict) -> str:
  return ", ".join(f"{short_key(a)} {format_value(v)}" for a, v in best.items())


def quality_cell(p: dict) -> str:
  """'0.952 +- 0.010 (n 3, learning_rate 0.003)': the mean, the std over seeds when there are
  several, and the chosen setting of the select axes."""
  text = f"{p['quality']:.3f}" + (f" ± {p['std']:.3f}" if p["std"] is not None else "")
  notes = [*([f"n {p['seeds']}"] if p["seeds"] > 1 else []), *filter(None, [_setting(p["best"])])]
  return text + (f" ({', '.join(notes)})" if notes else "")


def best_tables(sweep: Sweep, points: list[dict]) -> list[str]:
  """Markdown: per panel, a series x plot_x table of quality_cell and train tokens/s."""
  roles = axis_roles(sweep)
  x_col, series = roles["x"], roles["series"]
  metric = short_key(sweep.metric)
  choice = ("the best setting of " + ", ".join(map(short_key, roles["select"]))
            if roles["select"] else "its setting")
  how = f"mean ± std over seeds of {choice} (picked by that mean)" if roles["seeds"] else (
      f"{choice}")
  lines = []
  panels = sorted({tuple(p["panel"].items()) for p in points}, key=lambda t: _panel_key(dict(t)))
  for panel in panels:
    pts = [p for p in points if tuple(p["panel"].items()) == panel]
    names = list(dict.fromkeys(p["series"] for p in pts))
    xs = sorted({p["x"] for p in pts}, key=_sort_key)
    by = {(p["series"], p["x"]): p for p in pts}
    where = f", {panel_title(dict(panel))}" if panel else ""
    lines += [f"## Best {metric} by {short_key(series) if series else 'run'} and "
              f"{short_key(x_col)}{where}", "", f"({how}; train tokens/s)", "",
              "| " + " | ".join([short_key(series) if series else "", *map(str, xs)]) + " |",
              "|" + "---|" * (len(xs) + 1)]
    for n in names:
      cells = ["" if (n, x) not in by else
               f"{quality_cell(by[n, x])} ({_cell(by[n, x]['tokens_per_sec'])} tok/s)"
               for x in xs]
      lines.append("| " + " | ".join([str(n), *cells]) + " |")
    lines.append("")
  return lines


def seed_table(sweep: Sweep, cells: list[dict], points: list[dict]) -> list[str]:
  """Markdown: every cell of the grid without its seed axes, mean / std / min / max / n of the
  metric over seeds; `chosen` marks the setting each best table reports."""
  roles = axis_roles(sweep)
  keys = [k for k in cells[0] if k not in ("mean", "std", "min", "max", "n", "tokens_per_sec")]
  chosen = {(p["series"], _panel_key(p["panel"]), p["x"], *map(str, p["best"].values()))
            for p in points}

  def is_chosen(c: dict) -> bool:
    series = c.get(roles["series"], "all") if roles["series"] else "all"
    panel = _panel_key({a: c.get(a) for a in roles["panels"]})
    return (series, panel, c.get(roles["x"]), *(str(c.get(a)) for a in roles["select"])) in chosen

  table = [{**{short_key(k): c.get(k) for k in keys}, "mean": c["mean"], "std": c["std"],
            "min": c["min"], "max": c["max"], "n": c["n"],
            "chosen": "yes" if is_chosen(c) else ""} for c in cells]
  return [f"## {short_key(sweep.metric)} over seeds, every setting", "",
          markdown_table(table, list(table[0])), ""]


def collect(sweep: Sweep, variants: list[Variant], sweep_dir: str) -> tuple[list[dict], str]:
  """results.csv, results.md and the PNGs from every variant's workdir; -> (rows, markdown)."""
  rows = [collect_row(sweep, v, os.path.join(sweep_dir, v.name)) for v in variants]
  write_csv(rows, os.path.join(sweep_dir, "results.csv"))
  x_col, series = plot_roles(sweep)
  summaries = [k for k in dict.fromkeys(k for r in rows for k in r) if k.startswith("eval_")
               and k not in ("eval_accuracy", "eval_loss", "eval_perplexity")]
  columns = [*dict.fromkeys([*sweep.axes, x_col]), "status", "step", "train_loss",
             "eval_accuracy", "eval_loss", *summaries, "tokens_per_sec", "mfu", "wall_seconds"]
  columns = [c for c in columns if any(r.get(c) is not None for r in rows)]
  points = aggregate(sweep, rows)
  md = [f"# Sweep {sweep.name}", "",
        f"Base config `{os.path.relpath(sweep.config, ROOT)}`, fixed overrides "
        f"`{json.dumps(sweep.fixed)}`; {len(rows)} variants, "
        f"{sum(r['status'] == 'done' for r in rows)} done.", ""]
  if points:
    md += best_tables(sweep, points)
    cells = over_seeds(sweep, rows)
    write_csv(cells, os.path.join(sweep_dir, "results_over_seeds.csv"))
    if axis_roles(sweep)["seeds"]:
      md += seed_table(sweep, cells, points)
    plot_results(sweep, points, sweep_dir)
  md += ["## All variants", "", markdown_table(rows, columns), ""]
  text = "\n".join(md)
  with open(os.path.join(sweep_dir, "results.md"), "w") as f:
    f.write(text)
  return rows, text


# ----------------------------------------------------------------------------- driver


def _summary(row: dict) -> str:
  parts = []
  if row.get("eval_accuracy") is not None:
    parts.append(f"acc {row['eval_accuracy']:.3f}")
  if row.get("eval_loss") is not None:
    parts.append(f"loss {row['eval_loss']:.3f}")
  if row.get("tokens_per_sec"):
    parts.append(f"{row['tokens_per_sec']:,.0f} tok/s")
  return "  ".join(parts)


def run_sweep(sweep: Sweep, sweep_dir: str, *, mode: str, parallel: int = 0,
              per_device: int = 1, dry_run: bool = False, pattern: str | None = None,
              out=sys.stdout) -> tuple[list[dict], str]:
  """Runs (or scripts) every variant, then collects; -> (rows, markdown table)."""
  variants = expand(sweep, pattern)
  os.makedirs(sweep_dir, exist_ok=True)
  if dry_run:
    for v in variants:
      for cmd in commands(sweep, v, os.path.join(sweep_dir, v.name)):
        print(shlex.join(cmd), file=out)
    return [], ""
  if mode == "script":
    path = write_launch_script(sweep, variants, sweep_dir)
    print(f"wrote {len(variants)} launch commands to {path}", file=out)
    return [], ""
  if mode in ("sequential", "parallel"):
    kind, devices = local_accelerators()
    if mode == "sequential":
      slots, devices = 1, []  # the one process sees every device
    else:
      if per_device < 1:
        raise ValueError(f"--per_device={per_device} must be >= 1")
      slots = parallel or len(devices) * per_device or 1
      if devices and slots > len(devices) * per_device:
        raise ValueError(f"--parallel={slots} exceeds the {len(devices)} local {kind} devices "
                         f"x --per_device={per_device}; raise --per_device to share devices")
    free: queue.Queue = queue.Queue()
    for i in range(slots):  # slot i runs on device i mod n: processes spread over devices
      free.put((i, devices[i % len(devices)] if devices else None))
    from tqdm import tqdm

    bar = tqdm(total=len(variants), desc=sweep.name, unit="run", file=out, dynamic_ncols=True)
    lock = threading.Lock()
    width = len(str(len(variants)))

    def work(index: int, variant: Variant) -> str:
      slot, device = free.get()
      workdir = os.path.join(sweep_dir, variant.name)
      try:
        try:
          result = run_variant(sweep, variant, workdir,
                               device_env(kind, device, slot, per_device))
        except ValueError as e:
          result = {"status": f"failed ({e})", "seconds": 0.0}
      finally:
        free.put((slot, device))
      row = collect_row(sweep, variant, workdir)
      where = f" [{kind} {device}]" if device is not None else ""
      line = (f"[{index + 1:>{width}}/{len(variants)}] {variant.name}{where}: "
              f"{result['status']} in {result['seconds']:.0f}s  {_summary(row)}")
      with lock:
        bar.write(line)
        bar.update(1)
      return result["status"]

    with concurrent.futures.ThreadPoolExecutor(slots) as pool:
      statuses = list(pool.map(work, range(len(variants)), variants))
    bar.close()
    failed = [s for s in statuses if s.startswith("failed")]
    if failed:
      print(f"{len(failed)} of {len(variants)} variants failed", file=out)
  rows, text = collect(sweep, variants, sweep_dir)
  print(f"results: {os.path.join(sweep_dir, 'results.csv')}, results.md and PNGs in "
        f"{sweep_dir}", file=out)
  return rows, text


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  try:
    sweep = load_sweep(_CONFIG.value, _AXIS.value, _SET.value)
    if _EVAL_TASKS.value:
      sweep.eval_tasks = tuple(_EVAL_TASKS.value)
    if "accuracy" not in sweep.eval_tasks:  # results.csv reads eval.json
      sweep.eval_tasks = ("accuracy", *sweep.eval_tasks)
    sweep_dir = os.path.abspath(os.path.expanduser(
        _WORKDIR.value or os.path.join("runs", "sweeps", sweep.name)))
    mode = _MODE.value
    if mode is None:
      mode = "parallel" if (len(local_accelerators()[1]) > 1 or _PARALLEL.value > 1
                            or _PER_DEVICE.value > 1) else "sequential"
    rows, text = run_sweep(sweep, sweep_dir, mode=mode, parallel=_PARALLEL.value,
                           per_device=_PER_DEVICE.value, dry_run=_DRY_RUN.value, pattern=_FILTER.value)
  except ValueError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  if text:
    print(text)
  if any(r["status"] != "done" for r in rows) and mode != "collect":
    sys.exit(1)


if __name__ == "__main__":
  app.run(main)
