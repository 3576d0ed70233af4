"""SLURM launch: sbatch templates and the code that renders and submits them (filled by the SLURM issue)."""
