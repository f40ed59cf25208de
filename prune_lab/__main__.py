"""`python -m prune_lab [overrides]` and the `prune-lab` console script: the Hydra app (conf/config.yaml)."""
from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
import yaml  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.errors import CompactHydraException, InstantiationException  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException  # noqa: E402

from . import schema  # noqa: E402
from .artifacts.rundir import RunDirGuard, exit_code, signal_of, signals_as_interrupts  # noqa: E402
from .artifacts.rundir import register_resolvers as register_run_dir_resolvers  # noqa: E402
from .atomic import disk_full, full_file  # noqa: E402
from .errors import BudgetError, PruneLabError  # noqa: E402
from .recipes import run  # noqa: E402
from .recipes.common import instantiation_error  # noqa: E402
from .study.job import Outcome, PlanMemo, in_study, job_outcome  # noqa: E402
from .study.objective import n_objectives, objective_values, register_resolvers  # noqa: E402

# An absolute directory: the same configs whether started as `python -m prune_lab`, as the console
# script, from a checkout or from an installed wheel.
CONF = Path(__file__).resolve().parent / "conf"
EXAMPLES = (
    "prune-lab importance=wanda allocator=layerwise layer_importance=removal allocator.distribution=2:8",
    "prune-lab -m allocator.ratio=0.1,0.2,0.3 importance=taylor,wanda     # a sweep, one run dir per job",
)

schema.register()
register_resolvers()
register_run_dir_resolvers()
log = logging.getLogger("prune_lab")


def help_text() -> str:
    """The groups of conf/ with their options (default starred), two examples, where to look next."""
    defaults = {}      # the groups of config.yaml's defaults list, in its order, with their defaults
    for entry in yaml.safe_load((CONF / "config.yaml").read_text())["defaults"]:
        if isinstance(entry, dict):
            defaults.update(entry)
    lines = ["prune_lab: structured (GQA-aware) pruning of decoder LLMs, a Hydra app.", "",
             "usage: prune-lab [-m] [group=option ...] [key=value ...] [--cfg job] [--config-dir DIR]", "",
             "config groups (* = default; options are prune_lab/conf/<group>/<option>.yaml):"]
    for group in defaults:
        options = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
        shown = [f"{o}*" if o == defaults.get(group) else o for o in options]
        lines.append(f"  {group:<17} {', '.join(shown)}")
    lines += ["", "other keys: seed, verify, calibration.*, engine.*, output.*, cache.*, objective "
              "(`prune-lab --cfg job` prints the whole composed job)", "", "examples:"]
    lines += [f"  {e}" for e in EXAMPLES]
    lines += ["", "Each job writes a run dir (outputs/<date>/<time>/, printed at the end) with metrics.json, "
              "plan.csv, layers.csv and plots.",
              "--config-dir DIR adds your own configs (DIR/<group>/<name>.yaml); --hydra-help: Hydra's flags."]
    return "\n".join(lines)


def took(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{int(seconds // 60)} min {seconds % 60:.0f} s"


# Hydra >= 1.4 asks which config `_target_`s may be instantiated; add your own components' modules
# with PRUNE_LAB_TRUSTED_TARGETS="mypkg.*,other.Class" (the jobs' components use the same list).
@hydra.main(config_path=str(CONF), config_name="config", execution_whitelist=schema.trusted_targets())
def hydra_main(cfg: DictConfig) -> float | tuple[float, float] | Outcome | None:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    start = time.time()
    study = hc.mode == RunMode.MULTIRUN and in_study(hc)
    memo = PlanMemo.from_hydra(hc.sweeper) if study and not cfg.verify else None
    try:
        with signals_as_interrupts():     # SIGTERM ends the job as Ctrl-C does: status interrupted
            result = run(cfg, run_dir, memo=memo)
    except PruneLabError as e:
        if study and hc.sweeper.constraints and isinstance(e, BudgetError):
            # an infeasible point (split/freeze the ratio cannot meet): a constraint violation, not a failure
            return Outcome.infeasible(n_objectives(cfg.objective), e.shortfall, str(e))
        if hc.mode == RunMode.MULTIRUN:   # let the sweeper record a failed trial
            raise
        print(f"prune_lab: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:        # stops a multirun too
        print(f"prune_lab: interrupted by {signal_of(e)}: {run_dir} marked interrupted", file=sys.stderr)
        sys.exit(exit_code(e))
    log.info("run dir: %s (took %s)", run_dir, took(time.time() - start))
    if result.ppl is None:
        return None
    log.info("objective (perplexity): %.4f", result.ppl)
    values = objective_values(cfg.objective, result.ppl, result.params_total)
    return job_outcome(values, result, run_dir, memo) if study else values


def one_line(e: Exception) -> str | None:
    """What Hydra raises before or around the job for bad input (a misspelt key or option, a refused
    `_target_` of hydra.callbacks/sweeper, a sweeper setting), as one line; None for anything else."""
    cause = e.__cause__
    if isinstance(e, PruneLabError):
        return str(e)
    if disk_full(e):                 # e.g. Hydra writing <run dir>/.hydra/ on a full disk
        return f"no space left on {full_file(e) or RunDirGuard.checked or 'the device'}"
    if isinstance(e, InstantiationException):
        return str(cause) if isinstance(cause, PruneLabError) else instantiation_error(e)
    if isinstance(e, CompactHydraException):
        if isinstance(cause, (ConfigAttributeError, ConfigKeyError)) and cause.parent_node is not None:
            return schema.unknown_key(cause.full_key, cause.parent_node.keys())
        text = str(e).split("Config search path:")[0]
        if isinstance(cause, OmegaConfBaseException):
            text += f": {str(cause).splitlines()[0]}"
        return " ".join(text.split())
    return None


def main() -> None:
    """Entry point of `python -m prune_lab` and `prune-lab`: our --help, else Hydra. Hydra re-raises
    (HYDRA_FULL_ERROR) what fails outside the job, so bad input there is one line and exit 2 too;
    a user who set HYDRA_FULL_ERROR=1 gets Hydra's own full tracebacks."""
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(help_text())
        return
    if os.environ.get("HYDRA_FULL_ERROR") == "1":
        return hydra_main()
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        hydra_main()
    except Exception as e:
        line = one_line(e)
        if line is None:
            raise
        print(f"prune_lab: error: {line}", file=sys.stderr)
        sys.exit(2)
    finally:
        os.environ.pop("HYDRA_FULL_ERROR", None)


if __name__ == "__main__":
    main()
