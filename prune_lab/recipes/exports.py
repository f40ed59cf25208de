"""output.export (hf | gguf | compressed_tensors) across a job's stages: what each format refuses, and when.

Configuration only (when the job is built): output.gguf_type without output.export=gguf, a 4-bit GGUF type
of a model that is not quantized on a matching grid, compressed_tensors without quant=uniform at 4 or 8 bits
(or without the package), a GGUF file or compressed_tensors directory already in the run dir. Right after
loading: a family (or tokenizer) the format cannot describe, a refit that adds biases the architecture
does not read. Right after pruning (the unstructured family: right after loading, its shapes are final),
before the engine pass and evaluating: a shape no architecture expresses, groups that do not divide a width.
"""
from __future__ import annotations

from ..artifacts import gguf_write, pack_quantized
from ..artifacts.export import check_bias_refit, check_family, export_hf, plain_config
from ..artifacts.gguf_types import GRID_TYPES
from ..errors import PruneLabError
from ..quant import Mixed, Uniform

GGUF_FILE = "model.gguf"
CT_DIR = "compressed_tensors"


def export_kind(cfg) -> str | None:
    return cfg.output.export.name if cfg.output.export else None


def gguf_type(cfg) -> str:
    return cfg.output.gguf_type.name if cfg.output.gguf_type else "f16"


def check_options(cfg, run_dir, quant) -> None:
    """Before loading anything."""
    kind = export_kind(cfg)
    if cfg.output.gguf_type and kind != "gguf":
        raise PruneLabError(f"output.gguf_type={gguf_type(cfg)} sets the tensors of output.export=gguf: add "
                            f"output.export=gguf or drop output.gguf_type")
    if kind == "compressed_tensors":
        check_pack_quantized(run_dir, quant)
    if kind != "gguf":
        return
    if (run_dir / GGUF_FILE).exists():
        raise PruneLabError(f"output.export=gguf: {run_dir / GGUF_FILE} already exists (a GGUF file is never "
                            f"overwritten): choose another hydra.run.dir or remove it")
    t = gguf_type(cfg)
    if t in GRID_TYPES:
        want = "sym" if t == "q4_0" else "asym"
        grid = (f"quant=uniform with quant.bits=4, quant.sym={'true' if want == 'sym' else 'false'} and "
                f"quant.group_size a multiple of 32 (or null)")
        if not isinstance(quant, Uniform):
            raise PruneLabError(f"output.gguf_type={t} writes a 4-bit grid exactly, and this model has none: "
                                f"quantize with {grid}, or choose f32|f16|bf16|q8_0")
        if quant.bits != 4 or quant.sym != (want == "sym") or (quant.group_size or 32) % 32:
            raise PruneLabError(f"output.gguf_type={t} needs {grid}; this job quantizes with quant.bits="
                                f"{quant.bits}, quant.sym={str(quant.sym).lower()}, quant.group_size="
                                f"{quant.group_size} (q4_0 = symmetric, q4_1 = asymmetric)")


def check_pack_quantized(run_dir, quant) -> None:
    what = pack_quantized.WHAT
    uniform = isinstance(quant, Uniform) and not isinstance(quant, Mixed)        # Mixed extends Uniform
    if not uniform or quant.bits not in pack_quantized.BITS:
        got = f"quant.bits={quant.bits}" if uniform else f"quant={'mixed' if quant.enabled else 'none'}"
        raise PruneLabError(f"{what} writes a quant=uniform model with quant.bits=4 or 8 (W4A16 / W8A16) on its own "
                            f"grid, and this job has {got}: use quant=uniform quant.bits=4|8, or output.export=hf")
    if (run_dir / CT_DIR).exists():
        raise PruneLabError(f"{what}: {run_dir / CT_DIR} already exists (an export is never overwritten): choose "
                            f"another hydra.run.dir or remove it")
    pack_quantized.require()


def check_loaded(job, refit_biases: str | None = None) -> None:
    """Right after loading (refit_biases: the refit that adds o_proj/down_proj biases, if any)."""
    kind = export_kind(job.cfg)
    if kind in ("hf", "compressed_tensors"):
        what = f"output.export={kind}"
        check_family(job.model, what)
        if refit_biases:
            check_bias_refit(job.model, refit_biases, what)
    elif kind == "gguf":
        gguf_write.require_gguf()
        gguf_write.check_model(job.model, job.tokenizer, refit_biases)
        if gguf_type(job.cfg) in GRID_TYPES:
            gguf_write.check_blocks(job.model)


def check_pruned(job) -> None:
    """After slicing, before evaluating (the unstructured family: after loading, before the engine pass)."""
    kind = export_kind(job.cfg)
    if kind == "hf":
        plain_config(job.model)
    elif kind == "compressed_tensors":
        plain_config(job.model, pack_quantized.WHAT)
        pack_quantized.check_widths(job.model, job.cfg.quant.group_size)
    elif kind == "gguf":
        gguf_write.layout(job.model)
        if gguf_type(job.cfg) in GRID_TYPES:
            gguf_write.check_blocks(job.model)        # pruned widths: whole 32-blocks (allocator.multiple_of=32)


def write(job, grids=None) -> dict:
    """The export itself (metrics.json `export`)."""
    kind, quant = export_kind(job.cfg), job.cfg.quant
    if kind == "hf":
        return export_hf(job.model, job.tokenizer, job.run_dir / "hf")
    if kind == "compressed_tensors":
        return pack_quantized.export_pack_quantized(job.model, job.tokenizer, job.run_dir / CT_DIR, grids or {},
                                                    quant.bits, quant.sym, quant.group_size)
    return gguf_write.export_gguf(job.model, job.tokenizer, job.run_dir / GGUF_FILE, gguf_type(job.cfg), grids)
