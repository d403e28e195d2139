"""jaxmoe.generate(num_beams=N) equals transformers' beam search token for token, and translate passes beams on.

transformers' PyTorch Phi3ForCausalLM.generate(num_beams=N, do_sample=False) is the oracle, on conftest's tiny
random LongRoPE config (original_max_position_embeddings 16): prompts left-padded to 16 columns plus 12 new
tokens reach column 16 at the first decode step, where transformers recomputes the whole cache with the long
factors, so every search here also checks that recompute. The default-tier cases share one prompt shape, so each
beam count compiles one program.
"""

import math

import numpy as np
import pytest
import tokenizers
import torch

import jaxmoe
from conftest import hf_model
from jaxmoe.infer.beam import _beam_search_compiled
from jaxmoe.mt.eval import translate

TIED = "gqa_partial_longrope_tied"
WIDTH, NEW = 16, 12
# transformers fills a finished hypothesis with eos_token_id[0], not the pad id, when the pad id is 0 (its
# `pad_token_id or eos_token_id[0]` reads the tensor 0 as false); any other pad id it writes as given.
PAD = 3


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return jaxmoe.load_hf(hf_checkpoint(TIED))


def left_padded(lengths, width, seed):
    """ids and attention mask [len(lengths), width], each row's random tokens right-aligned after id 0."""
    rng = np.random.default_rng(seed)
    ids, mask = np.zeros((len(lengths), width), np.int64), np.zeros((len(lengths), width), np.int64)
    for row, n in enumerate(lengths):
        ids[row, width - n:], mask[row, width - n:] = rng.integers(3, 128, size=n), 1
    return ids, mask


PROMPTS = left_padded([16, 9], WIDTH, seed=4)


def hf_beams(ids, mask, name=TIED, new=NEW, **kwargs):
    with torch.no_grad():
        return hf_model(name).generate(torch.tensor(ids), attention_mask=torch.tensor(mask), do_sample=False,
                                       max_new_tokens=new, pad_token_id=PAD, **kwargs).numpy()


def assert_same_as_transformers(got, expected):
    """transformers crops its rows to the longest returned hypothesis; jaxmoe keeps the full width, padded."""
    got = np.asarray(got)
    assert got.dtype == np.int32 and got.shape[0] == expected.shape[0] and got.shape[1] >= expected.shape[1]
    np.testing.assert_array_equal(got[:, :expected.shape[1]], expected)
    assert (got[:, expected.shape[1]:] == PAD).all()


def early_eos():
    """An EOS id that 4-beam search reaches early: the best hypothesis' token at step 1 under the config's EOS."""
    return int(hf_beams(*PROMPTS, num_beams=4)[0, WIDTH + 1])


@pytest.mark.parametrize("num_beams,eos,length_penalty,early_stopping,num_return_sequences", [
    (4, "config", 1.0, False, 1),
    (4, "early", 1.0, False, 1),
    (4, "early", 0.6, False, 1),
    (4, "early", 1.0, True, 1),
    (4, "config", 1.0, "never", 1),  # stops later than early_stopping=False here, with a better hypothesis
    (4, "early", 1.0, False, 4),
    (5, "early", 0.6, True, 2),
    (5, "config", 1.0, False, 5),
])
def test_beam_search_matches_transformers(model, num_beams, eos, length_penalty, early_stopping,
                                          num_return_sequences):
    ids, mask = PROMPTS
    kwargs = dict(num_beams=num_beams, length_penalty=length_penalty, early_stopping=early_stopping,
                  num_return_sequences=num_return_sequences)
    if eos == "early":
        kwargs["eos_token_id"] = [early_eos()]
    got = jaxmoe.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD, **kwargs)
    assert got.shape == (2 * num_return_sequences, WIDTH + NEW)
    assert_same_as_transformers(got, hf_beams(ids, mask, **kwargs))


def test_early_eos_ends_hypotheses_and_the_settings_change_them(model):
    """The parity cases above can fail: with the early EOS, hypotheses end before max_new_tokens, and length_penalty
    and each early_stopping mode pick other hypotheses than the default."""
    ids, mask = PROMPTS
    eos = early_eos()
    run = lambda **kwargs: np.asarray(jaxmoe.generate(  # noqa: E731
        model, ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD, num_beams=4, eos_token_id=eos,
        **kwargs))
    default = run(num_return_sequences=4)
    tokens = default[:, WIDTH:]
    ended = [row for row in range(len(tokens)) if eos in tokens[row, :-1]]
    assert ended and all((tokens[row, list(tokens[row]).index(eos) + 1:] == PAD).all() for row in ended)
    others = [run(num_return_sequences=4, length_penalty=0.6), run(num_return_sequences=4, early_stopping=True),
              run(num_return_sequences=4, early_stopping="never", length_penalty=2.0)]
    for other in others:
        assert (other != default).any()


def test_num_beams_1_is_greedy_as_in_transformers(model):
    ids, mask = PROMPTS
    got = jaxmoe.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, pad_token_id=PAD, num_beams=1)
    assert_same_as_transformers(got, hf_beams(ids, mask, num_beams=1))


