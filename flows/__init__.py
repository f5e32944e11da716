"""One module per job. A flow body only orchestrates: map, wait, branch, report."""
