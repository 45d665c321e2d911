"""A minimal reader for the WordNet 3.x database files (Debian package ``wordnet-base``: /usr/share/wordnet).

Only what the concreteness heuristic needs: a lemma's synsets per part of speech (in sense-frequency order), how
many of them occur in the SemCor corpus, the lexicographer file ("supersense", e.g. ``noun.animal``) of a noun synset, and WordNet's morphological base forms
(exception lists + suffix rules). Index files are read once per reader; data records are read by byte offset."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path

DEFAULT_WORDNET_DIR = Path("/usr/share/wordnet")
POS_FILES = {"n": "noun", "v": "verb", "a": "adj", "r": "adv"}

# lexicographer file numbers 0..44 (WordNet lexnames(5WN))
LEXNAMES = (
    "adj.all adj.pert adv.all noun.Tops noun.act noun.animal noun.artifact noun.attribute noun.body noun.cognition "
    "noun.communication noun.event noun.feeling noun.food noun.group noun.location noun.motive noun.object "
    "noun.person noun.phenomenon noun.plant noun.possession noun.process noun.quantity noun.relation noun.shape "
    "noun.state noun.substance noun.time verb.body verb.change verb.cognition verb.communication verb.competition "
    "verb.consumption verb.contact verb.creation verb.emotion verb.motion verb.perception verb.possession "
    "verb.social verb.stative verb.weather adj.ppl"
).split()

_SUFFIX_RULES = {
    "n": (
        ("ses", "s"),
        ("xes", "x"),
        ("zes", "z"),
        ("ches", "ch"),
        ("shes", "sh"),
        ("men", "man"),
        ("ies", "y"),
        ("s", ""),
    ),
    "v": (("s", ""), ("ies", "y"), ("es", "e"), ("es", ""), ("ed", "e"), ("ed", ""), ("ing", "e"), ("ing", "")),
    "a": (("er", ""), ("est", ""), ("er", "e"), ("est", "e")),
    "r": (),
}


class WordNetMissing(FileNotFoundError):
    """The WordNet database directory is absent (install the Debian package ``wordnet-base``)."""


class WordNet:
    """Read-only access to one WordNet database directory."""

    def __init__(self, root: str | os.PathLike = DEFAULT_WORDNET_DIR) -> None:
        self.root = Path(root)
        if not (self.root / "index.noun").is_file():
            raise WordNetMissing(f"no WordNet database at {self.root} (apt-get install wordnet-base)")
        self._tagged: dict[str, dict[str, int]] = {pos: {} for pos in POS_FILES}
        self._index: dict[str, dict[str, tuple[int, ...]]] = {
            pos: self._read_index(name, self._tagged[pos]) for pos, name in POS_FILES.items()
        }
        self._exceptions: dict[str, dict[str, str]] = {
            pos: self._read_exceptions(name) for pos, name in POS_FILES.items()
        }
        self._lexfile = lru_cache(maxsize=None)(self._read_lexfile)

    def _read_index(self, name: str, tagged: dict[str, int]) -> dict[str, tuple[int, ...]]:
        """lemma -> synset offsets; fills ``tagged`` with lemma -> tagsense_cnt (senses seen in the SemCor corpus)."""
        out: dict[str, tuple[int, ...]] = {}
        with open(self.root / f"index.{name}", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(" "):
                    continue  # licence header
                parts = line.split()
                n_synsets, n_pointers = int(parts[2]), int(parts[3])
                offsets = parts[4 + n_pointers + 2 :]
                out[parts[0]] = tuple(int(o) for o in offsets[:n_synsets])
                tagged[parts[0]] = int(parts[4 + n_pointers + 1])
        return out

    def _read_exceptions(self, name: str) -> dict[str, str]:
        path = self.root / f"{name}.exc"
        out: dict[str, str] = {}
        if path.is_file():
            with open(path, encoding="utf-8", errors="replace") as f:
                for line in f:
                    parts = line.split()
                    if len(parts) >= 2:
                        out.setdefault(parts[0], parts[1])
        return out

    def _read_lexfile(self, offset: int) -> str:
        with open(self.root / "data.noun", "rb") as f:
            f.seek(offset)
            fields = f.readline().split(maxsplit=2)
        return LEXNAMES[int(fields[1])]

    def base_forms(self, word: str, pos: str = "n") -> list[str]:
        """Every listed base form of ``word`` for ``pos``: the word itself, its exception-list form, its suffix-rule
        forms (WordNet's morphy; "shoes" is listed itself, as in "in his shoes", and also gives "shoe")."""
        word = word.lower().replace(" ", "_")
        index = self._index[pos]
        cands = [word, self._exceptions[pos].get(word)]
        cands += [
            word[: -len(suffix)] + repl
            for suffix, repl in _SUFFIX_RULES[pos]
            if word.endswith(suffix) and len(word) > len(suffix) + 1
        ]
        return list(dict.fromkeys(c for c in cands if c and c in index))

    def base_form(self, word: str, pos: str = "n") -> str | None:
        """The base form of ``word`` for ``pos`` with the most SemCor-attested senses (then the most senses), or
        None when ``word`` has none."""
        forms = self.base_forms(word, pos)
        if not forms:
            return None
        return max(forms, key=lambda f: (self._tagged[pos].get(f, 0), len(self._index[pos][f])))

    def noun_lexnames(self, word: str) -> list[str]:
        """Lexicographer files of the noun senses of ``word``, most frequent sense first (empty if not a noun)."""
        lemma = self.base_form(word, "n")
        return [self._lexfile(o) for o in self._index["n"].get(lemma, ())] if lemma else []

    def tagged_senses(self, word: str, pos: str) -> int:
        """How many of ``word``'s ``pos`` senses occur in SemCor (WordNet's tagsense_cnt; 0 if not that pos)."""
        lemma = self.base_form(word, pos)
        return self._tagged[pos].get(lemma, 0) if lemma else 0

    def n_senses(self, word: str) -> int:
        """Number of senses of ``word`` over all parts of speech."""
        total = 0
        for pos in POS_FILES:
            lemma = self.base_form(word, pos)
            if lemma:
                total += len(self._index[pos][lemma])
        return total
