"""Architecture adapter: every decoder layer seen as attention (q/k/v/o) + MLP (gate/up/down).

Head counts are read off the projection widths, not the config, so the same view works on a
model whose layers were pruned to different widths. OPT is multi-head attention (GQA with G=1,
q/k/v/out_proj with biases) and an fc1/fc2 MLP without a gate (MLPView.gate is None; a channel is
an fc1 row + bias and an fc2 column).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import PruneLabError, UnsupportedArchitecture

SUPPORTED_FAMILIES = ("llama", "mistral", "qwen2", "qwen3", "opt")
NO_GATE_FAMILIES = ("opt",)
# the decoder projections of the Llama family by module name (LoRA targets, statistics)
DECODER_LINEARS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@dataclass
class AttentionView:
    module: nn.Module
    q: nn.Linear
    k: nn.Linear
    v: nn.Linear
    o: nn.Linear
    q_norm: nn.Module | None
    k_norm: nn.Module | None
    head_dim: int

    @property
    def num_heads(self) -> int:
        return self.q.out_features // self.head_dim

    @property
    def num_kv_heads(self) -> int:
        return self.k.out_features // self.head_dim

    @property
    def group_size(self) -> int:
        """Query heads per KV head (the GQA ratio G); 0 for an emptied attention (no heads left)."""
        return self.num_heads // self.num_kv_heads if self.num_kv_heads else 0

    @property
    def group_cost(self) -> int:
        """Parameters removed with one GQA group (q/k/v rows + biases, o columns)."""
        hd, g = self.head_dim, self.group_size
        cost = (g * hd + 2 * hd) * self.q.in_features + self.o.out_features * g * hd
        for lin, rows in ((self.q, g * hd), (self.k, hd), (self.v, hd)):
            if lin.bias is not None:
                cost += rows
        return cost

    @property
    def num_params(self) -> int:
        return sum(_linear_params(m) for m in (self.q, self.k, self.v, self.o))


@dataclass
class MLPView:
    module: nn.Module
    gate: nn.Linear | None            # None: no gated MLP (OPT's fc1 -> act -> fc2)
    up: nn.Linear
    down: nn.Linear

    @property
    def inputs(self) -> tuple[nn.Linear, ...]:
        """The linears that read the MLP input (gate and up, or up alone)."""
        return (self.up,) if self.gate is None else (self.gate, self.up)

    @property
    def width(self) -> int:
        return self.up.out_features

    @property
    def channel_cost(self) -> int:
        hidden = self.up.in_features
        cost = len(self.inputs) * hidden + self.down.out_features
        cost += sum(1 for lin in self.inputs if lin.bias is not None)
        return cost

    @property
    def num_params(self) -> int:
        return sum(_linear_params(m) for m in (*self.inputs, self.down))


@dataclass
class LayerView:
    index: int
    module: nn.Module
    attn: AttentionView
    mlp: MLPView
    attn_can_empty: bool = True       # runs with 0 heads (plan.attn_blocks); not OPT's (it reshapes with -1)

    @property
    def num_params(self) -> int:
        return self.attn.num_params + self.mlp.num_params


def _linear_params(lin: nn.Linear) -> int:
    return lin.weight.numel() + (lin.bias.numel() if lin.bias is not None else 0)


def model_family(model: nn.Module) -> str:
    return getattr(model.config, "model_type", type(model).__name__)


def check_supported(model: nn.Module) -> None:
    family = model_family(model)
    if family not in SUPPORTED_FAMILIES:
        raise UnsupportedArchitecture(
            f"unsupported architecture '{family}': prune_lab supports {', '.join(SUPPORTED_FAMILIES)}"
        )


def head_dim_of(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def layer_container(model: nn.Module) -> nn.Module:
    """The module whose `.layers` is the decoder ModuleList (model.model, or model.model.decoder)."""
    check_supported(model)
    return model.model.decoder if model_family(model) == "opt" else model.model


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    return layer_container(model).layers


def layer_views(model: nn.Module) -> list[LayerView]:
    """One view per decoder layer, in order."""
    hd = head_dim_of(model.config)
    return [layer_view(i, layer, hd) for i, layer in enumerate(decoder_layers(model))]


def layer_view(index: int, layer: nn.Module, head_dim: int) -> LayerView:
    """The view of one decoder layer module (also of a detached copy of one).

    OPT layers are told apart by their own modules (out_proj, fc1/fc2 on the layer, no `mlp`)."""
    a = layer.self_attn
    opt = hasattr(layer, "fc1")
    attn = AttentionView(a, a.q_proj, a.k_proj, a.v_proj, a.out_proj if opt else a.o_proj,
                         getattr(a, "q_norm", None), getattr(a, "k_norm", None), head_dim)
    if opt:
        return LayerView(index, layer, attn, MLPView(layer, None, layer.fc1, layer.fc2), attn_can_empty=False)
    m = layer.mlp
    return LayerView(index, layer, attn, MLPView(m, m.gate_proj, m.up_proj, m.down_proj))


def view_linears(view: LayerView) -> dict[str, nn.Linear]:
    """The layer's projections by engine path ("attn.q" … "mlp.down"; no "mlp.gate" without a gate)."""
    a, m = view.attn, view.mlp
    named = {"attn.q": a.q, "attn.k": a.k, "attn.v": a.v, "attn.o": a.o,
             "mlp.gate": m.gate, "mlp.up": m.up, "mlp.down": m.down}
    return {k: v for k, v in named.items() if v is not None}


