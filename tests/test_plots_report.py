"""Per-run plots from a real tiny CLI run, and the cross-run report over a sweep + a failed run."""
from __future__ import annotations

import json
import subprocess

import numpy as np
import pandas as pd
import pytest
from matplotlib.image import imread

from conftest import REPO, run_cli, tiny_overrides
from prune_lab.data import WikiVital
from prune_lab.artifacts.plots import value_scale
from prune_lab.artifacts.sweep_plots import pareto_labels, pareto_mask
from prune_lab.report import main as report_main
from prune_lab.artifacts.markdown import to_markdown

PLOTS = ("kept_units.png", "score_histogram.png", "layer_importance.png")


def cli(*args: str, cwd=REPO) -> subprocess.CompletedProcess:
    return run_cli(*args, cwd=cwd)


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """One tiny job: local text data, ppl on it and on wiki_vital, efficiency, dense + pruned, plots."""
    tmp = tmp_path_factory.mktemp("full_run")
    wiki = WikiVital()
    (tmp / "train.txt").write_text(wiki.text("train")[:40000])
    (tmp / "test.txt").write_text(wiki.text("valid")[:20000])
    out = cli(*tiny_overrides("llama", tmp), "data=text",
              f"data.train={tmp}/train.txt", f"data.test={tmp}/test.txt",
              "eval=full", "eval.ppl.datasets=[data,wiki_vital]", "eval.before=true",
              "eval.efficiency.prompt_len=16", "eval.efficiency.gen_tokens=4", "eval.efficiency.repeats=1",
              "allocator.ratio=0.3", "output.plots=true", f"hydra.run.dir={tmp}/run")
    assert out.returncode == 0, out.stderr[-3000:]
    return tmp / "run"


def test_run_plots_are_written_and_readable(full_run):
    for name in PLOTS:
        path = full_run / name
        assert path.is_file(), name
        assert path.stat().st_size > 10_000, name               # a drawn figure, not an empty canvas
        pixels = imread(path)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500
        assert pixels[..., :3].std() > 0.05                     # more than a blank background


def test_full_eval_records_dense_and_pruned_on_both_datasets(full_run):
    metrics = json.loads((full_run / "metrics.json").read_text())
    assert metrics["status"] == "ok"
    for tag in ("dense", "pruned"):
        results = metrics[tag]
        assert {"ppl/data", "ppl/wiki_vital"} <= set(results)
        assert results["ppl/data"] != results["ppl/wiki_vital"]
        assert results["efficiency/params"] == metrics["model"][tag]["params_total"]
        assert results["efficiency/generate_tokens_per_s"] > 0
    assert metrics["pruned"]["efficiency/checkpoint_bytes"] < metrics["dense"]["efficiency/checkpoint_bytes"]
    assert not any(k.startswith("zeroshot/") for k in metrics["pruned"])   # off in eval=full by default


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """Two ok runs (a Hydra multirun over allocator.ratio) and one failed run, as the CLI writes them."""
    tmp = tmp_path_factory.mktemp("sweep")
    common = [*tiny_overrides("llama", tmp), "eval.before=true", "output.plots=false"]
    ok = cli("-m", *common, "allocator.ratio=0.4,0.1", f"hydra.sweep.dir={tmp}/multirun")
    assert ok.returncode == 0, ok.stderr[-3000:]
    failed = cli(*common, "data=text", f"data.train={tmp}/missing.txt", f"hydra.run.dir={tmp}/multirun/failed")
    assert failed.returncode == 2 and "does not exist" in failed.stderr
    return tmp / "multirun"


