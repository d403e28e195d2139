"""Training: the loss, optimizer and jitted step (loop.py), tfds data (data.py) and token batches (batches.py),
orbax checkpoints (checkpoint.py), metrics and plots (metrics.py), run configs (run_config.py) and the training job
behind `jaxmoe train` (trainer.py)."""

from jaxmoe.train.loop import (Batch, TrainConfig, evaluate, learning_rate_schedule, make_optimizer,
                               next_token_loss, train_step)

__all__ = ["Batch", "TrainConfig", "evaluate", "learning_rate_schedule", "make_optimizer", "next_token_loss",
           "train_step"]
