"""The unstructured method family's lifecycle (method=sparsegpt|wanda|magnitude): the engine layer
method that sparsifies (and, with quant=uniform|mixed, quantizes) every linear of a layer from its
input statistics, and keeps the masks and bit widths for recovery, statistics and the checkpoint.
The tensor math is in masks.py (which weights go) and sweep.py (SparseGPT's OBS / GPTQ sweep);
`asymmetric` > 0 asks the engine for the dense stream too and sweeps sweep.asymmetric_target."""
from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import Tensor

from ..core.adapter import LayerView, layer_views, view_linears
from ..engine import LayerMethod
from ..engine.hooks import Hooks
from ..engine.stats import output_error
from ..errors import PruneLabError
from ..quant.base import NoQuant
from ..quant.grid import RecordingQuantizer, quantize_rtn
from .masks import SparsitySpec, baseline_mask
from .sweep import asymmetric_target, inverse_hessian_factor, obs_sweep

# engine paths -> HF module names (the GGUF export's grids)
HF_NAMES = {"attn.q": "self_attn.q_proj", "attn.k": "self_attn.k_proj", "attn.v": "self_attn.v_proj",
            "attn.o": "self_attn.o_proj", "mlp.gate": "mlp.gate_proj", "mlp.up": "mlp.up_proj",
            "mlp.down": "mlp.down_proj"}
TRUE_SEQUENTIAL = (("attn.q", "attn.k", "attn.v"), ("attn.o",), ("mlp.gate", "mlp.up"), ("mlp.down",))


