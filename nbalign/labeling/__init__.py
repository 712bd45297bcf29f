"""Humans in the loop: candidates the model writes, widgets a person labels them with, an AI judge that
pre-labels, and the durable store every label lands in (the store belongs to the engine: data reads it)."""
