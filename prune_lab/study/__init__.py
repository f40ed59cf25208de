"""Optuna studies over jobs: the study sweeper (Hydra plugin in plugin.py, driver in sweeper.py), its
storages, the job side of a trial (job.py: outcomes, plan reuse) and the objective values (objective.py)."""
