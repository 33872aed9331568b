"""A CLIP tokenizer that loads without a hub: the BPE vocabulary open-clip-torch ships in its wheel.

OpenAI CLIP's ``bpe_simple_vocab_16e6.txt.gz`` (shipped as ``open_clip/bpe_simple_vocab_16e6.txt.gz``) has a
header line, then merges; CLIP uses the first 48,894 (``lines[1:49152-256-2+1]``). The vocabulary is the 256
byte characters of GPT-2's ``bytes_to_unicode``, the same with ``</w>``, one token per merge, then
``<|startoftext|>`` (49406) and ``<|endoftext|>`` (49407): 49,408 ids, the same as Hugging Face's CLIP
tokenizers. ``model_max_length`` is set to CLIP's 77 (``from_pretrained`` of a bare vocab.json + merges.txt
would leave it at 1e30). Saved with ``save_pretrained`` it loads back with ``CLIPTokenizer.from_pretrained``.
"""

from __future__ import annotations

import gzip
import importlib.util
import os

BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49152 - 256 - 2
MAX_LENGTH = 77


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable character map (256 entries)."""
    printable = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    chars, extra = list(printable), 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return dict(zip(printable, map(chr, chars)))


def bpe_path() -> str:
    """Path of open-clip-torch's BPE file (found without importing open_clip)."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            "the offline CLIP tokenizer needs open-clip-torch's vocabulary: pip install -e '.[sd]'"
        )
    return os.path.join(list(spec.submodule_search_locations)[0], BPE_FILE)


def clip_tokenizer():
    """A ``transformers.CLIPTokenizer`` with CLIP's vocabulary, merges and 77-token length."""
    from transformers import CLIPTokenizer

    with gzip.open(bpe_path()) as f:
        lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : NUM_MERGES + 1]]
    chars = list(bytes_to_unicode().values())
    tokens = [*chars, *(c + "</w>" for c in chars), *("".join(m) for m in merges)]
    tokens += ["<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(
        vocab={t: i for i, t in enumerate(tokens)}, merges=merges, model_max_length=MAX_LENGTH
    )
