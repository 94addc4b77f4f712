"""Robustness suite: fuzzed requests, store faults, hostile adapter files, load and auth."""