class Unstructured(LayerMethod):
    """Engine layer method shared by sparsegpt / wanda / magnitude.

    Keeps per linear (layer, path): the keep-mask (when sparse) and the bits per row (when quantized),
    for recovery with masks kept, statistics and the checkpoint. Records per-linear numbers in the
    engine's records."""

    family = "unstructured"
    name = "unstructured"
    updates_weights = False          # True: OBS update of the remaining weights (SparseGPT)

    def __init__(self, sparsity: float = 0.5, prune_n: int = 0, prune_m: int = 0, blocksize: int = 128,
                 damp: float = 0.01, true_sequential: bool = False, asymmetric: float = 0.0,
                 residual: bool = False):
        self.spec = SparsitySpec(float(sparsity), int(prune_n), int(prune_m))
        self.spec.check()
        if blocksize < 1:
            raise PruneLabError(f"method.blocksize must be >= 1, got {blocksize}")
        if not (damp > 0 and math.isfinite(damp)):
            raise PruneLabError(f"method.damp must be a finite number > 0 (a fraction of the mean Hessian "
                                f"diagonal), got {damp}")
        if not 0.0 <= float(asymmetric) <= 1.0:
            raise PruneLabError(f"method.asymmetric must be in [0, 1] (the fraction of the dense-path "
                                f"correction; 0 = off), got {asymmetric}")
        if residual and not asymmetric:
            raise PruneLabError("method.residual=true absorbs the residual-stream drift into the asymmetric "
                                "target: it needs method.asymmetric > 0")
        self.blocksize, self.damp, self.true_sequential = int(blocksize), float(damp), true_sequential
        self.asymmetric, self.residual = float(asymmetric), bool(residual)
        self.quant = NoQuant()
        self.masks: dict[tuple[int, str], Tensor] = {}
        self.bits: dict[tuple[int, str], Tensor] = {}
        self.grids: dict[tuple[int, str], tuple[Tensor, Tensor]] = {}     # (scale, zero) of each quantized linear
        self._recording: RecordingQuantizer | None = None

    def with_quant(self, quant) -> "Unstructured":
        self.quant = quant
        if self.asymmetric and not self.needs_gram:
            raise PruneLabError(f"method.asymmetric={self.asymmetric} would change nothing: it corrects the weights "
                                f"a sweep updates, and method={self.name} only masks them (it sweeps only with "
                                f"quant=uniform|mixed): drop method.asymmetric, or add a quant")
        return self

    def check_model(self, views) -> None:
        """N:M against the input width of every linear (and the sweep's block), before the engine pass."""
        for view in views:
            for lin in view_linears(view).values():
                self.spec.check_width(lin.in_features, self.blocksize if self.needs_gram and self.spec.nm else None)

    @property
    def needs_gram(self) -> bool:
        return self.updates_weights or self.quant.enabled

    @property
    def needs_cross(self) -> bool:
        """Asymmetric calibration: the engine keeps the dense stream too (X next to the pruned-path X~)."""
        return self.asymmetric > 0 and self.needs_gram

    @property
    def needs_residual(self) -> bool:
        return self.needs_cross and self.residual

    def stages(self, view: LayerView) -> list[list[str]]:
        """All linears of a layer from one calibration pass (as SparseGPT / llm-compressor), or the
        GPTQ true-sequential order (q/k/v, o, gate/up, down) with true_sequential=true. The linears of an
        emptied block (plan.attn_blocks / mlp_blocks: 0 rows or 0 columns) have nothing to sweep: left out."""
        paths = [p for p, lin in view_linears(view).items() if lin.weight.numel()]
        if not self.true_sequential:
            return [paths]
        return [[p for p in group if p in paths] for group in TRUE_SEQUENTIAL if any(p in paths for p in group)]

    @torch.no_grad()
    def apply(self, index: int, view: LayerView, stats: dict) -> dict:
        linears = {p: lin for p, lin in view_linears(view).items() if p in stats}
        weights = {p: lin.weight.data for p, lin in linears.items()}
        hessians, factors, shared = {}, {}, {}
        if self.needs_gram:
            for p, s in stats.items():
                if s.count == 0:
                    raise PruneLabError("the calibration set has no (unpadded) tokens: raise calibration.n_samples")
                if id(s.gram) not in shared:                                     # q/k/v, gate/up: one input
                    h = s.gram * (2.0 / s.count)                                 # H = 2·X~·X~ᵀ / n
                    shared[id(s.gram)] = h, inverse_hessian_factor(h, self.damp)
                hessians[p], factors[p] = shared[id(s.gram)]
                if self.needs_cross:                                             # sweep on W0, not W
                    weights[p] = asymmetric_target(weights[p], s, factors[p], self.asymmetric)
        hinv_diags = {p: u.square().sum(0) for p, (u, _) in factors.items()}    # diag(UᵀU) = diag(H⁻¹)
        factor_diags = {p: torch.diagonal(u) for p, (u, _) in factors.items()}
        bits, ranges = self.quant.allocate(weights, stats, hinv_diags, layer=index, factor_diags=factor_diags)
        record = {}
        for p, lin in linears.items():
            w_old = lin.weight.data
            new, mask = self.sparsify(weights[p], stats[p], hessians.get(p), factors.get(p), bits.get(p))
            err = None
            if hessians.get(p) is not None:     # ‖W·X − W'·X~‖² / ‖W·X‖² (X~ = X on one stream)
                s = stats[p]
                energy = s.w_energy(w_old)
                err = output_error(new, s.gram.double(), s.w_cross(w_old), energy) / max(float(energy), 1e-30)
            lin.weight.data.copy_(new)
            if self.spec.active:
                self.masks[(index, p)] = mask.cpu()
            if p in bits:
                self.bits[(index, p)] = bits[p].cpu()
                if self._recording is not None:
                    self.grids[(index, p)] = self._recording.grid()
            self._recording = None
            record[p] = {"rows": w_old.shape[0], "cols": w_old.shape[1],
                         "sparsity": float(1 - mask.float().mean()) if self.spec.active else 0.0,
                         "zeros": float((new == 0).float().mean()),
                         "avg_bits": float(bits[p].float().mean()) if p in bits else None,
                         "importance_min": ranges.get(p, (None, None))[0],
                         "importance_max": ranges.get(p, (None, None))[1], "rel_error": err}
        return record

    def sparsify(self, weight, stats, hessian, factor, bits) -> tuple[Tensor, Tensor]:
        """(new weight, keep-mask) of one linear: the baseline mask, then GPTQ keeping it if quantized."""
        mask = baseline_mask(weight, self.spec, self.input_norm(stats)) if self.spec.active else None
        if hessian is None:
            return weight * mask, mask
        new, mask, _ = obs_sweep(weight, hessian, self.spec, blocksize=self.blocksize, damp=self.damp,
                                 quantizer=self.grid_quantizer(bits), fixed_mask=mask, factor=factor,
                                 act_order=self.quant.act_order)
        return new, mask

    def grid_quantizer(self, bits) -> RecordingQuantizer | None:
        """The quant option's quantizer of one linear, recording its grid (self.grids after apply)."""
        q = self.quant.quantizer(bits)
        self._recording = None if q is None else RecordingQuantizer(q.bits, q.sym, q.group_size)
        return self._recording

    def grids_by_name(self) -> dict[str, dict]:
        """{HF weight name: scale, zero (rows, groups), bits (rows), group_size} of every quantized linear: the
        packed checkpoint (artifacts/packed.py) and output.gguf_type=q4_0|q4_1 write them."""
        return {f"model.layers.{i}.{HF_NAMES[p]}.weight": {"scale": s, "zero": z, "bits": self.bits[(i, p)],
                                                           "group_size": self.quant.group_size}
                for (i, p), (s, z) in self.grids.items() if p in HF_NAMES}

    def masks_by_name(self) -> dict[str, dict]:
        """{HF weight name: mask, prune_m} of every N:M-masked linear ({} unless N:M): the checkpoint stores
        only the kept weights (artifacts/sparse.py, artifacts/packed.py)."""
        if not self.spec.nm:
            return {}
        return {f"model.layers.{i}.{HF_NAMES[p]}.weight": {"mask": mask, "prune_m": self.spec.prune_m}
                for (i, p), mask in self.masks.items() if p in HF_NAMES}

    def input_norm(self, stats) -> Tensor | None:
        return None

    @contextmanager
    def kept(self, model):
        """Recovery that cannot revive pruned weights: gradients of masked weights are zeroed while
        training (full fine-tuning), and on exit the masks are applied again (LoRA merges a dense delta);
        a quantized model is put back on its grid (round-to-nearest with each row's bits)."""
        linears = {(v.index, p): lin for v in layer_views(model) for p, lin in view_linears(v).items()}
        try:
            with Hooks() as hooks:
                for k, m in self.masks.items():
                    hooks.add(linears[k].weight.register_hook(lambda g, m=m: g * m.to(g.device, g.dtype)))
                yield
        finally:
            with torch.no_grad():
                linears = {(v.index, p): lin for v in layer_views(model) for p, lin in view_linears(v).items()}
                for k, lin in linears.items():
                    w, mask = lin.weight.data, self.masks.get(k)
                    if mask is not None:
                        w.mul_(mask.to(w.device, w.dtype))
                    if k in self.bits:
                        grid = RecordingQuantizer(self.bits[k].to(w.device), self.quant.sym, self.quant.group_size)
                        q = quantize_rtn(w.float(), grid)
                        self.grids[k] = grid.grid()
                        w.copy_(q if mask is None else q * mask.to(w.device))
