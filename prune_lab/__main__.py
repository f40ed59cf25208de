"""`python -m prune_lab [overrides]`: the Hydra app (see conf/config.yaml)."""
from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from hydra.types import RunMode  # noqa: E402
from omegaconf import DictConfig  # noqa: E402

from . import schema  # noqa: E402
from .errors import PruneLabError  # noqa: E402
from .pipeline import run  # noqa: E402
from .rundir import exit_code, signal_of, signals_as_interrupts  # noqa: E402
from .rundir import register_resolvers as register_run_dir_resolvers  # noqa: E402
from .sweep import objective_values, register_resolvers  # noqa: E402

schema.register()
register_resolvers()
register_run_dir_resolvers()
log = logging.getLogger("prune_lab")


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def main(cfg: DictConfig) -> float | tuple[float, float]:
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    try:
        with signals_as_interrupts():     # SIGTERM ends the job as Ctrl-C does: status interrupted
            objective = run(cfg, run_dir)
    except PruneLabError as e:
        if hc.mode == RunMode.MULTIRUN:   # let the sweeper record a failed trial
            raise
        print(f"prune_lab: error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt as e:        # stops a multirun too
        print(f"prune_lab: interrupted by {signal_of(e)}: {run_dir} marked interrupted", file=sys.stderr)
        sys.exit(exit_code(e))
    log.info("objective (perplexity): %.4f", objective)
    return objective_values(cfg.objective, objective, run_dir)


if __name__ == "__main__":
    main()
