"""Training loop: rank discovery, optimizer and schedules, the step loop, checkpoints, logging."""
