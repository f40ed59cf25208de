"""One layer's calibration passes (see prune_lab/engine/__init__.py): the stages' hooks on the linears
(one Accumulator per distinct input: q/k/v share one, gate/up another), the dense copy once per layer
with later stages' dense inputs taped from its pass, and the replay of a last down_proj-only stage into
its pass's outputs, and after a layer's last attention change (an o_proj-only stage) its attention
as o_proj on the o_proj inputs kept from that pass (AttentionStandIn); counts the layer forwards."""
from __future__ import annotations

import copy

import torch
import torch.nn as nn
from torch import Tensor

from ..core.adapter import LayerView, layer_view
from ..errors import PruneLabError
from .capture import AttentionStandIn, to_device
from .hooks import Hooks
from .stats import Accumulator

LINEAR_PATHS = ("attn.q", "attn.k", "attn.v", "attn.o", "mlp.gate", "mlp.up", "mlp.down")
SHARED_INPUT = {"attn.k": "attn.q", "attn.v": "attn.q", "mlp.up": "mlp.gate"}   # same input tensor
# the norm whose input is the residual stream that attn.o / mlp.down add into (Llama family, OPT)
RESIDUAL_NORMS = {"attn.o": ("input_layernorm", "self_attn_layer_norm"),
                  "mlp.down": ("post_attention_layernorm", "final_layer_norm")}
REPLAY_BYTES = 2 ** 31


def linear_at(view: LayerView, path: str) -> nn.Linear:
    """'attn.o' -> view.attn.o; 'mlp.down' -> view.mlp.down."""
    if path not in LINEAR_PATHS:
        raise PruneLabError(f"unknown linear '{path}': use one of {', '.join(LINEAR_PATHS)}")
    part, name = path.split(".")
    return getattr(getattr(view, part), name)


def _accumulators(view, stage, method, two: bool, residual: bool, device) -> dict[str, Accumulator]:
    """path -> the Accumulator of its input: one per distinct input of the stage."""
    groups: dict[str, list[str]] = {}
    for p in stage:
        linear_at(view, p)
        groups.setdefault(SHARED_INPUT.get(p, p), []).append(p)
    accs = {}
    for paths in groups.values():
        acc = Accumulator({p: linear_at(view, p) for p in paths}, method.needs_gram, two, device,
                          [p for p in paths if residual and p in RESIDUAL_NORMS], two and method.needs_dense_grams)
        accs.update(dict.fromkeys(paths, acc))
    return accs



