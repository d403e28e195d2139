"""CPO's validation metrics for any model folder, e.g. the stage-2 model before CPO (issue 16, reproduction 2).

  python experiments/mt/cpo_eval.py --model runs/alma-stage2/model --triplets runs/alma-triplets/valid.jsonl

prints one JSON object: jaxmoe.train.cpo.cpo_evaluate over every triplet of the file (every direction), with ALMA-R's
settings (sigmoid, beta 0.1, cpo_alpha 1): loss, rewards/chosen, rewards/rejected, rewards/margins,
rewards/accuracies, logps/chosen, logps/rejected, nll_loss; the numbers a `objective: cpo` run logs as "valid".
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp

from jaxmoe.io.load import load_model
from jaxmoe.io.tokenizer import Tokenizer
from jaxmoe.train import cpo


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="a model folder with its tokenizer")
    parser.add_argument("--triplets", required=True, help="a triplet file (jaxmoe's layout)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-len", type=int, default=256)
    args = parser.parse_args(argv)
    model, tokenizer = load_model(args.model), Tokenizer.from_folder(args.model)
    triplets = cpo.read_triplets(args.triplets, src_lang=None, tgt_lang=None)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    batches = [jax.tree.map(jnp.asarray, b) for b in cpo.preference_eval_batches(
        triplets, tokenizer, batch_size=args.batch_size, max_len=args.max_len, pad_id=pad_id)]
    result = cpo.cpo_evaluate(model, batches, config=cpo.CPOConfig())
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
