"""Offline English text for training the embedded SAE.

Every source is read at run time from an installed Debian package (or the Python stdlib); nothing is downloaded and
no text is redistributed. Sources and their sizes in SmolLM2 tokens (as measured when the mix was chosen):
WordNet glosses (``wordnet-base``, 2.75M), fortunes (``fortunes``, 0.68M), Python docs (``python3-doc``, 0.46M),
the Jargon File (``jargon-text``, 0.31M), Bierce's Devil's Dictionary (``dict-devil``), the Debian Reference
(``debian-reference-en``), the GNU coding standards (``gnu-standards``), and the stdlib's ``pydoc_data.topics``
(always present). ``wordnet_chat`` wraps WordNet glosses in the model's chat template so the SAE sees the template
tokens that steering later perturbs.

A missing package is a *degraded mode*, never a silent one: the source is skipped, a warning is logged, the mix is
renormalised over what exists and the corpus manifest lists what was missing.
"""

from __future__ import annotations

import glob
import gzip
import html
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

WORDNET_DIR = Path("/usr/share/wordnet")
FORTUNES_DIR = Path("/usr/share/games/fortunes")
PYDOCS_DIR = Path("/usr/share/doc/python3.11/html/_sources")
JARGON_FILE = Path("/usr/share/doc/jargon-text/jargon.txt.gz")
DEVIL_FILE = Path("/usr/share/dictd/devil.dict.dz")
DEBREF_DIR = Path("/usr/share/doc/debian-reference-en/docs")
GNU_STD_FILES = (
    Path("/usr/share/doc/gnu-standards/standards.text.gz"),
    Path("/usr/share/doc/gnu-standards/maintain.text.gz"),
)
DEBIAN_PACKAGES = {
    "wordnet": "wordnet-base",
    "wordnet_chat": "wordnet-base",
    "fortunes": "fortunes",
    "pydocs": "python3-doc",
    "jargon": "jargon-text",
    "devil": "dict-devil",
    "debian_reference": "debian-reference-en",
    "gnu_standards": "gnu-standards",
    "pydoc_topics": None,
}


@dataclass(frozen=True)
class Document:
    source: str
    text: str


def _chunk_words(text: str, words_per_doc: int = 300) -> Iterator[str]:
    words = text.split()
    for i in range(0, len(words), words_per_doc):
        chunk = " ".join(words[i : i + words_per_doc])
        if len(chunk) > 40:
            yield chunk


# ------------------------------------------------------------------------------------------------ WordNet

_WN_LINE = re.compile(r"^\d{8} \d\d [nvasr] ([0-9a-f]{2}) (.*?)\| (.*)$")


def wordnet_entries() -> Iterator[tuple[str, list[str], str]]:
    """(lemma, synonyms, gloss) for every synset, in file order (neighbours share a topic)."""
    for pos in ("noun", "verb", "adj", "adv"):
        path = WORDNET_DIR / f"data.{pos}"
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("  "):
                    continue  # licence header
                m = _WN_LINE.match(line)
                if not m:
                    continue
                n_words = int(m.group(1), 16)
                fields = m.group(2).split()
                lemmas = [fields[2 * i].replace("_", " ") for i in range(n_words) if 2 * i < len(fields)]
                lemmas = [re.sub(r"\(.*\)$", "", w) for w in lemmas]
                if lemmas:
                    yield lemmas[0], lemmas[1:], m.group(3).strip()


def wordnet_docs(per_doc: int = 12) -> Iterator[Document]:
    batch: list[str] = []
    for lemma, syns, gloss in wordnet_entries():
        head = lemma + (", " + ", ".join(syns[:3]) if syns else "")
        batch.append(f"{head}: {gloss}.")
        if len(batch) == per_doc:
            yield Document("wordnet", "\n".join(batch))
            batch = []
    if batch:
        yield Document("wordnet", "\n".join(batch))


def wordnet_chat_docs(chat_format: Callable[[str, str], str] | None) -> Iterator[Document]:
    """One short dialogue per synset: user asks what a word means, assistant answers with the gloss."""
    if chat_format is None:
        return
    for i, (lemma, _syns, gloss) in enumerate(wordnet_entries()):
        if i % 7:  # a sparse, evenly spread sample is plenty for template contexts
            continue
        definition, _, examples = gloss.partition(";")
        answer = f"{lemma.capitalize()}: {definition.strip()}."
        if examples.strip():
            answer += f" For example, {examples.strip()}"
        yield Document("wordnet_chat", chat_format(f'What does "{lemma}" mean?', answer))


# ------------------------------------------------------------------------------------------------ others


