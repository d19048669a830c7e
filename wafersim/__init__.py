"""Discrete-event simulation of mesh programs, the GPU baseline, and the CLI."""
