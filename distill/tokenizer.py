"""A trimmed CLIP BPE vocabulary: byte-level base tokens plus one whole-word token per domain word.

The files are the standard `vocab.json` + `merges.txt`, so `transformers.CLIPTokenizer` loads them
like any CLIP checkpoint; words outside the domain still tokenize (byte by byte).
"""

from __future__ import annotations

import json
from pathlib import Path

from transformers import CLIPTokenizer

from distill.domain import WORDS

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 16  # the longest domain caption is 13 tokens with BOS/EOS


def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's (GPT-2's) reversible byte -> printable-unicode table."""
    bs = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs], strict=True))


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's BPE on one word (the last symbol carries '</w>')."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [
            (ranks.get((a, b), 1 << 30), i) for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))
        ]
        best, i = min(pairs)
        if best == 1 << 30:
            break
        a, b = parts[i], parts[i + 1]
        merged: list[str] = []
        j = 0
        while j < len(parts):
            if j < len(parts) - 1 and parts[j] == a and parts[j + 1] == b:
                merged.append(a + b)
                j += 2
            else:
                merged.append(parts[j])
                j += 1
        parts = merged
    return parts


def build_vocab(words: tuple[str, ...] = WORDS) -> tuple[dict[str, int], list[tuple[str, str]]]:
    base = list(_bytes_to_unicode().values())
    tokens = base + [b + "</w>" for b in base]
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        # Append merges (lowest priority) until the word is one token; earlier words stay whole.
        while len(parts := _bpe(word, ranks)) > 1:
            pair = (parts[0], parts[1])
            ranks[pair] = len(merges)
            merges.append(pair)
            if pair[0] + pair[1] not in tokens:
                tokens.append(pair[0] + pair[1])
    tokens += [BOS, EOS]
    return {t: i for i, t in enumerate(tokens)}, merges


def save_tokenizer(out_dir: Path) -> CLIPTokenizer:
    out_dir.mkdir(parents=True, exist_ok=True)
    vocab, merges = build_vocab()
    (out_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (out_dir / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n")
    tok = CLIPTokenizer.from_pretrained(str(out_dir), local_files_only=True, model_max_length=MAX_LENGTH)
    tok.save_pretrained(str(out_dir))
    return tok


def load_tokenizer(path: Path) -> CLIPTokenizer:
    return CLIPTokenizer.from_pretrained(str(path), local_files_only=True)
