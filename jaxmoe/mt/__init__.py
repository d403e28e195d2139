"""Machine translation: sacrebleu scoring and batched greedy translation (eval.py), and the demo's generated
rule-based language (synthetic.py)."""
