"""Training: the loss, optimizer and jitted step (loop.py), tfds data (data.py) and token batches (batches.py),
orbax checkpoints (checkpoint.py), metrics and plots (metrics.py), run configs (run_config.py), the training job
behind `jaxmoe train` (trainer.py), and Phi-4-multimodal adapter fine-tuning (multimodal.py)."""

from jaxmoe.train.loop import (Batch, TrainConfig, current_learning_rate, evaluate, learning_rate_schedule,
                               make_optimizer, next_token_loss, next_token_stats, train_step)

__all__ = ["Batch", "TrainConfig", "current_learning_rate", "evaluate", "learning_rate_schedule", "make_optimizer",
           "next_token_loss", "next_token_stats", "train_step"]
