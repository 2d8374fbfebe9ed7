"""Evaluation library behind ``python -m xft_jax.evaluate`` and ``python -m xft_jax.probe``:
label-position scoring, rating metrics, batching over a mesh, the layerwise probe, and
the files they write."""
