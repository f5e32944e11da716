"""Deployments of the jobs: one catalog for `batchflows serve` and `batchflows deploy`."""
