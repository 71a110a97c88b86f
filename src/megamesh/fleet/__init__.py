"""Fleet planning and simulation (pure Python, never imports jax)."""
