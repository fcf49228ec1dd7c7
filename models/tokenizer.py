"""Text tokenisation for the CLIP text encoder, with a no-download fallback.

``load_tokenizer(weights_dir)`` returns the real ``CLIPTokenizer`` from ``weights_dir/tokenizer/``
(a local diffusers folder) when one is given and holds tokenizer files. Otherwise it returns
:class:`ByteTokenizer`, a deterministic fallback that needs no vocabulary file and no network.

The fallback is CLIP's own byte-level BPE *with zero merges applied*: CLIP lower-cases the text,
splits it into words, maps every UTF-8 byte to one of its 256 base byte tokens (ids 0..255 in
the ``bytes_to_unicode`` order of the CLIP/GPT-2 vocabulary) and marks the last symbol of each
word with ``</w>`` (the same 256 symbols again, ids 256..511). Without the merge table every word
stays split into single bytes, which is exactly what this fallback emits. So the ids are valid
CLIP ids (vocabulary 49,408; ``<|startoftext|>`` 49406, ``<|endoftext|>`` 49407, padding with
``<|endoftext|>`` as the SD-v1 tokenizer does), any CLIP text encoder accepts them, and the
same text always gives the same 77 ids. Text is truncated to 75 tokens plus BOS and EOS.
Sequences differ from the real tokenizer's wherever a merge would have applied, so prompts are
only meaningful to a text encoder trained with the same tokenizer (e.g. random-weight models and
the models our training companion produces from them).

A vocabulary of whole words: :func:`write_word_tokenizer` learns a CLIP BPE merge table (the
``vocab.json`` + ``merges.txt`` pair that ``CLIPTokenizer`` reads) from a closed word list, merging
until every listed word is one token. The miniature EdgeFusion (bench/mini_edgefusion.py) writes
one for its synthetic captions (``edgefc data synth`` puts it in ``DIR/tokenizer/``), so each
attribute word of a prompt is one token and one key of the U-Net's cross-attention; any other word
still tokenises (byte by byte, as the fallback). Ids keep CLIP's layout: the 512 byte symbols
first, then the merges, ``<|startoftext|>`` 49406 and ``<|endoftext|>`` 49407.

Both tokenizers are used through the same two-method interface: ``encode(texts) -> int64 array
[N, 77]`` and ``kind`` ("clip" or "fallback"). No torch import here (the deployment pipeline runs
on onnxruntime).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

MAX_LENGTH = 77
VOCAB_SIZE = 49408
BOS_ID = 49406
EOS_ID = 49407
PAD_ID = EOS_ID


def _byte_order() -> list[int]:
    """The byte order of CLIP's (GPT-2's) ``bytes_to_unicode``: printable bytes first, then the rest."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1)
    )
    rest = [b for b in range(256) if b not in printable]
    return printable + rest


_BYTE_ID = np.empty(256, dtype=np.int64)
_BYTE_ID[_byte_order()] = np.arange(256)

# CLIP's pre-tokenisation: special tokens, common contractions, letter runs, single digits,
# other non-space runs (the Unicode classes approximated with Python's \w-based classes).
_WORD_RE = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+", re.IGNORECASE)


class ByteTokenizer:
    """Deterministic no-download tokenizer emitting CLIP-compatible ids (see module docstring)."""

    kind = "fallback"
    model_max_length = MAX_LENGTH
    vocab_size = VOCAB_SIZE

    def tokenize(self, text: str) -> list[int]:
        """Ids of ``text`` without BOS/EOS (one per UTF-8 byte, word-final bytes marked)."""
        text = " ".join(text.split()).lower()
        ids: list[int] = []
        for word in _WORD_RE.findall(text):
            data = word.encode("utf-8")
            word_ids = _BYTE_ID[np.frombuffer(data, dtype=np.uint8)].tolist()
            word_ids[-1] += 256  # the '</w>' variant of the last symbol
            ids.extend(word_ids)
        return ids

    def encode(self, texts: str | list[str]) -> np.ndarray:
        """int64 ids [N, 77]: BOS, up to 75 tokens, EOS, then EOS padding."""
        if isinstance(texts, str):
            texts = [texts]
        out = np.full((len(texts), MAX_LENGTH), PAD_ID, dtype=np.int64)
        for i, text in enumerate(texts):
            body = self.tokenize(text)[: MAX_LENGTH - 2]
            row = [BOS_ID, *body, EOS_ID]
            out[i, : len(row)] = row
        return out


