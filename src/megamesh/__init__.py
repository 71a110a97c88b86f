"""megamesh: plan, compile, train and serve decoder-only LLMs from one CPU to a TPU fleet."""

__version__ = "0.1.0"
