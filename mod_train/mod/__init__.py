"""The method itself, free of any parallelism: router.py (the MoD math), attention.py, layer.py,
cache.py, model.py (the decoder stack) and convert.py (modify / save / load / calibrate)."""
