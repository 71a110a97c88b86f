"""The planner: parallel layout, memory, step time, MFU, cost and serving capacity.

Pure Python over the config, the parameter spec table, the sharding rules and the
hardware catalog; it never imports jax (a test enforces it), so it answers in
milliseconds anywhere and `megamesh fleet` can call it in its inner loop.
"""
