"""The training loop on DeepSpeed: engine set-up, optimizer and schedule, metrics."""
