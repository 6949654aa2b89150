"""Sequences: the spec, its wire models, rendering, compose agents, suppressions and the
client part ``pl.sequences``."""
