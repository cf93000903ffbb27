"""What nodes share in the cluster shape: presence, limits, jobs and draining."""
