"""The backends that run a search: in this process (local), as local worker processes sharing the study (workers,
packing them on GPUs), or on a Ray cluster (ray_run, ray_search, ray_trainable; Ray is imported only when used)."""
