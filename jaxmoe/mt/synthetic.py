"""Zentish: an invented language with real grammar, and a parallel English -> Zentish corpus for the demo.

English sentences come from a small grammar (subject, verb in present or past, object, optional prepositional
phrase, optional negation). Each one is parsed and translated by rule, so a model has to learn a lexicon, word
order and agreement rather than copy words across:

- word order: subject [postpositional phrase] object [negation] verb, so the verb comes last (SOV);
- adjectives follow their noun;
- every noun has one of two genders; its determiner and adjectives end in -o (masculine) or -a (feminine), plus -s
  in the plural, and the noun itself takes -i in the plural;
- a verb is stem + tense (-a present, -i past) + subject person and number (-m I, -s you, nothing for he/she or a
  singular noun, -mos we, -n they or a plural noun);
- prepositions become postpositions after their noun phrase, and "not" becomes "ne" just before the verb.

Content words are built from syllables by a fixed seed, so the lexicon is the same in every run; the corpus seed
only picks sentences.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from types import MappingProxyType

__all__ = ["GENDER", "LEXICON", "Pair", "TARGET_VOCABULARY", "WORD_CLASS", "describe", "make_corpus",
           "make_splits", "translate_rule_based"]

MAX_WORDS = 14  # source sentences are 4 to 14 words

_PLACE, _PERSON, _ANIMAL, _THING, _FOOD = "place", "person", "animal", "thing", "food"
_NOUNS = {
    _PERSON: ["man", "woman", "child", "friend", "teacher", "doctor", "farmer", "king", "queen", "student",
              "baker", "sister", "brother", "girl", "boy"],
    _ANIMAL: ["dog", "cat", "horse", "bird", "mouse", "cow", "fox", "wolf", "rabbit", "goat", "duck", "bear"],
    _THING: ["table", "book", "box", "chair", "letter", "cup", "bag", "key", "window", "door", "ball", "picture",
             "lamp", "bed", "bottle", "hat", "boat", "knife"],
    _FOOD: ["apple", "cake", "egg", "orange", "sandwich", "pie", "carrot", "tomato"],
    _PLACE: ["garden", "house", "kitchen", "school", "market", "park", "forest", "city", "village", "river", "room",
             "street", "shop", "library", "field"],
}
# People with a natural gender keep it; every other noun's gender is drawn with its stem.
_NATURAL_GENDER = {"man": "m", "king": "m", "brother": "m", "boy": "m",
                   "woman": "f", "queen": "f", "sister": "f", "girl": "f"}
_IRREGULAR_PLURALS = {"man": "men", "woman": "women", "child": "children", "mouse": "mice", "wolf": "wolves",
                      "knife": "knives", "tomato": "tomatoes"}
_ADJECTIVES = ["big", "small", "old", "young", "red", "green", "blue", "happy", "sad", "quiet", "clever", "strange",
               "beautiful", "tall", "heavy", "new", "dark", "brave"]
_ALIVE, _OBJECTS, _ANY = (_PERSON, _ANIMAL), (_THING, _FOOD), (_PERSON, _ANIMAL, _THING, _FOOD, _PLACE)
# (base form, past form, the kinds of noun it takes as object)
_VERBS = [
    ("see", "saw", _ANY), ("watch", "watched", _ANY), ("like", "liked", _ANY), ("find", "found", _ANY),
    ("draw", "drew", _ANY), ("love", "loved", (*_ALIVE, _PLACE)), ("want", "wanted", (_ANIMAL, *_OBJECTS)),
    ("follow", "followed", _ALIVE), ("meet", "met", _ALIVE), ("help", "helped", _ALIVE),
    ("call", "called", _ALIVE), ("visit", "visited", (_PERSON, _PLACE)), ("teach", "taught", (_PERSON,)),
    ("catch", "caught", (_ANIMAL, _THING)), ("hold", "held", (_ANIMAL, *_OBJECTS)),
    ("carry", "carried", (_ANIMAL, *_OBJECTS)), ("bring", "brought", (_ANIMAL, *_OBJECTS)),
    ("buy", "bought", (_ANIMAL, *_OBJECTS)), ("sell", "sold", (_ANIMAL, *_OBJECTS)), ("make", "made", _OBJECTS),
    ("paint", "painted", (*_ALIVE, _THING, _PLACE)), ("open", "opened", (_THING,)),
    ("clean", "cleaned", (_THING, _PLACE)), ("eat", "ate", (_FOOD,)), ("cook", "cooked", (_FOOD,)),
    ("know", "knew", (*_ALIVE, _PLACE)), ("wash", "washed", (*_ALIVE, *_OBJECTS)), ("build", "built", (_THING, _PLACE)),
]
# English preposition -> (Zentish postposition, the kinds of noun it takes)
_PREPOSITIONS = {"in": ("ven", (_PLACE,)), "near": ("bliz", (_PLACE, _THING, *_ALIVE)),
                 "behind": ("zad", (_PLACE, _THING)), "under": ("pod", (_THING,)), "on": ("sur", (_THING,)),
                 "with": ("kon", _ALIVE), "from": ("dal", (_PLACE, _PERSON)), "for": ("per", _ALIVE)}
# English determiner lemma -> (singular form, plural form, Zentish stem)
_DETERMINERS = {"the": ("the", "the", "ed"), "a": ("a", "some", "un"), "this": ("this", "these", "est"),
                "my": ("my", "my", "mev")}
# English pronoun -> (Zentish pronoun, person, plural)
_PRONOUNS = {"I": ("ja", 1, False), "you": ("tu", 2, False), "he": ("on", 3, False), "she": ("ona", 3, False),
             "we": ("mi", 1, True), "they": ("oni", 3, True)}
_NEGATION = "ne"
_GENDER_ENDING = {"m": "o", "f": "a"}
_TENSE_ENDING = {False: "a", True: "i"}  # keyed by past
_PERSON_ENDING = {(1, False): "m", (2, False): "s", (3, False): "", (1, True): "mos", (3, True): "n"}

_LEXICON_SEED = 20240917
_ONSETS, _VOWELS, _CODAS = "bdfgklmnprstvz", "aeiou", "klmnrst"


def _english_plural(noun: str) -> str:
    if noun in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[noun]
    if noun.endswith(("s", "x", "ch", "sh")):
        return noun + "es"
    if noun.endswith("y") and noun[-2] not in "aeiou":
        return noun[:-1] + "ies"
    return noun + "s"


def _english_third_person(verb: str) -> str:
    if verb.endswith(("s", "x", "ch", "sh", "o")):
        return verb + "es"
    if verb.endswith("y") and verb[-2] not in "aeiou":
        return verb[:-1] + "ies"
    return verb + "s"


def _noun_forms(stem: str) -> set[str]:
    return {stem, stem + "i"}


def _modifier_forms(stem: str) -> set[str]:
    return {stem + ending + plural for ending in _GENDER_ENDING.values() for plural in ("", "s")}


def _verb_forms(stem: str) -> set[str]:
    return {stem + tense + person for tense in _TENSE_ENDING.values() for person in _PERSON_ENDING.values()}


def _build_lexicon() -> tuple[dict[str, str], dict[str, str], dict[str, str], frozenset[str]]:
    """English lemma -> Zentish stem (content words drawn from syllables), English lemma -> word class, noun ->
    gender, and every Zentish word form. A drawn stem is redrawn while any of its forms collides with a form
    already taken, so every Zentish word form has one reading."""
    lexicon, word_class = {"not": _NEGATION}, {"not": "negation"}
    taken = {_NEGATION}
    for english, (_, _, stem) in _DETERMINERS.items():
        lexicon[english], word_class[english] = stem, "determiner"
        taken |= _modifier_forms(stem)
    for english, (word, _, _) in _PRONOUNS.items():
        lexicon[english], word_class[english] = word, "pronoun"
        taken.add(word)
    for english, (word, _) in _PREPOSITIONS.items():
        lexicon[english], word_class[english] = word, "preposition"
        taken.add(word)
    rng = random.Random(_LEXICON_SEED)
    gender = {}
    kinds = [(noun, "noun") for nouns in _NOUNS.values() for noun in nouns]
    kinds += [(adjective, "adjective") for adjective in _ADJECTIVES] + [(verb, "verb") for verb, _, _ in _VERBS]
    for english, kind in kinds:
        while True:
            syllables = rng.choice((1, 2, 2))
            stem = "".join(rng.choice(_ONSETS) + rng.choice(_VOWELS) for _ in range(syllables)) + rng.choice(_CODAS)
            forms = {"noun": _noun_forms(stem), "adjective": _modifier_forms(stem), "verb": _verb_forms(stem)}[kind]
            if not forms & taken:
                break
        lexicon[english], word_class[english] = stem, kind
        taken |= forms
        if kind == "noun":
            drawn = rng.choice(("m", "f"))
            gender[english] = _NATURAL_GENDER.get(english, drawn)
    return lexicon, word_class, gender, frozenset(taken)


_lexicon, _word_class, _gender, TARGET_VOCABULARY = _build_lexicon()  # TARGET_VOCABULARY: every Zentish word form
LEXICON = MappingProxyType(_lexicon)  # English lemma -> Zentish word (function words) or stem (content words)
WORD_CLASS = MappingProxyType(_word_class)  # English lemma -> noun, verb, adjective, determiner, pronoun, ...
GENDER = MappingProxyType(_gender)  # English noun -> "m" or "f", the gender of its Zentish translation

_NOUN_KINDS = {noun: kind for kind, nouns in _NOUNS.items() for noun in nouns}
_VERB_OBJECTS = {verb: objects for verb, _, objects in _VERBS}
_VERB_PAST = {verb: past for verb, past, _ in _VERBS}
# English surface form -> what it is, for parsing
_NOUN_READINGS = {form: (noun, plural) for noun in _NOUN_KINDS
                  for form, plural in ((noun, False), (_english_plural(noun), True))}
_VERB_READINGS = {form: (verb, reading) for verb, past, _ in _VERBS
                  for form, reading in ((verb, "base"), (_english_third_person(verb), "third"), (past, "past"))}
_DETERMINER_READINGS = {"an": ("a", False)} | {
    form: (lemma, None if singular == plural else plural_flag)
    for lemma, (singular, plural, _) in _DETERMINERS.items()
    for form, plural_flag in ((singular, False), (plural, True))}
_AUXILIARIES = {"does": (False, True), "do": (False, False), "did": (True, None)}  # -> (past, third person)


@dataclass(frozen=True, slots=True)
class Pair:
    source: str
    target: str


@dataclass(frozen=True, slots=True)
class _NounPhrase:
    determiner: str  # a lemma of _DETERMINERS
    adjectives: tuple[str, ...]
    noun: str
    plural: bool

    def english(self) -> str:
        singular, plural, _ = _DETERMINERS[self.determiner]
        head = [*self.adjectives, _english_plural(self.noun) if self.plural else self.noun]
        determiner = plural if self.plural else singular
        if determiner == "a" and head[0][0] in "aeiou":
            determiner = "an"
        return " ".join([determiner, *head])

    def zentish(self) -> str:
        ending = _GENDER_ENDING[GENDER[self.noun]] + ("s" if self.plural else "")
        noun = LEXICON[self.noun] + ("i" if self.plural else "")
        return " ".join([LEXICON[self.determiner] + ending, noun, *(LEXICON[a] + ending for a in self.adjectives)])


@dataclass(frozen=True, slots=True)
class _Clause:
    subject: _NounPhrase | str  # a noun phrase or a key of _PRONOUNS
    verb: str
    past: bool
    negated: bool
    obj: _NounPhrase
    preposition: str | None
    place: _NounPhrase | None  # the preposition's noun phrase

    def person(self) -> tuple[int, bool]:
        if isinstance(self.subject, str):
            return _PRONOUNS[self.subject][1:]
        return 3, self.subject.plural

    def english(self) -> str:
        subject = self.subject if isinstance(self.subject, str) else self.subject.english()
        third = self.person() == (3, False)
        if self.negated:
            verb = ("did" if self.past else "does" if third else "do") + " not " + self.verb
        else:
            verb = _VERB_PAST[self.verb] if self.past else _english_third_person(self.verb) if third else self.verb
        words = [subject, verb, self.obj.english()]
        if self.preposition is not None:
            words += [self.preposition, self.place.english()]
        return " ".join(words)

    def zentish(self) -> str:
        subject = _PRONOUNS[self.subject][0] if isinstance(self.subject, str) else self.subject.zentish()
        words = [subject]
        if self.preposition is not None:
            words += [self.place.zentish(), _PREPOSITIONS[self.preposition][0]]
        words.append(self.obj.zentish())
        if self.negated:
            words.append(_NEGATION)
        words.append(LEXICON[self.verb] + _TENSE_ENDING[self.past] + _PERSON_ENDING[self.person()])
        return " ".join(words)


class _Reader:
    """A cursor over a source sentence's words that fails with the position and what the grammar expected."""

    def __init__(self, source: str):
        self.source, self.words, self.pos = source, source.split(), 0

    def peek(self) -> str | None:
        return self.words[self.pos] if self.pos < len(self.words) else None

    def take(self) -> str | None:
        word = self.peek()
        self.pos += 1
        return word

    def fail(self, expected: str):
        got = self.peek()
        raise ValueError(f"translate_rule_based: cannot read {self.source!r}: word {self.pos + 1} should be "
                         f"{expected}, got {'the end' if got is None else repr(got)}; pass a sentence of the English "
                         "grammar that make_corpus writes")

    def noun_phrase(self) -> _NounPhrase:
        if self.peek() not in _DETERMINER_READINGS:
            self.fail(f"a determiner ({', '.join(sorted(_DETERMINER_READINGS))})")
        determiner, determiner_plural = _DETERMINER_READINGS[self.take()]
        adjectives = []
        while self.peek() in _ADJECTIVES:
            adjectives.append(self.take())
        if self.peek() not in _NOUN_READINGS:
            self.fail("an adjective or a noun of the lexicon")
        noun, plural = _NOUN_READINGS[self.peek()]
        if determiner_plural is not None and determiner_plural != plural:
            self.fail(f"a {'plural' if determiner_plural else 'singular'} noun to agree with its determiner")
        self.take()
        return _NounPhrase(determiner, tuple(adjectives), noun, plural)

    def clause(self) -> _Clause:
        subject = self.take() if self.peek() in _PRONOUNS else self.noun_phrase()
        person = _PRONOUNS[subject][1:] if isinstance(subject, str) else (3, subject.plural)
        third = person == (3, False)
        word = self.peek()
        negated = word in _AUXILIARIES
        if negated:
            past, aux_third = _AUXILIARIES[self.take()]
            if aux_third not in (None, third):
                self.pos -= 1
                self.fail(f"{'does' if third else 'do'} (agreeing with the subject)")
            if self.take() != "not":
                self.pos -= 1
                self.fail("'not'")
            if _VERB_READINGS.get(self.peek(), (None, None))[1] != "base":
                self.fail("a verb's base form")
            verb = _VERB_READINGS[self.take()][0]
        else:
            verb, reading = _VERB_READINGS.get(word, (None, None))
            if reading is None or (reading != "past" and (reading == "third") != third):
                self.fail("a verb agreeing with the subject, or do/does/did not")
            self.take()
            past = reading == "past"
        obj = self.noun_phrase()
        preposition = place = None
        if self.peek() is not None:
            if self.peek() not in _PREPOSITIONS:
                self.fail(f"a preposition ({', '.join(_PREPOSITIONS)}) or the end")
            preposition, place = self.take(), self.noun_phrase()
        if self.peek() is not None:
            self.fail("the end of the sentence")
        return _Clause(subject, verb, past, negated, obj, preposition, place)


