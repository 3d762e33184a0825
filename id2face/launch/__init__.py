"""Launching grids of runs: locally in sequence or as one SLURM array job through submitit."""