def decoder_linear_names(model: nn.Module) -> list[str]:
    """The architecture's names of its decoder projections, in engine order (Llama: q_proj ... down_proj;
    OPT: q_proj, k_proj, v_proj, out_proj, fc1, fc2): LoRA's default target modules."""
    view = layer_views(model)[0]
    names = {id(m): n.rsplit(".", 1)[-1] for n, m in view.module.named_modules()}
    return [names[id(lin)] for lin in view_linears(view).values()]


def decoder_linear_params(model: nn.Module) -> int:
    """Parameters of all decoder attention + MLP projections (the pruning budget's base)."""
    return sum(v.num_params for v in layer_views(model))


def layer_shapes(model: nn.Module) -> list[dict]:
    """Per-layer manifest: query heads, KV heads and MLP width of every remaining layer."""
    return [
        {"q_heads": v.attn.num_heads, "kv_heads": v.attn.num_kv_heads, "mlp_width": v.mlp.width}
        for v in layer_views(model)
    ]


def refuse_emptied(views: list[LayerView], scoring: bool) -> None:
    """Scoring (and so pruning again) a model whose layers lost a whole block (plan.attn_blocks / mlp_blocks:
    0 heads or MLP width 0): not supported, one line; evaluating, quantizing or recovering it is."""
    emptied = [v.index for v in views if not (v.attn.num_kv_heads and v.mlp.width)]
    if emptied and scoring:
        raise PruneLabError(f"layers {emptied} of this model have no attention or no MLP (a plan's attn_blocks / "
                            f"mlp_blocks): scoring or pruning it again is not supported, only evaluating it "
                            f"(allocator.ratio=0)")


def added_biases(model: nn.Module) -> list[str]:
    """Linears that carry a bias their architecture does not build (reconstruct=bias adds them)."""
    names = []
    if model_family(model) in NO_GATE_FAMILIES:    # OPT builds biases everywhere
        return names
    for v in layer_views(model):
        for short, lin, built in (("o_proj", v.attn.o, getattr(model.config, "attention_bias", False)),
                                  ("down_proj", v.mlp.down, getattr(model.config, "mlp_bias", False))):
            if lin.bias is not None and not built and short not in names:
                names.append(short)
    return names


def resolve_device(device: str, key: str) -> torch.device:
    """"auto" = the accelerator if there is one (cuda), else cpu. A device this torch cannot use fails
    here, naming its setting `key` (model.device, engine.device), before any model is loaded."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise PruneLabError(f"{key}={device} is not a device: use auto, cpu, cuda or cuda:<index>") from None
    if dev.type == "cpu":
        return dev
    have = torch.accelerator.current_accelerator()
    if have is None or have.type != dev.type or (dev.index or 0) >= torch.accelerator.device_count():
        seen = f"{torch.accelerator.device_count()} {have.type} device(s)" if have is not None else "no accelerator"
        raise PruneLabError(f"{key}={device} is not available (this torch sees {seen}): use {key}=auto or cpu")
    return dev
