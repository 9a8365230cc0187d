"""Starting ranks: discovering them from the environment, locally with torchrun, and on SLURM."""