def test_search_settings_reuse_the_compiled_program(model):
    ids, mask = PROMPTS
    jaxmoe.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, num_beams=4)
    compiled = _beam_search_compiled._cache_size()
    for kwargs in (dict(length_penalty=0.3), dict(early_stopping=True, num_return_sequences=3),
                   dict(early_stopping="never", eos_token_id=7, pad_token_id=5)):
        jaxmoe.generate(model, ids, attention_mask=mask, max_new_tokens=NEW, num_beams=4, **kwargs)
    assert _beam_search_compiled._cache_size() == compiled


@pytest.mark.parametrize("change,needle", [
    (dict(num_beams=0), "num_beams=0"),
    (dict(num_beams=129), ("num_beams=129", "128")),
    (dict(num_beams=2.0), "num_beams=2.0"),
    (dict(num_beams=4, num_return_sequences=5), ("num_return_sequences=5", "num_beams=4")),
    (dict(num_beams=4, num_return_sequences=0), "num_return_sequences=0"),
    (dict(num_return_sequences=2), ("num_return_sequences=2", "num_beams=1")),
    (dict(num_beams=4, temperature=0.7), ("temperature=0.7", "not supported")),
    (dict(num_beams=4, length_penalty=math.nan), "length_penalty=nan"),
    (dict(num_beams=4, length_penalty=-math.inf), "length_penalty=-inf"),
    (dict(num_beams=4, early_stopping="always"), "early_stopping='always'"),
    (dict(num_beams=4, stream_callback=print), ("stream_callback", "num_beams=4")),
])
def test_bad_beam_arguments_raise_a_value_error_naming_the_value(model, change, needle):
    with pytest.raises(ValueError) as info:
        jaxmoe.generate(model, np.ones((1, 8), np.int32), max_new_tokens=NEW, **change)
    for part in (needle,) if isinstance(needle, str) else needle:
        assert part in str(info.value)


# ------------------------------------------------------------------------------------------------- translate

def word_tokenizer(newline_id):
    """A word-level tokenizer over the tiny model's 128 ids that prepends <bos>: id i is the word "w{i}", except
    ids 0-2 (<pad>, <bos>, <eos>) and `newline_id`, which decodes to a line break."""
    words = ["<pad>", "<bos>", "<eos>"] + [f"w{i}" for i in range(3, 128)]
    words[newline_id] = "\n"
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<pad>"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    raw.add_special_tokens(words[:3])
    raw.post_processor = tokenizers.processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 1)])
    return jaxmoe.Tokenizer(raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>")


def test_translate_with_beams_equals_transformers_and_cuts_at_the_first_newline(model):
    # Three sources of 15 words: with <bos>, prompts of exactly 16 tokens (no padding), in batches of 2.
    source_ids = np.random.default_rng(5).integers(3, 128, size=(3, 15))
    best = [hf_beams(np.concatenate([[1], row])[None], np.ones((1, 16), np.int64), num_beams=4,
                     length_penalty=0.6)[0, WIDTH:] for row in source_ids]
    # The line break: a token the first hypothesis emits mid-way that no source holds.
    newline_id = next(int(i) for i in best[0][2:] if i > 2 and i not in source_ids)
    tokenizer = word_tokenizer(newline_id)
    sources = [" ".join(f"w{i}" for i in row) for row in source_ids]
    expected = []
    for tokens in best:
        ends = np.flatnonzero(tokens == 2)
        expected.append(tokenizer.decode(tokens[:ends[0]] if ends.size else tokens).strip())
    assert any("\n" in text for text in expected)

    run = lambda **kwargs: translate(model, tokenizer, sources, prompt=lambda s: s, max_new_tokens=NEW,  # noqa: E731
                                     batch_size=2, num_beams=4, length_penalty=0.6, **kwargs)
    assert run() == expected
    assert run(cut_at_newline=True) == [text.split("\n")[0].strip() for text in expected]


# ------------------------------------------------------------------------------------------------ slow sweep

@pytest.mark.slow
@pytest.mark.parametrize("name", ["gqa_partial_longrope_tied", "mha_full_rotary_untied", "gqa_sliding_window"])
def test_beam_search_matches_transformers_across_configs(hf_checkpoint, name):
    """Three rows (20, 13 and 3 tokens: the first past original_max_position_embeddings from the start), 44 new
    tokens, 2 and 5 beams, the config's EOS, an early one and three EOS ids (3 * num_beams candidates a step),
    and each length penalty / early stopping mode."""
    model = jaxmoe.load_hf(hf_checkpoint(name))
    ids, mask = left_padded([20, 13, 3], 20, seed=2)
    for num_beams in (2, 5):
        first = hf_beams(ids, mask, name=name, new=44, num_beams=num_beams)
        eos = int(first[0, 21])
        for kwargs in (dict(), dict(eos_token_id=eos, length_penalty=0.6),
                       dict(eos_token_id=[2, int(first[1, 22]), int(first[2, 23])]),
                       dict(eos_token_id=eos, early_stopping=True, num_return_sequences=num_beams),
                       dict(eos_token_id=eos, early_stopping="never", length_penalty=-0.5)):
            got = jaxmoe.generate(model, ids, attention_mask=mask, max_new_tokens=44, pad_token_id=PAD,
                                  num_beams=num_beams, **kwargs)
            assert_same_as_transformers(got, hf_beams(ids, mask, name=name, new=44, num_beams=num_beams, **kwargs))
