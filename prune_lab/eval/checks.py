"""Checks of the evaluation settings, all before any scoring: configuration-only ones when the
evaluator is built, data-dependent ones (windows vs tokens) right after the model is loaded."""
from __future__ import annotations

from ..data import SPLITS, check_dataset_name
from ..errors import PruneLabError


def check_ppl_settings(ppl: dict) -> None:
    seq_len, batch_size, max_windows = ppl.get("seq_len"), ppl.get("batch_size"), ppl.get("max_windows")
    if not isinstance(seq_len, int) or seq_len < 2:
        raise PruneLabError(f"eval.ppl.seq_len must be >= 2 (a window predicts seq_len - 1 tokens), got {seq_len}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise PruneLabError(f"eval.ppl.batch_size must be >= 1, got {batch_size}")
    if max_windows is not None and (not isinstance(max_windows, int) or max_windows < 1):
        raise PruneLabError(f"eval.ppl.max_windows must be >= 1, or null for every window; got {max_windows}")
    prefixes = list(ppl.get("prefix_windows") or [])
    if any(not isinstance(n, int) or n < 1 for n in prefixes) or len(set(prefixes)) != len(prefixes):
        raise PruneLabError(f"eval.ppl.prefix_windows must be distinct window counts >= 1, got {prefixes}")
    if max_windows and any(n > max_windows for n in prefixes):
        raise PruneLabError(f"eval.ppl.prefix_windows {prefixes} exceeds eval.ppl.max_windows={max_windows}")
    if ppl.get("split") not in SPLITS:
        raise PruneLabError(f"eval.ppl.split must be one of {', '.join(SPLITS)}; got {ppl.get('split')}")
    names = list(ppl.get("datasets") or [])
    if not names:
        raise PruneLabError("eval.ppl.datasets is empty: name at least one dataset (data = the job's own)")
    for name in names:
        if name != "data":
            check_dataset_name(name)


def check_ppl_data(ppl: dict, eval_sets: dict, streams) -> None:
    """Every evaluated split holds at least one window of seq_len tokens (an empty split holds none)."""
    for name in ppl["datasets"]:
        n = len(streams(eval_sets[name], ppl["split"]))
        if n < ppl["seq_len"]:
            raise PruneLabError(f"eval.ppl: the {ppl['split']} split of '{name}' has {n} tokens, fewer than "
                                f"eval.ppl.seq_len={ppl['seq_len']}{' (an empty split)' if n <= 1 else ''}")
        want = max(ppl.get("prefix_windows") or [0])
        if n // ppl["seq_len"] < want:
            raise PruneLabError(f"eval.ppl.prefix_windows: {want} windows asked, the {ppl['split']} split of "
                                f"'{name}' holds {n // ppl['seq_len']} of {ppl['seq_len']} tokens")
