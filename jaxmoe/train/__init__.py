"""Training: the masked next-token loss, AdamW with warmup and cosine decay, a jitted step, evaluation."""

from jaxmoe.train.loop import (Batch, TrainConfig, evaluate, learning_rate_schedule, make_optimizer,
                               next_token_loss, train_step)

__all__ = ["Batch", "TrainConfig", "evaluate", "learning_rate_schedule", "make_optimizer", "next_token_loss",
           "train_step"]
