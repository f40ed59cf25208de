"""The model-side ground of every family: the architecture adapter, plans, unit scores, the
executor that slices a plan and the proof of equivalence. Pure of Hydra, OmegaConf and Optuna."""
