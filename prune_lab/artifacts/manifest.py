"""A checkpoint's per-layer manifest against its safetensors index (tensor names and shapes from the
header, no weights read), before any model is built: a manifest that lists 3000 layers for a file that
holds 3 is refused at once, not after building a 3000-layer skeleton (prune_lab/artifacts/checkpoint.py)."""
from __future__ import annotations

import re
from pathlib import Path

from ..errors import CheckpointError

LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")
# rows of the first tensor found per manifest entry, in units of head_dim (heads) or of 1 (MLP width)
ROWS = {"q_heads": ("self_attn.q_proj.weight",), "kv_heads": ("self_attn.k_proj.weight",),
        "mlp_width": ("mlp.up_proj.weight", "fc1.weight")}


def layer_tensors(shapes: dict[str, tuple]) -> dict[int, dict[str, tuple]]:
    """{layer index: {name within the layer: shape}} of the decoder layers in an index."""
    layers: dict[int, dict[str, tuple]] = {}
    for name, shape in shapes.items():
        m = LAYER.search(name)
        if m:
            layers.setdefault(int(m.group(1)), {})[name[m.end():]] = shape
    return layers


def check_index(manifest: dict, shapes: dict[str, tuple], where: Path) -> None:
    """The manifest's depth and per-layer widths are those of the weights in `where`."""
    listed, found = manifest["layers"], layer_tensors(shapes)
    if sorted(found) != list(range(len(listed))):
        held = f"{len(found)} (indices {min(found)}..{max(found)})" if found else "none"
        raise CheckpointError(f"manifest does not match the weights in {where}: it lists {len(listed)} decoder "
                              f"layers, the file holds {held}")
    head_dim = manifest.get("head_dim")
    for i, shape in enumerate(listed):
        for key, names in ROWS.items():
            unit = 1 if key == "mlp_width" else head_dim
            rows = next((found[i][n][0] for n in names if n in found[i] and found[i][n]), None)
            if isinstance(unit, int) and rows is not None and rows != shape[key] * unit:
                raise CheckpointError(f"manifest does not match the weights in {where}: layer {i} has "
                                      f"{key}={shape[key]} in the manifest, {rows} rows of "
                                      f"{names[0].rsplit('.', 2)[-2]} in the file")
