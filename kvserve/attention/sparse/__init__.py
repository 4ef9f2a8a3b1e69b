"""Decode attention that reads a subset of the KV cache: streaming (sinks + window), MagicPIG, top-k."""
