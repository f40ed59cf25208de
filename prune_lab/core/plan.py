"""The pruning plan: which GQA groups, MLP channels, whole blocks and whole layers go. Saved as CSV.

A block is a layer's whole attention (`attn_blocks`: every KV group with its query heads) or its whole
MLP (`mlp_blocks`: every channel); the layer stays, that part of it gives zero (its o_proj / down_proj
bias, if any, stays). A layer whose attention and MLP both go is removed whole (`layers`).

Every allocator produces one; `prune.apply_plan` applies it to any copy of the model. Indices
refer to the dense model's layers and units.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ..atomic import atomic_path
from ..errors import PruneLabError
from .adapter import LayerView

UNIT_TYPES = ("attn_group", "mlp_channel", "layer", "attn_block", "mlp_block")


@dataclass
class PruningPlan:
    attn: dict[int, list[int]] = field(default_factory=dict)   # layer -> removed KV groups
    mlp: dict[int, list[int]] = field(default_factory=dict)    # layer -> removed MLP channels
    layers: list[int] = field(default_factory=list)            # layers removed whole
    target_params: int = 0
    attn_blocks: list[int] = field(default_factory=list)       # layers whose whole attention goes
    mlp_blocks: list[int] = field(default_factory=list)        # layers whose whole MLP goes

    def __post_init__(self):
        self.attn = {int(k): sorted(int(i) for i in v) for k, v in self.attn.items() if len(v)}
        self.mlp = {int(k): sorted(int(i) for i in v) for k, v in self.mlp.items() if len(v)}
        attn_blocks, mlp_blocks = {int(i) for i in self.attn_blocks}, {int(i) for i in self.mlp_blocks}
        self.layers = sorted({int(i) for i in self.layers} | (attn_blocks & mlp_blocks))
        self.attn_blocks = sorted(attn_blocks - set(self.layers))
        self.mlp_blocks = sorted(mlp_blocks - set(self.layers))
        for i in self.layers:  # a removed layer's units go with it
            self.attn.pop(i, None)
            self.mlp.pop(i, None)
        for i in self.attn_blocks:  # and a removed block's units with it
            self.attn.pop(i, None)
        for i in self.mlp_blocks:
            self.mlp.pop(i, None)

    def validate(self, views: list[LayerView]) -> None:
        n = len(views)
        for i in set(self.attn) | set(self.mlp) | set(self.layers) | set(self.attn_blocks) | set(self.mlp_blocks):
            if not 0 <= i < n:
                raise PruneLabError(f"plan names layer {i} but the model has {n} layers")
        if len(self.layers) >= n:
            raise PruneLabError("plan removes every layer")
        for i in self.attn_blocks:
            if not views[i].attn_can_empty:
                raise PruneLabError(f"plan empties the attention of layer {i} (attn_blocks), which this "
                                    f"architecture cannot run without heads (OPT): remove the whole layer instead")
        for i, idx in self.attn.items():
            nkv = views[i].attn.num_kv_heads
            if len(set(idx)) != len(idx) or idx[-1] >= nkv or idx[0] < 0:
                raise PruneLabError(f"plan has bad KV-group indices for layer {i} ({nkv} groups)")
            if len(idx) == nkv:
                raise PruneLabError(f"plan empties the attention of layer {i} without removing the layer or "
                                    f"naming it in attn_blocks")
        for i, idx in self.mlp.items():
            w = views[i].mlp.width
            if len(set(idx)) != len(idx) or idx[-1] >= w or idx[0] < 0:
                raise PruneLabError(f"plan has bad MLP channel indices for layer {i} (width {w})")
            if len(idx) == w:
                raise PruneLabError(f"plan empties the MLP of layer {i} without removing the layer or naming it "
                                    f"in mlp_blocks")

    def params_removed(self, views: list[LayerView]) -> int:
        """Exact parameter accounting (decoder attention + MLP projections)."""
        total = sum(views[i].num_params for i in self.layers)
        total += sum(len(idx) * views[i].attn.group_cost for i, idx in self.attn.items())
        total += sum(len(idx) * views[i].mlp.channel_cost for i, idx in self.mlp.items())
        total += sum(views[i].attn.num_kv_heads * views[i].attn.group_cost for i in self.attn_blocks)
        total += sum(views[i].mlp.width * views[i].mlp.channel_cost for i in self.mlp_blocks)
        return total

    def summary(self, views: list[LayerView]) -> dict:
        base = sum(v.num_params for v in views)
        removed = self.params_removed(views)
        return {"groups_removed": sum(map(len, self.attn.values())),        # of the parts that keep some units
                "channels_removed": sum(map(len, self.mlp.values())),
                "layers_removed": list(self.layers), "attn_blocks_removed": list(self.attn_blocks),
                "mlp_blocks_removed": list(self.mlp_blocks), "params_removed": removed,
                "target_params": self.target_params, "decoder_params_before": base,
                "achieved_ratio": removed / base if base else 0.0}

    def to_frame(self) -> pd.DataFrame:
        rows = [(i, "layer", -1) for i in self.layers]
        rows += [(i, "attn_block", -1) for i in self.attn_blocks] + [(i, "mlp_block", -1) for i in self.mlp_blocks]
        rows += [(i, "attn_group", j) for i, idx in self.attn.items() for j in idx]
        rows += [(i, "mlp_channel", j) for i, idx in self.mlp.items() for j in idx]
        return pd.DataFrame(rows, columns=["layer", "type", "index"]).sort_values(
            ["layer", "type", "index"], kind="stable").reset_index(drop=True)

    def save(self, path: str | Path) -> None:
        df = self.to_frame()
        df.attrs = {}
        with atomic_path(path) as tmp, open(tmp, "w") as f:
            f.write(f"# target_params={self.target_params}\n")
            df.to_csv(f, index=False)

    @classmethod
    def load(cls, path: str | Path) -> "PruningPlan":
        path = Path(path)
        if not path.is_file():
            raise PruneLabError(f"plan file '{path}' does not exist")
        first = path.read_text().splitlines()[:1]
        target = int(first[0].split("=")[1]) if first and first[0].startswith("# target_params=") else 0
        try:
            df = pd.read_csv(path, comment="#")
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as e:
            raise PruneLabError(f"'{path}' is not a prune_lab plan ({type(e).__name__})") from None
        if list(df.columns) != ["layer", "type", "index"] or not df["type"].isin(UNIT_TYPES).all():
            raise PruneLabError(f"'{path}' is not a prune_lab plan (columns layer,type,index)")
        by_type = {t: df[df["type"] == t] for t in UNIT_TYPES}
        return cls(attn=by_type["attn_group"].groupby("layer")["index"].apply(list).to_dict(),
                   mlp=by_type["mlp_channel"].groupby("layer")["index"].apply(list).to_dict(),
                   layers=by_type["layer"]["layer"].tolist(), target_params=target,
                   attn_blocks=by_type["attn_block"]["layer"].tolist(),
                   mlp_blocks=by_type["mlp_block"]["layer"].tolist())
