"""Real English text for distillation: the fortune-cookie collection of Debian's `fortunes` package.

Why this source: it is natural English written by people (quotations, jokes, definitions, anecdotes, poems,
news items, aphorisms from ~40 topic files), about 14,000 distinct texts of 3 to 96 words after cleaning,
varied in length and register, installable offline from Debian (`apt-get install fortunes`, ~2.6 MB,
BSD-licensed, which pulls `fortunes-min`). The offensive section is a separate package and is not used. The
alternatives looked at: WordNet's usage examples (`wordnet-base`, 48k texts but ~6 words each, mostly phrases),
dictionary quotations (`dict-gcide`, 1913 English), Python's docs (technical only).

Data flow: /usr/share/games/fortunes/<topic> files ("%" lines separate entries) -> clean (overstrike removed,
attribution lines "-- Author" dropped, whitespace collapsed, ASCII art and too short / long entries dropped,
duplicates dropped) -> split by a hash of the cleaned text: sha256(text) % 10 == 0 is held out (~10%), the rest
is training text. The split depends on nothing but the text itself, so it is the same on every machine and
never moves when entries are added or removed elsewhere in the collection.
"""

from __future__ import annotations

import functools
import hashlib
import re
from pathlib import Path

FORTUNE_DIR = Path("/usr/share/games/fortunes")
APT_PACKAGE = "fortunes"
SOURCE = f"Debian package `{APT_PACKAGE}` ({FORTUNE_DIR})"
# ascii-art is pictures; translate-me holds a few long stories meant for translators, not fortunes.
_SKIP_FILES = {"ascii-art", "translate-me"}
MIN_WORDS, MAX_WORDS = 3, 96
HELD_OUT_MOD = 10  # one text in ten is held out

_ATTRIBUTION = re.compile(r"^\s*--+\s*\S")  # "-- Mark Twain", "\t\t-- The Tao of Programming"
_OVERSTRIKE = re.compile(r".\x08")  # nroff bold/underline: "_\bw" prints an underlined w


def _clean(entry: str) -> str | None:
    """One raw fortune -> one line of text, or None if it is not usable prose."""
    entry = _OVERSTRIKE.sub("", entry)
    lines = entry.splitlines()
    # cut at the first attribution line that follows some content: the author and the source go with it
    for n, line in enumerate(lines):
        if n > 0 and _ATTRIBUTION.match(line):
            lines = lines[:n]
            break
    text = " ".join(" ".join(lines).split())
    words = text.split()
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        return None
    visible = [c for c in text if not c.isspace()]
    if sum(c.isalpha() for c in visible) < 0.6 * len(visible):  # ASCII art, tables, code
        return None
    return text


def _hash(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big")


def _topic_files(root: Path) -> list[Path]:
    return sorted(
        p
        for p in root.iterdir()
        if p.is_file() and not p.is_symlink() and "." not in p.name and p.name not in _SKIP_FILES
    )


@functools.lru_cache(maxsize=4)
def _load(root: str) -> tuple[str, ...]:
    path = Path(root)
    if not path.is_dir() or not _topic_files(path):
        raise FileNotFoundError(
            f"no English text corpus at {path}: it comes from Debian's `{APT_PACKAGE}` package "
            f"(apt-get install {APT_PACKAGE})"
        )
    texts = set()
    for f in _topic_files(path):
        raw = f.read_text(encoding="utf-8", errors="replace")
        for entry in re.split(r"^%\s*$", raw, flags=re.MULTILINE):
            text = _clean(entry)
            if text is not None:
                texts.add(text)
    # ordered by hash: a fixed, content-defined pseudo-random order (topics interleaved)
    return tuple(sorted(texts, key=lambda t: (_hash(t), t)))


def corpus(split: str = "train", root: str | Path = FORTUNE_DIR) -> list[str]:
    """The cleaned texts of one split: "train", "heldout", or "all"; a fixed order on every machine."""
    if split not in ("train", "heldout", "all"):
        raise ValueError(f"split must be 'train', 'heldout' or 'all', got {split!r}")
    texts = _load(str(root))
    if split == "all":
        return list(texts)
    held = split == "heldout"
    return [t for t in texts if (_hash(t) % HELD_OUT_MOD == 0) == held]


def is_available(root: str | Path = FORTUNE_DIR) -> bool:
    try:
        _load(str(root))
    except FileNotFoundError:
        return False
    return True