class ClipTokenizer:
    """The real ``transformers.CLIPTokenizer`` from a local folder, behind the same interface."""

    kind = "clip"

    def __init__(self, folder: Path):
        from transformers import CLIPTokenizer

        self.folder = Path(folder)
        self.tok = CLIPTokenizer.from_pretrained(str(folder), local_files_only=True)
        self.model_max_length = min(int(self.tok.model_max_length), MAX_LENGTH)
        self.vocab_size = len(self.tok)

    def encode(self, texts: str | list[str]) -> np.ndarray:
        if isinstance(texts, str):
            texts = [texts]
        enc = self.tok(
            list(texts), padding="max_length", max_length=MAX_LENGTH, truncation=True, return_tensors="np"
        )
        return np.asarray(enc["input_ids"], dtype=np.int64)

    def save(self, folder: str | Path) -> None:
        """Copy ``vocab.json`` and ``merges.txt`` into ``folder`` (what :func:`load_tokenizer` reads;
        transformers 5's ``save_pretrained`` writes only ``tokenizer.json``)."""
        import shutil

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("vocab.json", "merges.txt"):
            shutil.copyfile(self.folder / name, folder / name)


def _byte_symbols() -> list[str]:
    """CLIP's ``bytes_to_unicode`` symbols, in id order (ids 0..255)."""
    order = _byte_order()
    printable = set(order[:188])
    sym, n = {}, 0
    for b in range(256):
        if b in printable:
            sym[b] = chr(b)
        else:
            sym[b] = chr(256 + n)
            n += 1
    return [sym[b] for b in order]


def learn_word_merges(words) -> list[tuple[str, str]]:
    """BPE merges (most frequent pair first, ties by the pair's text) until each word is one symbol.

    ``words``: lower-case words of letters (CLIP's pre-tokenisation units); each counts once, so
    the table is a pure function of the word set.
    """
    segs = {tuple(w[:-1]) + (w[-1] + "</w>",) for w in sorted(set(words)) if w}
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seg in segs:
            for pair in zip(seg, seg[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = min(counts, key=lambda p: (-counts[p], p))
        merges.append(best)
        new = set()
        for seg in segs:
            out, i = [], 0
            while i < len(seg):
                if i + 1 < len(seg) and (seg[i], seg[i + 1]) == best:
                    out.append(seg[i] + seg[i + 1])
                    i += 2
                else:
                    out.append(seg[i])
                    i += 1
            new.add(tuple(out))
        segs = new


def write_word_tokenizer(folder: str | Path, words) -> Path:
    """Write a CLIP tokenizer (``vocab.json``, ``merges.txt``) in which every word of ``words`` is one token."""
    import json

    bad = sorted(w for w in words if not re.fullmatch(r"[a-z]+", w))
    if bad:
        raise ValueError(f"words must be lower-case letters only: {bad[:5]}")
    symbols = _byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": 256 + i for i, s in enumerate(symbols)})
    merges = learn_word_merges(words)
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    if len(vocab) > BOS_ID:
        raise ValueError(f"{len(vocab)} tokens do not fit below CLIP's special ids")
    vocab["<|startoftext|>"], vocab["<|endoftext|>"] = BOS_ID, EOS_ID
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
    return folder


def load_tokenizer(weights_dir: str | Path | None = None):
    """The CLIP tokenizer in ``weights_dir/tokenizer/`` if present, else the :class:`ByteTokenizer`.

    ``weights_dir`` may also be the tokenizer folder itself (it holds ``vocab.json``).
    """
    if weights_dir is not None:
        root = Path(weights_dir)
        for folder in (root / "tokenizer", root):
            if (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
                return ClipTokenizer(folder)
    return ByteTokenizer()