def test_report_gathers_sorts_and_keeps_failed_runs(sweep, capsys):
    report_main([str(sweep), "--sort", "ppl/data"])
    printed = capsys.readouterr().out
    table = pd.read_csv(sweep / "report.csv")
    assert len(table) == 3
    assert list(table["status"]) == ["ok", "ok", "failed"]              # failed (no ppl) sorts last
    ppl = table["ppl/data"].to_numpy()
    assert ppl[0] <= ppl[1] and np.isnan(ppl[2])
    runs = {r["run"]: r for r in table.to_dict("records")}
    assert set(runs) == {"0", "1", "failed"}
    for name, ratio in (("0", 0.4), ("1", 0.1)):
        metrics = json.loads((sweep / name / "metrics.json").read_text())
        row = runs[name]
        assert row["allocator.ratio"] == ratio                          # overrides become columns
        assert row["ppl/data"] == pytest.approx(metrics["pruned"]["ppl/data"])
        assert row["dense/ppl/data"] == pytest.approx(metrics["dense"]["ppl/data"])
        assert row["params"] == metrics["model"]["pruned"]["params_total"]
        assert row["achieved_ratio"] == pytest.approx(ratio, abs=0.02)
    assert runs["0"]["scores_reused"] == False and runs["1"]["scores_reused"] == True  # noqa: E712
    failed = runs["failed"]
    assert failed["data"] == "text" and runs["0"]["data"] == "wiki_vital"   # defaults filled from .hydra
    assert failed["allocator.ratio"] == 0.25 and "does not exist" in failed["error"]
    assert (sweep / "report.md").read_text() in printed
    assert "| failed |" in printed
    assert (sweep / "ppl_vs_allocator.ratio.png").stat().st_size > 10_000   # the swept knob, plotted


def test_report_plot_pareto_and_out_dir(sweep, tmp_path, capsys):
    report_main([str(sweep / "0"), str(sweep / "1"), "--out", str(tmp_path), "--plot", "allocator.ratio",
                 "--pareto", "params", "ppl/data", "--sort", "params", "--desc"])
    table = pd.read_csv(tmp_path / "report.csv")
    assert list(table["params"]) == sorted(table["params"], reverse=True)
    for name in ("ppl_vs_allocator.ratio.png", "pareto.png"):
        assert (tmp_path / name).stat().st_size > 10_000
    assert not (sweep / "0" / "report.csv").exists()


def test_report_bad_input_is_one_line_exit_2(sweep, tmp_path, capsys):
    for argv in ([str(sweep), "--sort", "nope"], [str(sweep), "--plot", "nope"], [str(tmp_path)]):
        with pytest.raises(SystemExit) as exit_:
            report_main(argv)
        assert exit_.value.code == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("prune_lab.report: error:") and "\n" not in err


def test_pareto_mask_keeps_only_undominated_points():
    x = np.array([1.0, 2.0, 3.0, 2.0, 1.0])
    y = np.array([5.0, 3.0, 1.0, 4.0, 6.0])
    assert pareto_mask(x, y).tolist() == [True, True, True, False, False]


def test_markdown_table_formats_numbers_and_gaps():
    frame = pd.DataFrame({"run": ["a", "b"], "ppl/data": [50.9512, np.nan], "params": [1000.0, 20.0]})
    assert to_markdown(frame) == ("| run | ppl/data | params |\n|---|---|---|\n"
                                  "| a | 50.95 | 1000 |\n| b |  | 20 |\n")


def test_layer_importance_axis_is_readable_with_an_outlier():
    assert value_scale(np.array([3478.0, 0.5, 2.0, 11.0, 4.0])) == ("log", {})      # removal's layer 0
    scale, options = value_scale(np.array([3478.0, -0.2, 2.0, 11.0, 4.0]))
    assert scale == "symlog" and options["linthresh"] == pytest.approx(4.0)
    assert value_scale(np.array([0.1, 0.3, 0.2])) == ("linear", {})              # activation scores


def test_pareto_labels_are_short_and_merged():
    names = ["multirun/2026-11-23/10-00-00/0", "multirun/2026-11-23/10-00-00/1", "multirun/x/2", "m/3", "m/4",
             "m/5"]
    labels = pareto_labels(names, [1.0, 1.0, 2.0, 3.0, 3.0, 3.0], [5.0, 5.0, 4.0, 2.0, 2.0, 2.0])
    assert labels == [("0, 1", 1.0, 5.0), ("2", 2.0, 4.0), ("3, 4, 5", 3.0, 2.0)]
    assert pareto_labels(list("abcd"), [1.0] * 4, [1.0] * 4) == [("a +3", 1.0, 1.0)]
