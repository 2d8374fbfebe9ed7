"""The study: the sweep grid, result tables with bootstrap CIs, plots, the probe summary."""