def translate_rule_based(source: str) -> str:
    """The Zentish translation of an English sentence of the corpus grammar (str -> str); raises ValueError naming
    the first word the grammar cannot read."""
    if not isinstance(source, str):
        raise TypeError(f"translate_rule_based expects a str; got {type(source).__name__}")
    return _Reader(source).clause().zentish()


def _sample_noun_phrase(rng: random.Random, kinds: tuple[str, ...]) -> _NounPhrase:
    noun = rng.choice(_NOUNS[rng.choice(kinds)])
    adjectives = tuple(rng.sample(_ADJECTIVES, rng.choices((0, 1, 2), weights=(6, 3, 1))[0]))
    return _NounPhrase(rng.choice(list(_DETERMINERS)), adjectives, noun, rng.random() < 0.35)


def _sample_clause(rng: random.Random) -> _Clause:
    subject = rng.choice(list(_PRONOUNS)) if rng.random() < 0.3 else _sample_noun_phrase(rng, _ALIVE)
    verb = rng.choice(_VERBS)[0]
    past, negated = rng.random() < 0.5, rng.random() < 0.25
    obj = _sample_noun_phrase(rng, _VERB_OBJECTS[verb])
    preposition = place = None
    if rng.random() < 0.45:
        preposition = rng.choice(list(_PREPOSITIONS))
        place = _sample_noun_phrase(rng, _PREPOSITIONS[preposition][1])
    return _Clause(subject, verb, past, negated, obj, preposition, place)


