"""Machine translation: sacrebleu scoring and batched translation (eval.py), the GPT-MT evaluation harness
(prompts.py, shots.py, documents.py, hybrid.py, suite.py: `jaxmoe eval-mt --suite wmt22`), and the demo's
generated rule-based language (synthetic.py).
PEMA (pema/: memory, module, train, decode) adapts a model from its pre-norm states and LM head, not its weights."""
