"""Training library behind ``python -m xft_jax.train``: loss, optimiser, the jitted
sharded step, orbax checkpoints, logging and the loop. Library code never reads flags."""
