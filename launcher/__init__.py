"""SLURM launch: `albef-ds launch slurm` checks a request, renders the sbatch template and submits it."""
