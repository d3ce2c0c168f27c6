"""Training machinery: train state (with model state), optimisers, EMA, precision and loss
scaling, the jitted single- and multi-model train steps, checkpointing and the training loop."""
