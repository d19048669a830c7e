"""Lowers model op graphs to dataflow programs on a 2D mesh of cores."""
