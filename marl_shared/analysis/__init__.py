"""Analysis: evaluation, plots, representation similarity and rendering of runs."""
