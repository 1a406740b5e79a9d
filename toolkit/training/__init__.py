"""Training: the plan built from a recipe, the trainer, memory planning, checkpointing, processes, samples, trackers."""
