"""Documents -> overlapping chunks of words. Overlap keeps a sentence that straddles a boundary
whole in at least one chunk, so a question about it can still find it."""
import json
from dataclasses import dataclass
from pathlib import Path

SUFFIXES = (".txt", ".md", ".jsonl")


@dataclass
class Chunk:
    source: str  # file, or file:line for .jsonl records
    text: str


def split_words(text: str, chunk_words: int = 120, overlap: int = 30) -> list[str]:
    if not 0 <= overlap < chunk_words:
        raise ValueError(f"overlap ({overlap}) must be in [0, chunk_words={chunk_words})")
    words = text.split()
    if not words:
        return []
    step = chunk_words - overlap
    starts = range(0, max(len(words) - overlap, 1), step)
    return [" ".join(words[s:s + chunk_words]) for s in starts]


def read_documents(paths: list[str | Path]) -> list[tuple[str, str]]:
    """(source, text) of every document under `paths` (files or folders, searched recursively)."""
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            files += sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
        elif p.is_file():
            if p.suffix not in SUFFIXES:
                raise ValueError(f"{p}: only {', '.join(SUFFIXES)} files can be indexed")
            files.append(p)
        else:
            raise FileNotFoundError(f"{p}: no such file or folder")
    docs = []
    for f in files:
        text = f.read_text(encoding="utf-8", errors="replace")
        if f.suffix != ".jsonl":
            docs.append((str(f), text))
            continue
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{f}:{i}: not JSON: {e}") from None
            body = record.get("text") if isinstance(record, dict) else None
            if not isinstance(body, str):
                raise ValueError(f"{f}:{i}: each .jsonl line needs a string field 'text'")
            docs.append((str(record.get("source") or f"{f}:{i}"), body))
    return docs


def chunk_documents(docs: list[tuple[str, str]], chunk_words: int = 120, overlap: int = 30) -> list[Chunk]:
    return [Chunk(source, piece) for source, text in docs for piece in split_words(text, chunk_words, overlap)]
