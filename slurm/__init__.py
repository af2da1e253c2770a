"""The launcher and everything about running on a cluster: submitit jobs, sweeps, status."""
