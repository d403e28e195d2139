"""Machine translation: batched greedy translation with a trained model, and sacreBLEU corpus scoring."""