def fortune_docs() -> Iterator[Document]:
    for path in sorted(FORTUNES_DIR.glob("*")):
        if path.suffix or path.name in {"art", "ascii-art"} or not path.is_file():
            continue
        text = path.read_text(encoding="utf-8", errors="replace")
        for entry in text.split("\n%\n"):
            entry = entry.strip()
            if len(entry) > 20:
                yield Document("fortunes", entry)


def pydocs_docs() -> Iterator[Document]:
    for path in sorted(PYDOCS_DIR.rglob("*.rst.txt")):
        rel = str(path.relative_to(PYDOCS_DIR))
        if rel.startswith(("c-api", "whatsnew")):
            continue
        paras = []
        for para in path.read_text(encoding="utf-8", errors="replace").split("\n\n"):
            stripped = para.strip()
            if not stripped or para.startswith((" ", "\t")) or stripped.startswith((".. ", ">>>", "::", "===", "---")):
                continue
            if set(stripped) <= set("=-~*^#"):
                continue
            paras.append(re.sub(r":[a-z:]+:`([^`]*)`", r"\1", stripped))
        text = "\n\n".join(paras)
        if text:
            for chunk in _chunk_words(text, 350):
                yield Document("pydocs", chunk)


def _gz_text(path: Path) -> str:
    with gzip.open(path, "rt", encoding="utf-8", errors="replace") as f:
        return f.read()


def jargon_docs() -> Iterator[Document]:
    for chunk in _chunk_words(_gz_text(JARGON_FILE), 300):
        yield Document("jargon", chunk)


def devil_docs() -> Iterator[Document]:
    for chunk in _chunk_words(_gz_text(DEVIL_FILE), 300):
        yield Document("devil", chunk)


def debian_reference_docs() -> Iterator[Document]:
    for path in sorted(glob.glob(str(DEBREF_DIR / "*.html"))):
        raw = Path(path).read_text(encoding="utf-8", errors="replace")
        raw = re.sub(r"(?is)<(script|style|pre).*?</\1>", " ", raw)
        text = html.unescape(re.sub(r"<[^>]+>", " ", raw))
        for chunk in _chunk_words(text, 300):
            yield Document("debian_reference", chunk)


def gnu_standards_docs() -> Iterator[Document]:
    for path in GNU_STD_FILES:
        for chunk in _chunk_words(_gz_text(path), 300):
            yield Document("gnu_standards", chunk)


def pydoc_topics_docs() -> Iterator[Document]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        for chunk in _chunk_words(topics[name], 300):
            yield Document("pydoc_topics", chunk)


SOURCE_AVAILABLE: dict[str, Callable[[], bool]] = {
    "wordnet": lambda: (WORDNET_DIR / "data.noun").exists(),
    "wordnet_chat": lambda: (WORDNET_DIR / "data.noun").exists(),
    "fortunes": lambda: FORTUNES_DIR.exists(),
    "pydocs": lambda: PYDOCS_DIR.exists(),
    "jargon": lambda: JARGON_FILE.exists(),
    "devil": lambda: DEVIL_FILE.exists(),
    "debian_reference": lambda: DEBREF_DIR.exists(),
    "gnu_standards": lambda: all(p.exists() for p in GNU_STD_FILES),
    "pydoc_topics": lambda: True,
}


def source_documents(source: str, chat_format: Callable[[str, str], str] | None = None) -> Iterator[Document]:
    readers: dict[str, Callable[[], Iterator[Document]]] = {
        "wordnet": wordnet_docs,
        "wordnet_chat": lambda: wordnet_chat_docs(chat_format),
        "fortunes": fortune_docs,
        "pydocs": pydocs_docs,
        "jargon": jargon_docs,
        "devil": devil_docs,
        "debian_reference": debian_reference_docs,
        "gnu_standards": gnu_standards_docs,
        "pydoc_topics": pydoc_topics_docs,
    }
    if source not in readers:
        raise KeyError(f"unknown corpus source {source!r}; known: {', '.join(sorted(readers))}")
    return readers[source]()


def available_mix(mix: dict[str, float]) -> tuple[dict[str, float], list[str]]:
    """Renormalise the configured mix over the sources whose packages are installed; return (mix, missing)."""
    missing = [s for s in mix if mix[s] > 0 and not SOURCE_AVAILABLE[s]()]
    for s in missing:
        pkg = DEBIAN_PACKAGES.get(s)
        log.warning(
            "corpus source %r is unavailable (Debian package %s not installed): DEGRADED corpus, "
            "its share is spread over the other sources",
            s,
            pkg,
        )
    kept = {s: w for s, w in mix.items() if w > 0 and s not in missing}
    total = sum(kept.values())
    if total <= 0:
        raise RuntimeError(
            "no corpus source is available; install the Debian packages listed in README "
            "(make setup does this) or add pydoc_topics to embedded_sae.corpus_mix"
        )
    return {s: w / total for s, w in kept.items()}, missing
