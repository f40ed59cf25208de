"""Evaluation (twin of conf/eval/*.yaml): perplexity, zero-shot, efficiency."""
from __future__ import annotations

from .checks import check_ppl_data, check_ppl_settings
from .ppl import perplexities, perplexity


class Evaluator:
    """Runs the configured evaluations on a model and returns a flat dict of metrics."""

    def __init__(self, before: bool = False, ppl: dict | None = None,
                 zeroshot: dict | None = None, efficiency: dict | None = None):
        self.before, self.ppl, self.zeroshot, self.efficiency = before, ppl, zeroshot, efficiency
        self.split = ppl["split"] if ppl else None      # the split perplexity reads
        if ppl:
            check_ppl_settings(ppl)
        if zeroshot and zeroshot.get("tasks"):    # missing extra, unknown task, unreachable data: fail now
            from .zeroshot import resolve_tasks
            resolve_tasks(zeroshot["tasks"], zeroshot.get("include_path"))

    def __call__(self, model, tokenizer, datasets: dict, streams, tag: str = "") -> dict:
        """datasets: name -> TextDataset; streams: TokenStreams of the tokenizer."""
        out: dict = {}
        if self.ppl:
            cfg = self.ppl
            for name in cfg["datasets"]:
                stream = streams(datasets[name], cfg["split"])
                got = perplexities(model, stream, cfg["seq_len"], cfg["batch_size"], cfg.get("max_windows"),
                                   cfg.get("prefix_windows") or (), desc=f"ppl {name} {tag}".strip())
                out[f"ppl/{name}"] = got.pop(None)          # first: the job's objective (JobResult.ppl)
                out |= {f"ppl/{name}@{n}": v for n, v in got.items()}
        if self.zeroshot and self.zeroshot.get("tasks"):     # eval=full: tasks [] = zero-shot off
            from .zeroshot import zero_shot
            out.update(zero_shot(model, tokenizer, **self.zeroshot))
        if self.efficiency:
            from .efficiency import efficiency
            out.update(efficiency(model, tokenizer, **self.efficiency))
        return out

    def check_data(self, datasets: dict, streams) -> None:
        """After loading, before scoring: every evaluated split holds a window of seq_len tokens."""
        if self.ppl:
            check_ppl_data(self.ppl, datasets, streams)

    def dataset_names(self) -> list[str]:
        return list(self.ppl["datasets"]) if self.ppl else []
