"""The runtime: rank discovery, engines (torch, DeepSpeed ZeRO-2), schedules, the one Trainer and its task
interface, the checkpoint package, the padded all-gather, logging."""
