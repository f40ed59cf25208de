"""`python -m prune_lab.report <dir>...`: every run's metrics and overrides in one table.

Walks the dirs for run dirs (metrics.json, or .hydra/ alone: missing; running, process gone: dead),
writes report.csv + report.md into the first dir (or --out) and prints the Markdown. For sweeps it
also plots the perplexity against each swept override (or --plot KNOB), and the Pareto front of
--pareto X Y (default params vs perplexity when the dir holds a multi-objective Optuna study).
--clean first removes what jobs killed with -9 left half written (`.tmp-<pid>-…`, process gone).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import pandas as pd
import yaml

from .artifacts.markdown import format_cell, to_markdown
from .artifacts.rundir import dead_fields, lock_held, remove_stale_temporaries
from .atomic import write_text_atomic
from .errors import PruneLabError

FIRST_COLUMNS = ["run", "status"]
SUMMARY_METRICS = ["params", "achieved_ratio", "layers_removed", "zeroshot/avg_acc", "time/total"]


def find_run_dirs(roots: list[Path]) -> list[Path]:
    found = set()
    for root in roots:
        found |= {p.parent for p in root.rglob("metrics.json")}
        found |= {p.parent.parent for p in root.rglob(".hydra/overrides.yaml")}
    return sorted(found, key=lambda p: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", str(p))])


def parse_override(text: str) -> tuple[str, object]:
    key, _, value = text.partition("=")
    try:
        parsed = yaml.safe_load(value) if value else None
    except yaml.YAMLError:
        parsed = value
    parsed = value if isinstance(parsed, (list, dict)) else parsed
    return key.lstrip("+~"), parsed


def read_overrides(run_dir: Path) -> dict:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    return dict(parse_override(str(o)) for o in (yaml.safe_load(path.read_text()) or []))


def scalars(prefix: str, values: dict | None) -> dict:
    """Flat numeric / text / bool entries of a dict, keys prefixed (nested lists and dicts dropped)."""
    return {f"{prefix}{k}": v for k, v in (values or {}).items()
            if isinstance(v, (int, float, str, bool)) or v is None}


def metrics_row(metrics: dict) -> dict:
    model, plan, scores = metrics.get("model", {}), metrics.get("plan", {}), metrics.get("scores", {})
    removed = plan.get("layers_removed")
    recovered = metrics.get("recovered")   # finetune != none: the final results; "pruned/" before recovery
    return {"status": metrics.get("status", "unknown"),
            **scalars("", recovered or metrics.get("pruned")), **scalars("dense/", metrics.get("dense")),
            **(scalars("pruned/", metrics.get("pruned")) if recovered else {}),
            "params": model.get("pruned", {}).get("params_total"),
            "params_dense": model.get("dense", {}).get("params_total"),
            **{k: plan.get(k) for k in ("achieved_ratio", "groups_removed", "channels_removed")},
            "layers_removed": len(removed) if removed is not None else None,
            "scores_reused": scores.get("reused"), "layer_scores_reused": scores.get("layer_reused"),
            **scalars("verify/", metrics.get("verify")), **scalars("finetune/", metrics.get("finetune")),
            **scalars("compression/", metrics.get("compression")), **scalars("time/", metrics.get("timings_s")),
            "error": metrics.get("error")}


def run_row(run_dir: Path, root: Path) -> dict:
    path = run_dir / "metrics.json"
    if not path.is_file():
        metrics_part = {"status": "missing", "error": "no metrics.json (the job never started?)"}
    else:
        try:
            metrics = json.loads(path.read_text())
            metrics_part = metrics_row(metrics) | dead_fields(run_dir, metrics)
        except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as e:
            metrics_part = {"status": "unreadable", "error": f"metrics.json: {e}"}
    name = str(run_dir.relative_to(root)) if run_dir.is_relative_to(root) else str(run_dir)
    return {"run": name if name != "." else run_dir.name, **read_overrides(run_dir), **metrics_part}


class ComposedConfig:
    """A run's composed job (.hydra/config.yaml) and group choices (.hydra/hydra.yaml), for the
    value of a knob another run overrode but this one left at its default."""

    def __init__(self, run_dir: Path):
        self.config = self._load(run_dir / ".hydra" / "config.yaml")
        hydra = self._load(run_dir / ".hydra" / "hydra.yaml").get("hydra", {})
        self.choices = (hydra.get("runtime") or {}).get("choices") or {}

    @staticmethod
    def _load(path: Path) -> dict:
        try:
            return yaml.safe_load(path.read_text()) or {} if path.is_file() else {}
        except yaml.YAMLError:
            return {}

    def get(self, key: str):
        if key in self.choices:
            return self.choices[key]
        node = self.config
        for part in key.split("."):
            if not isinstance(node, dict) or part not in node:
                return None
            node = node[part]
        return node if not isinstance(node, (dict, list)) else str(node)


def gather(roots: list[str | Path]) -> pd.DataFrame:
    """One row per run under the roots: overrides first, then metrics (failed runs included)."""
    roots = [Path(r) for r in roots]
    for root in roots:
        if not root.is_dir():
            raise PruneLabError(f"'{root}' is not a directory")
    run_dirs = find_run_dirs(roots)
    rows = [run_row(d, next(r for r in roots if d.is_relative_to(r))) for d in run_dirs]
    if not rows:
        raise PruneLabError(f"no runs (metrics.json) under {', '.join(map(str, roots))}")
    knobs = [c for c in dict.fromkeys(c for r in rows for c in r)
             if c not in FIRST_COLUMNS and not is_metric_column(c)]
    for run_dir, row in zip(run_dirs, rows):
        missing = [k for k in knobs if k not in row]
        if missing:
            composed = ComposedConfig(run_dir)
            row.update({k: composed.get(k) for k in missing})
    frame = pd.DataFrame(rows).dropna(axis=1, how="all")
    for column in COUNT_COLUMNS & set(frame.columns):     # counts stay integers next to failed runs' NaN
        frame[column] = frame[column].astype("Int64")
    knobs = [k for k in knobs if k in frame.columns]
    rest = [c for c in frame.columns if c not in FIRST_COLUMNS + knobs]
    return frame[[c for c in FIRST_COLUMNS if c in frame] + knobs + rest]


COUNT_COLUMNS = {"params", "params_dense", "groups_removed", "channels_removed", "layers_removed"}
METRIC_NAMES = {"params", "params_dense", "achieved_ratio", "groups_removed", "channels_removed",
                "layers_removed", "scores_reused", "layer_scores_reused", "error"}


def is_metric_column(name: str) -> bool:
    return name in METRIC_NAMES or "/" in name


def override_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c not in FIRST_COLUMNS and not is_metric_column(c)]


def swept_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in override_columns(frame) if frame[c].nunique(dropna=False) > 1]


def ppl_columns(frame: pd.DataFrame) -> list[str]:
    return [c for c in frame.columns if c.startswith("ppl/")]


def check_column(frame: pd.DataFrame, name: str, option: str) -> None:
    if name not in frame.columns:
        raise PruneLabError(f"{option} '{name}' is not a column; have: {', '.join(frame.columns)}")


def summary_columns(frame: pd.DataFrame) -> list[str]:
    """The Markdown view: swept overrides, perplexities, size, ratio (report.csv has everything)."""
    ppl = ppl_columns(frame)
    accuracy = [c for c in frame.columns if c.startswith("zeroshot/") and c.endswith("/acc")]
    dense = [f"dense/{c}" for c in ppl]
    wanted = FIRST_COLUMNS + swept_columns(frame) + ppl + dense + accuracy + SUMMARY_METRICS
    return [c for c in wanted if c in frame.columns]


def common_overrides(frame: pd.DataFrame) -> str:
    fixed = [c for c in override_columns(frame) if c not in swept_columns(frame)]
    return " ".join(f"{c}={format_cell(frame[c].dropna().iloc[0])}" for c in fixed if frame[c].notna().any())


def is_multi_objective_study(roots: list[Path]) -> bool:
    """hydra-optuna-sweeper writes `solutions` (the Pareto set) instead of best_value then."""
    return any("solutions" in (yaml.safe_load(p.read_text()) or {})
               for root in roots for p in root.rglob("optimization_results.yaml"))


def clean(roots: list[Path]) -> list[Path]:
    """Stale temporaries in the roots and in every run dir under them that no live job holds."""
    dirs = [r for r in roots if r.is_dir()] + find_run_dirs([r for r in roots if r.is_dir()])
    removed = [p for d in dict.fromkeys(dirs) if not lock_held(d) for p in remove_stale_temporaries(d)]
    for path in removed:
        print(f"removed {path} (left half written by a process that is gone)", file=sys.stderr)
    return removed


def report(dirs: list[str], out: str | None = None, sort: str | None = None, descending: bool = False,
           plot: list[str] | None = None, pareto: list[str] | None = None) -> pd.DataFrame:
    roots = [Path(d) for d in dirs]
    frame = gather(roots)
    ok = frame[frame["status"] == "ok"]
    swept = swept_columns(ok)
    knobs = plot if plot is not None else swept if len(swept) <= 2 else []   # more: name one with --plot
    if pareto is None and is_multi_objective_study(roots) and ppl_columns(frame):
        pareto = ["params", ppl_columns(frame)[0]]
    checks = [(k, "--plot") for k in knobs] + [(c, "--pareto") for c in pareto or []]
    for column, option in checks + ([(sort, "--sort")] if sort else []):
        check_column(frame, column, option)
    if sort:
        frame = frame.sort_values(sort, ascending=not descending, na_position="last", kind="stable")
    out_dir = Path(out) if out else roots[0]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "report.csv", frame.to_csv(index=False))
    common = common_overrides(frame)
    markdown = to_markdown(frame[summary_columns(frame)])
    markdown = f"Common overrides: `{common}`\n\n{markdown}" if common else markdown
    write_text_atomic(out_dir / "report.md", markdown)
    print(markdown, end="")
    from .artifacts.sweep_plots import write_sweep_plots
    for path in write_sweep_plots(ok, out_dir, knobs, ppl_columns(ok), swept, pareto):
        print(f"wrote {path}", file=sys.stderr)
    print(f"wrote {out_dir / 'report.csv'} and report.md ({len(frame)} runs)", file=sys.stderr)
    return frame


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="prune-lab-report", description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="run dirs, multirun dirs or any parent of them")
    parser.add_argument("--out", help="where report.csv / report.md / plots go (default: the first dir)")
    parser.add_argument("--sort", help="column to sort by, e.g. ppl/data")
    parser.add_argument("--desc", action="store_true", help="sort descending")
    parser.add_argument("--plot", action="append", metavar="KNOB",
                        help="plot perplexity vs this override (repeatable; default: every swept one)")
    parser.add_argument("--pareto", nargs=2, metavar=("X", "Y"), help="Pareto front of two columns")
    parser.add_argument("--clean", action="store_true", help="first remove temporaries of killed jobs")
    args = parser.parse_args(argv)
    try:
        if args.clean:
            clean([Path(d) for d in args.dirs])
        report(args.dirs, args.out, args.sort, args.desc, args.plot, args.pareto)
    except PruneLabError as e:
        print(f"prune_lab.report: error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
