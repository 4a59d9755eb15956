"""Parallelism applied from outside the single-device model: the device mesh and layout, expert-parallel
dispatch and combine, FSDP2 wrapping, pipeline stages and schedules, distributed checkpoints, and the
process launcher. The model never imports this package."""