def make_corpus(n: int, *, seed: int) -> list[Pair]:
    """`n` English -> Zentish pairs with distinct source sentences (4 to MAX_WORDS words), the same for the same
    seed."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"make_corpus: n={n!r}; expected an int >= 0 (the number of sentence pairs)")
    if not isinstance(seed, int):
        raise ValueError(f"make_corpus: seed={seed!r}; expected an int")
    rng = random.Random(seed)
    pairs, seen = [], set()
    for _ in range(20 * n + 100):  # the grammar has billions of sentences, so duplicates are rare
        if len(pairs) == n:
            return pairs
        clause = _sample_clause(rng)
        source = clause.english()
        if source in seen or len(source.split()) > MAX_WORDS:
            continue
        seen.add(source)
        pairs.append(Pair(source, clause.zentish()))
    if len(pairs) == n:
        return pairs
    raise ValueError(f"make_corpus: found only {len(pairs)} distinct sentences of the {n} asked for; ask for fewer")


def make_splits(*, train: int, valid: int, test: int, seed: int = 0) -> dict[str, list[Pair]]:
    """{"train", "valid", "test"} -> lists of Pairs of those sizes; no source sentence is in two splits."""
    for name, size in (("train", train), ("valid", valid), ("test", test)):
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"make_splits: {name}={size!r}; expected an int >= 0 (the number of sentence pairs)")
    corpus = make_corpus(train + valid + test, seed=seed)
    return {"train": corpus[:train], "valid": corpus[train:train + valid], "test": corpus[train + valid:]}


def describe() -> str:
    """A few lines on Zentish's grammar, with an example, for the demo to print."""
    example = make_corpus(1, seed=7)[0]
    return "\n".join([
        f"Zentish, an invented language ({len(_NOUN_KINDS)} nouns, {len(_VERBS)} verbs, {len(_ADJECTIVES)} "
        "adjectives), translated by rule from English:",
        "  word order subject [place postposition] object [ne] verb; adjectives follow the noun",
        "  two genders: determiners and adjectives end -o or -a (+s plural); nouns take -i in the plural",
        "  verbs: stem + tense (-a present, -i past) + person (-m I, -s you, -mos we, -n they/plural)",
        f"  e.g. {example.source!r} -> {example.target!r}",
    ])