class LayerRun:
    """The calibration passes over one layer (hooks in, outputs out) and the count of its forwards."""

    def __init__(self, view, kw, masks, device, store):
        self.view, self.layer, self.kw, self.masks = view, view.module, kw, masks
        self.device, self.store, self.head_dim = device, store, view.attn.head_dim
        self.forwards, self.replayable, self.saved, self.z = 0, False, [], []

    def run(self, module: nn.Module, x: Tensor, b: int) -> Tensor:
        self.forwards += 1
        attn = module.self_attn if module is self.layer and self.z else None
        if attn is not None:
            module.self_attn = AttentionStandIn(self.view.attn.o, self.z[b].to(self.device))
        try:
            out = module(x.to(self.device), **to_device(self.kw[b], self.device))
        finally:
            if attn is not None:
                module.self_attn = attn
        return out[0] if isinstance(out, tuple) else out

    def forward(self, inputs) -> list[Tensor]:
        return [self.run(self.layer, x, b).to(self.store) for b, x in enumerate(inputs)]

    def walk(self, method, two: bool, propagate: str, pruned_in: list, dense_in: list | None):
        """Every stage's pass and apply; returns (stage records, next pruned inputs, next dense inputs)."""
        view, same = self.view, two and dense_in is pruned_in
        stages = method.stages(view)
        accs = [_accumulators(view, st, method, two and not (same and s == 0),
                              two and method.needs_residual and not (same and s == 0), self.device)
                for s, st in enumerate(stages)]
        tokens = sum(x.shape[:-1].numel() for x in pruned_in)
        replay = propagate == "pruned" and bool(stages) and stages[-1] == ["mlp.down"] and \
            tokens * view.mlp.down.in_features * 4 <= REPLAY_BYTES
        attn = [s for s, st in enumerate(stages) if any(p.startswith("attn.") for p in st)]
        keep_z = attn[-1] if attn and [p for p in stages[attn[-1]] if p.startswith("attn.")] == ["attn.o"] and \
            propagate == "pruned" and tokens * view.attn.o.in_features * 4 <= REPLAY_BYTES else None
        dense_layer = copy.deepcopy(self.layer) if two and not same and stages else None
        dense_out, out, tape, before, records = None, None, None, None, []
        for s, stage in enumerate(stages):
            last = s == len(stages) - 1
            later = list({id(a): a for st in accs[s + 1:] for a in st.values()}.values())
            keep = (s == 0 and dense_layer is None and (two or propagate == "dense")) or (last and replay)
            out, dense_o, tape = self.stage(accs[s], later, pruned_in, dense_in, dense_layer, tape, keep,
                                            last and replay, s == keep_z)
            if s == 0:
                dense_out, dense_layer = (dense_o if dense_layer is not None else out), None
            if last and self.replayable:
                before = [None if t is None else t.detach().clone() for t in (view.mlp.down.weight, view.mlp.down.bias)]
            stats = {p: st for a in {id(a): a for a in accs[s].values()}.values() for p, st in a.stats().items()}
            records.append(method.apply(view.index, view, {p: stats[p] for p in stage}) or {})
            del stats
        if propagate == "dense":
            return records, (dense_out if stages else self.forward(pruned_in)), None
        nxt = self.replay(out, before) if before is not None else self.forward(pruned_in)
        if two:
            dense_in = nxt if same and not stages else dense_out if stages else self.forward(dense_in)
            if dense_in is not nxt and all(torch.equal(a, b) for a, b in zip(nxt, dense_in)):
                dense_in = nxt                   # the method changed nothing: the streams are still one
        return records, nxt, dense_in

    def stage(self, accs, later, pruned_in, dense_in, dense_layer, tape, keep: bool, replay: bool, keep_z: bool):
        """One stage's pass: the dense copy (if given) runs first on each batch and hands this and later
        stages' accumulators their dense-path inputs (later ones' are taped; from the layer itself while
        the streams are one), then the layer on the pruned input (keep_z: its o_proj inputs are kept).
        Returns (pruned outputs if keep, dense outputs, tape)."""
        own = list({id(a): a for a in accs.values()}.values())
        taping = tape is None and any(a.two for a in later)
        dense_module = dense_layer if dense_layer is not None else self.layer
        dense_view = self.view if dense_layer is None else layer_view(self.view.index, dense_layer, self.head_dim)
        cur = {"mask": None}
        hooks = [(linear_at(self.view, p), a.pruned_hook(cur)) for p, a in accs.items()]
        hooks += [(linear_at(dense_view, p), a.dense_hook(cur, p)) for a in (*(own if tape is None else ()),
                  *(later if taping else ())) if a.two for p in a.lins]
        pre = [(_residual_norm(self.layer, p), a.residual_hook(cur, "res_pruned")) for a in own for p in a.resid]
        pre += [(_residual_norm(dense_module, p), a.residual_hook(cur, "res_dense"))
                for a in (*(own if tape is None else ()), *(later if taping else ())) for p in a.resid]
        zs: list[Tensor] = []        # keep_z: the last attention change is o_proj's, later runs reuse its inputs
        hooks += [(self.view.attn.o, lambda _m, i, _o: zs.append(i[0].to(self.store)))] if keep_z else []
        if replay:
            self.replayable = True
            hooks.append((self.view.mlp.down, lambda _m, i, o: cur.update(x=i[0], d=o)))
            pre.append((_residual_norm(self.layer, "mlp.down"), lambda _m, i: cur.update(h=i[0])))
        outs, dense_outs, new_tape = [], [], []
        with Hooks() as handles:
            for mod, fn in hooks:
                handles.add(mod.register_forward_hook(fn))
            for mod, fn in pre:
                handles.add(mod.register_forward_pre_hook(fn))
            for b, x in enumerate(pruned_in):
                cur["mask"] = self.masks[b]
                for a in (*own, *later):
                    a.next_batch()
                for a in (a for a in own if a.two and tape is not None):
                    a.give_dense(to_device(tape[b][id(a)], self.device))
                if dense_layer is not None:
                    dense_outs.append(self.run(dense_layer, dense_in[b], b).to(self.store))
                y = self.run(self.layer, x, b)
                if taping:
                    new_tape.append({id(a): to_device(a.take_dense(), self.store) for a in later if a.two})
                if replay and self.replayable:       # the layer's output must be h + down(x~)
                    h, d, flat = (t.reshape(-1, y.shape[-1]) for t in (cur.pop("h"), cur.pop("d"), y))
                    self.replayable = torch.equal(flat, h + d)
                    self.saved = [*self.saved, cur.pop("x").to(self.store)] if self.replayable else []
                if keep:
                    outs.append(y.to(self.store))
        self.z = zs if keep_z else self.z
        return (outs if keep else None), dense_outs, (new_tape if taping else tape)

    def replay(self, outs, before) -> list[Tensor]:
        """The pruned outputs after down_proj changed from `before`: y + x~ (W' - W)ᵀ + (b' - b)."""
        down, (w0, b0) = self.view.mlp.down, before
        dw = down.weight.detach().float() - w0.float()
        db = 0 if down.bias is None else down.bias.detach().float() - (0 if b0 is None else b0.float())
        nxt = [(torch.addmm(y.to(self.device).reshape(-1, y.shape[-1]).float(),
                            x.to(self.device).reshape(-1, x.shape[-1]).float(), dw.T) + db)
               .to(y.dtype).reshape(y.shape).to(self.store) for y, x in zip(outs, self.saved)]
        self.saved = []
        return nxt


def _residual_norm(layer: nn.Module, path: str) -> nn.Module:
    for name in RESIDUAL_NORMS[path]:
        if hasattr(layer, name):
            return getattr(layer, name)
    raise PruneLabError(f"cannot find the residual stream of {path} in {type(layer).__name__}")

