"""Parallelism applied from outside the model: distributed init, ZeRO-3 model construction,
AutoTP, pipeline stages, DeepSpeed config presets and memory planning."""
