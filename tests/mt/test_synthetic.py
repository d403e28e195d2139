"""jaxmoe.mt.synthetic: the English -> Zentish corpus is deterministic, its splits are disjoint, and its targets
follow Zentish grammar (SOV, adjectives after the noun, gender and number agreement, person endings, postpositions).

Expected translations are spelled out here from LEXICON stems and the suffixes the module docstring documents.
"""

import itertools

import pytest

from jaxmoe.mt.synthetic import (GENDER, LEXICON, TARGET_VOCABULARY, WORD_CLASS, Pair, make_corpus, make_splits,
                                 translate_rule_based)

L = LEXICON


@pytest.fixture(scope="module")
def corpus():
    return make_corpus(20_000, seed=0)


def _forms_by_class() -> dict[str, str]:
    """Every Zentish word form -> the word class of its lemma, from the documented suffixes."""
    forms = {}
    for lemma, word_class in WORD_CLASS.items():
        stem = L[lemma]
        if word_class == "noun":
            spelled = [stem, stem + "i"]
        elif word_class in ("adjective", "determiner"):
            spelled = [stem + g + n for g in "oa" for n in ("", "s")]
        elif word_class == "verb":
            spelled = [stem + t + p for t in "ai" for p in ("m", "s", "", "mos", "n")]
        else:
            spelled = [stem]
        for form in spelled:
            assert form not in forms, f"{form!r} has two readings"
            forms[form] = word_class
    return forms


def test_known_translation_pins_the_lexicon_across_runs():
    assert translate_rule_based("the big dogs saw an old cat in the garden") == \
        "edas tufisi dekomas edo pezet ven uno fan saro mosin"


def test_same_seed_same_corpus_and_other_seeds_other_sentences():
    first, again, other = make_corpus(500, seed=3), make_corpus(500, seed=3), make_corpus(500, seed=4)
    assert first == again
    assert len({p.source for p in first} & {p.source for p in other}) < 25
    assert all(isinstance(p, Pair) for p in first)


def test_corpus_sources_are_distinct_and_within_length(corpus):
    assert len(corpus) == 20_000
    assert len({p.source for p in corpus}) == len(corpus)
    lengths = [len(p.source.split()) for p in corpus]
    assert min(lengths) == 4 and max(lengths) == 14


def test_splits_have_the_asked_sizes_and_share_no_source():
    splits = make_splits(train=3000, valid=300, test=300, seed=1)
    assert {name: len(pairs) for name, pairs in splits.items()} == {"train": 3000, "valid": 300, "test": 300}
    for a, b in itertools.combinations(splits.values(), 2):
        assert not {p.source for p in a} & {p.source for p in b}
    assert make_splits(train=3000, valid=300, test=300, seed=1) == splits


def test_corpus_targets_are_the_rule_based_translations(corpus):
    assert all(translate_rule_based(p.source) == p.target for p in corpus[:5000])


def test_every_target_word_is_in_the_target_vocabulary(corpus):
    forms = _forms_by_class()
    assert set(forms) == TARGET_VOCABULARY
    assert {w for p in corpus for w in p.target.split()} <= TARGET_VOCABULARY


def test_lexicon_gives_each_english_lemma_its_own_word():
    assert len(set(LEXICON.values())) == len(LEXICON)
    assert set(GENDER) == {w for w, c in WORD_CLASS.items() if c == "noun"}
    assert set(GENDER.values()) == {"m", "f"}


def test_plural_feminine_agreement_and_verb_last_with_negation_before_it():
    assert GENDER["dog"] == "f" and GENDER["cat"] == "m"
    got = translate_rule_based("these big dogs do not see my old cat")
    assert got == f"{L['this']}as {L['dog']}i {L['big']}as {L['my']}o {L['cat']} {L['old']}o ne {L['see']}an"


def test_masculine_plural_object_with_two_adjectives():
    assert GENDER["garden"] == "m"
    got = translate_rule_based("she saw the small green gardens")
    assert got == f"{L['she']} {L['the']}os {L['garden']}i {L['small']}os {L['green']}os {L['see']}i"


def test_postposition_follows_its_noun_phrase_before_the_object():
    assert GENDER["apple"] == "f"
    got = translate_rule_based("the cat ate some apples with a friend")
    friend = f"{L['a']}{'o' if GENDER['friend'] == 'm' else 'a'} {L['friend']}"
    assert got == f"{L['the']}o {L['cat']} {friend} {L['with']} {L['a']}as {L['apple']}i {L['eat']}i"


SUBJECTS = {"I": L["I"], "you": L["you"], "he": L["he"], "we": L["we"], "they": L["they"],
            "the cats": f"{L['the']}os {L['cat']}i",
            "my cat": f"{L['my']}o {L['cat']}"}


@pytest.mark.parametrize("subject, verb, ending", [
    ("I", "see", "am"), ("I", "did not see", "im"), ("you", "saw", "is"), ("he", "sees", "a"), ("he", "saw", "i"),
    ("we", "see", "amos"), ("we", "do not see", "amos"), ("they", "saw", "in"), ("the cats", "see", "an"),
    ("my cat", "saw", "i"), ("my cat", "does not see", "a"),
])
def test_verb_ending_marks_tense_and_subject_person(subject, verb, ending):
    negation = "ne " if "not" in verb else ""
    assert translate_rule_based(f"{subject} {verb} the dog") == \
        f"{SUBJECTS[subject]} {L['the']}a {L['dog']} {negation}{L['see']}{ending}"


def test_target_order_is_not_the_source_order(corpus):
    forms = _forms_by_class()
    english_modifiers = {w for w, c in WORD_CLASS.items() if c in ("determiner", "adjective")} | {"an", "some", "these"}
    for pair in corpus[:2000]:
        classes = [forms[w] for w in pair.target.split()]
        assert classes[-1] == "verb" and classes.count("verb") == 1, pair
        assert classes.count("negation") == pair.source.split().count("not"), pair
        if "negation" in classes:
            assert classes[-2] == "negation", pair
        for before, after in zip(classes, classes[1:]):
            if after in ("adjective", "preposition"):
                assert before in ("noun", "adjective"), pair
        # In the source, adjectives precede the noun and the verb precedes the object.
        words = pair.source.split()
        for before, after in zip(words, words[1:]):
            if WORD_CLASS.get(after) == "adjective":
                assert before in english_modifiers, pair
        if "not" in words:
            assert WORD_CLASS[words[words.index("not") + 1]] == "verb" and words.index("not") + 1 < len(words) - 1


def test_a_becomes_an_before_a_vowel(corpus):
    for pair in corpus[:2000]:
        words = pair.source.split()
        for word, following in zip(words, words[1:]):
            if word in ("a", "an"):
                assert (word == "an") == (following[0] in "aeiou"), pair


@pytest.mark.parametrize("source, where", [
    ("the dog see the cat", "word 3"), ("a dogs see the cat", "word 2"), ("the dog sees the cat quickly", "word 6"),
    ("the dog do not see the cat", "word 3"), ("the dog", "word 3"),
])
def test_ungrammatical_source_is_refused_at_its_first_bad_word(source, where):
    with pytest.raises(ValueError, match=where):
        translate_rule_based(source)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError, match="n=-1"):
        make_corpus(-1, seed=0)
    with pytest.raises(ValueError, match="valid=1.5"):
        make_splits(train=1, valid=1.5, test=1)
