"""Ahead-of-time compilation of megamesh's own steps for TPU topologies that are not here."""
