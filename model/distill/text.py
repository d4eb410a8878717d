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


# ---- more training text: Debian's English manual pages and package documentation ---------------------------

MAN_DIRS = tuple(Path("/usr/share/man") / f"man{n}" for n in (1, 5, 7, 8))  # English pages only (not man/de/ ...)
DOC_DIR = Path("/usr/share/doc")
_DOC_SUFFIXES = (".txt", ".md", ".rst", "")  # plus .gz of each; "" is README, NEWS, ... (not changelogs)
_PER_FILE = 40  # paragraphs per file at most: no single manual dominates
_DOC_NAMES = re.compile(r"^(readme|news|faq|todo|bugs|thanks|authors|usage|intro|overview|manual|guide)", re.I)
_TROFF_ESC = re.compile(r"\\f(\[[^]]*\]|\(..|.)|\\s[-+]?\d+|\\[&/,:|^~%]|\\\*(\(..|\[[^]]*\]|.)")
_TROFF_CHAR = {r"\-": "-", r"\(em": "--", r"\(en": "-", r"\(aq": "'", r"\(dq": '"', r"\(lq": '"', r"\(rq": '"'}


def _read(path: Path) -> str:
    import gzip

    raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    return raw[:200_000].decode("utf-8", errors="replace")


def _man_paragraphs(src: str) -> list[str]:
    """troff source -> its running-text paragraphs (requests and sections break paragraphs; escapes removed)."""
    paras, cur = [], []
    for line in src.splitlines():
        if line.startswith((".", "'")):
            if cur:
                paras.append(" ".join(cur))
                cur = []
            continue
        for k, v in _TROFF_CHAR.items():
            line = line.replace(k, v)
        line = _TROFF_ESC.sub("", line).replace("\\e", "\\").replace("\\", "")
        if line.strip():
            cur.append(line.strip())
    return [*paras, " ".join(cur)] if cur else paras


def _doc_paragraphs(src: str) -> list[str]:
    """Plain text / Markdown / reST -> blank-line separated paragraphs of prose (indented code skipped)."""
    out = []
    for block in re.split(r"\n\s*\n", src):
        lines = [ln for ln in block.splitlines() if ln.strip()]
        if lines and not any(ln.startswith(("    ", "\t", "```", "$ ", "#", "|", "+-", "..")) for ln in lines):
            out.append(" ".join(ln.strip().lstrip("*-> ").strip() for ln in lines))
    return out


def _doc_files() -> list[Path]:
    files = []
    for path in sorted(DOC_DIR.rglob("*")) if DOC_DIR.is_dir() else []:
        stem = path.name[:-3] if path.name.endswith(".gz") else path.name
        suffix = Path(stem).suffix.lower()
        if path.is_file() and not path.is_symlink() and suffix in _DOC_SUFFIXES and _DOC_NAMES.match(stem):
            files.append(path)
    return files


def _prose(paragraphs: list[str]) -> list[str]:
    """Cleaned paragraphs that read as sentences: a capital first, a full stop (or ! ?) last, 6+ words."""
    out = []
    for para in paragraphs:
        text = _clean(para)
        if text and len(text.split()) >= 6 and text[0].isupper() and text[-1] in ".!?":
            out.append(text)
    return out


@functools.lru_cache(maxsize=1)
def _load_extra() -> tuple[str, ...]:
    texts = set()
    for d in MAN_DIRS:
        # one vendor's 16,000 generated pages (gcloud) would drown the rest: skipped
        for path in sorted(d.glob("*.gz")) if d.is_dir() else []:
            if not path.name.startswith("gcloud"):
                texts.update(_prose(_man_paragraphs(_read(path)))[:_PER_FILE])
    for path in _doc_files():
        texts.update(_prose(_doc_paragraphs(_read(path)))[:_PER_FILE])
    # the held-out rule applies here too (and no held-out fortune can slip in): training text only
    held = set(_load(str(FORTUNE_DIR))) if FORTUNE_DIR.is_dir() else set()
    return tuple(sorted((t for t in texts if _hash(t) % HELD_OUT_MOD and t not in held), key=lambda t: (_hash(t), t)))


def extra_texts(limit: int | None = None) -> list[str]:
    """Training-only English text from the manual pages (man1/5/7/8) and READMEs / NEWS / FAQs under
    /usr/share/doc: paragraphs cleaned like the fortunes, none of them held out. A fixed order; [] if absent."""
    texts = _load_extra()
    return list(texts if limit is None else texts[:limit])


def training_texts(extra: int = 0) -> list[str]:
    """The fortunes' training split and up to `extra` texts of extra_texts(), interleaved evenly (a fixed order)."""
    train, more = corpus("train"), extra_texts(extra) if extra else []
    keyed = [((n + 0.5) / len(train), t) for n, t in enumerate(train)]
    keyed += [((n + 0.25) / len(more), t) for n, t in enumerate(more)]
    return [t for _, t in sorted(keyed, key=lambda kt: kt[0])]


def is_available(root: str | Path = FORTUNE_DIR) -> bool:
    try:
        _load(str(root))
    except FileNotFoundError:
        return False
    return True
