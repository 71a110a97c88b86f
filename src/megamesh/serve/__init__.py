"""Serving: the decode step (here), and the engine and HTTP API built on it."""
