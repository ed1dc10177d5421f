"""EDA-style caption perturbation for the hardest-negative ("negated") text.

Each call applies ONE operation chosen at random among the active ones, as EDA keeps one of its four
augmented sentences (swap, deletion, insertion, synonym replacement), each touching a fraction ``alpha``
of the words (at least one word).

Differences from the original EDA recipe, on purpose:
- Random insertion inserts a *copy of a word of the same sentence*, not a WordNet synonym, so that it
  needs no corpus.
- Synonym replacement needs the NLTK WordNet corpus. It is never dropped silently: requesting it without
  WordNet raises at construction time, unless ``require_wordnet=False``, which logs one warning and
  turns the op off (``active_ops`` tells what is on).
- Randomness comes from a private ``random.Random`` (seedable), never from the global ``random`` module.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable, Iterable, Sequence

log = logging.getLogger(__name__)

ALL_OPS: tuple[str, ...] = ("swap", "delete", "insert", "synonym")
# WordNet is not an offline dependency, so the default leaves synonym replacement out.
DEFAULT_OPS: tuple[str, ...] = ("swap", "delete", "insert")

# Words never replaced by a synonym (short closed-class list; EDA skips stop words too).
STOP_WORDS: frozenset[str] = frozenset(
    "a an the and or but if of at by for with about against between into through during before after "
    "above below to from up down in out on off over under again then once here there when where why how "
    "all any both each few more most other some such no nor not only own same so than too very can will "
    "just should now i me my we our you your he him his she her it its they them their what which who "
    "whom this that these those am is are was were be been being have has had do does did".split()
)

_NON_LETTERS = re.compile(r"[^a-z ]+")
_SPACES = re.compile(r"\s+")


class WordNetUnavailableError(RuntimeError):
    """Raised when synonym replacement is requested but the NLTK WordNet corpus cannot be loaded."""


def clean_text(text: str) -> str:
    """Lowercase and keep only the letters a-z and single spaces (EDA's normalisation)."""
    text = text.lower().replace("'", "")
    text = _NON_LETTERS.sub(" ", text)
    return _SPACES.sub(" ", text).strip()


def n_touched(n_words: int, alpha: float) -> int:
    """Number of words an op touches: ``int(alpha * n_words)``, at least one."""
    return max(1, int(alpha * n_words))


def random_swap(words: Sequence[str], n: int, rng: random.Random) -> list[str]:
    """Swap two distinct random positions, ``n`` times. A one-word sentence is returned unchanged."""
    out = list(words)
    if len(out) < 2:
        return out
    for _ in range(n):
        i, j = rng.sample(range(len(out)), 2)
        out[i], out[j] = out[j], out[i]
    return out


def random_deletion(words: Sequence[str], p: float, rng: random.Random) -> list[str]:
    """Drop each word with probability ``p``; if everything is dropped, keep one random word."""
    if len(words) <= 1:
        return list(words)
    kept = [w for w in words if rng.random() >= p]
    return kept if kept else [rng.choice(list(words))]


def random_insertion(words: Sequence[str], n: int, rng: random.Random) -> list[str]:
    """Insert ``n`` copies of random words of the sentence at random positions (no WordNet needed)."""
    out = list(words)
    if not out:
        return out
    for _ in range(n):
        out.insert(rng.randint(0, len(out)), rng.choice(out))
    return out


def synonym_replacement(
    words: Sequence[str],
    n: int,
    rng: random.Random,
    synonyms_of: Callable[[str], list[str]],
    stop_words: Iterable[str] = STOP_WORDS,
) -> list[str]:
    """Replace every occurrence of up to ``n`` distinct non-stop words by a random synonym."""
    out = list(words)
    stop = set(stop_words)
    candidates = sorted({w for w in out if w not in stop})  # sorted: set order is not reproducible
    rng.shuffle(candidates)
    replaced = 0
    for word in candidates:
        options = [s for s in synonyms_of(word) if s != word]
        if not options:
            continue
        choice = rng.choice(options)
        out = [choice if w == word else w for w in out]
        replaced += 1
        if replaced >= n:
            break
    # A synonym may be a multi-word lemma ("domestic dog"): re-split so the result is a word list.
    return " ".join(out).split()


def load_wordnet_synonyms(lowercase_strip: bool = True) -> Callable[[str], list[str]]:
    """Return a ``word -> synonyms`` lookup backed by NLTK WordNet.

    Raises ``WordNetUnavailableError`` when nltk is not installed or the corpus is not downloaded.
    """
    try:
        from nltk.corpus import wordnet

        wordnet.synsets("dog")  # the corpus loads lazily: force it now, not mid-training
    except (ImportError, LookupError, OSError) as err:
        raise WordNetUnavailableError(
            "Synonym replacement needs the NLTK WordNet corpus, which is not installed "
            f"({type(err).__name__}). "
            "Install it (pip install nltk && python -m nltk.downloader wordnet) or turn the op off by "
            "removing 'synonym' from the config key negation.perturb.ops "
            "(or set negation.perturb.require_wordnet=false to continue without it)."
        ) from err

    def synonyms_of(word: str) -> list[str]:
        names: list[str] = []
        for synset in wordnet.synsets(word):
            for lemma in synset.lemmas():
                name = lemma.name().replace("_", " ").replace("-", " ")
                name = clean_text(name) if lowercase_strip else name
                if name and name not in names:
                    names.append(name)
        return names

    return synonyms_of


class CaptionPerturber:
    """Perturb one caption with one EDA operation chosen at random.

    Args:
        ops: operations to draw from, a subset of ``("swap", "delete", "insert", "synonym")``.
        alpha: fraction of words touched per op (at least one word); deletion probability per word.
        lowercase_strip: lowercase and keep only a-z and spaces before perturbing (as EDA does).
        seed: seed of the private random generator (ignored when ``rng`` is given).
        require_wordnet: if True, requesting "synonym" without WordNet raises; if False, it logs one
            warning and the op is turned off.
        rng: an existing ``random.Random`` to draw from.
    """

    def __init__(
        self,
        ops: Sequence[str] = DEFAULT_OPS,
        alpha: float = 0.1,
        lowercase_strip: bool = True,
        seed: int | None = None,
        require_wordnet: bool = True,
        rng: random.Random | None = None,
    ) -> None:
        ops = tuple(ops)
        unknown = [op for op in ops if op not in ALL_OPS]
        if unknown:
            raise ValueError(f"unknown perturbation op(s) {unknown}; choose from {list(ALL_OPS)}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.ops = ops
        self.alpha = alpha
        self.lowercase_strip = lowercase_strip
        self.rng = rng if rng is not None else random.Random(seed)
        self._synonyms_of: Callable[[str], list[str]] | None = None

        active = list(dict.fromkeys(ops))  # de-duplicated, order kept
        if "synonym" in active:
            try:
                self._synonyms_of = load_wordnet_synonyms(lowercase_strip)
            except WordNetUnavailableError as err:
                if require_wordnet:
                    raise
                log.warning("Synonym replacement is OFF: %s", err)
                active.remove("synonym")
        self.active_ops: tuple[str, ...] = tuple(active)

    def words(self, text: str) -> list[str]:
        """Split a caption into the words the ops act on (after the optional normalisation)."""
        return (clean_text(text) if self.lowercase_strip else text).split()

    def apply(self, op: str, text: str) -> str:
        """Apply one named op to ``text``; empty captions come back unchanged."""
        words = self.words(text)
        if not words:
            return text
        n = n_touched(len(words), self.alpha)
        if op == "swap":
            out = random_swap(words, n, self.rng)
        elif op == "delete":
            out = random_deletion(words, self.alpha, self.rng)
        elif op == "insert":
            out = random_insertion(words, n, self.rng)
        elif op == "synonym":
            if self._synonyms_of is None:
                raise RuntimeError("synonym replacement is not active (WordNet not loaded)")
            out = synonym_replacement(words, n, self.rng, self._synonyms_of)
        else:
            raise ValueError(f"unknown perturbation op {op!r}")
        return " ".join(out)

    def __call__(self, text: str) -> str:
        """Return one perturbed version of ``text`` (normalised only, when no op is active)."""
        if not self.active_ops:
            words = self.words(text)
            return " ".join(words) if words else text
        op = self.rng.choice(self.active_ops)
        return self.apply(op, text)

    def __repr__(self) -> str:
        return (
            f"CaptionPerturber(active_ops={list(self.active_ops)}, alpha={self.alpha}, "
            f"lowercase_strip={self.lowercase_strip})"
        )
