"""Training machinery: train state, optimisers, EMA, the jitted train step, checkpointing,
logging, the training loop and Python-file configs."""
