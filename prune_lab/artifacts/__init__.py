"""Everything a job writes into (or reads back from) a run dir or a checkpoint: metrics.json and the run
lock, plans and tables, scores.safetensors, plots, compression files, pruned checkpoints, HF exports."""
