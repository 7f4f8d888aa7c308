"""The real CLIP BPE tokenizer, built offline from the vocabulary file open-clip-torch ships.

Stable Diffusion 1.x uses OpenAI's CLIP tokenizer. Its merges file ships inside the
open-clip-torch wheel (`bpe_simple_vocab_16e6.txt.gz`); from it we write the `vocab.json` and
`merges.txt` that `transformers.CLIPTokenizer.from_pretrained` reads, so no hub access is needed.
(`CLIPTokenizer(vocab_file=..., merges_file=...)` silently builds a 2-token vocabulary with
transformers 5; loading from a folder works.)
"""

from __future__ import annotations

import copy
import gzip
import json
import tempfile
from functools import lru_cache
from pathlib import Path

from concept_erase.errors import UserError


def _bytes_to_unicode() -> dict[int, str]:
    # The byte -> printable character table of GPT-2 / CLIP BPE.
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def open_clip_vocab_file() -> Path:
    try:
        import open_clip
    except ImportError as err:  # pragma: no cover - a declared dependency
        raise UserError("open-clip-torch is not installed; run `pip install open-clip-torch`") from err
    path = Path(open_clip.__file__).parent / "bpe_simple_vocab_16e6.txt.gz"
    if not path.is_file():
        raise UserError(f"open-clip-torch ships no CLIP vocabulary at {path}; reinstall open-clip-torch")
    return path


def write_clip_tokenizer(directory: str | Path, max_length: int = 77) -> Path:
    """Write a CLIPTokenizer folder (vocab.json, merges.txt, configs) into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    lines = gzip.open(open_clip_vocab_file()).read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 49152 - 256 - 2 + 1]]
    vocab = list(_bytes_to_unicode().values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab += ["".join(m) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (directory / "vocab.json").write_text(json.dumps({tok: i for i, tok in enumerate(vocab)}), encoding="utf-8")
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(m) for m in merges) + "\n", encoding="utf-8")
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": max_length,
        "bos_token": "<|startoftext|>",
        "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>",
        "pad_token": "<|endoftext|>",
        "do_lower_case": True,
    }
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    (directory / "special_tokens_map.json").write_text(
        json.dumps({k: config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token")}, indent=2),
        encoding="utf-8",
    )
    return directory


@lru_cache(maxsize=None)
def _loaded(max_length: int):
    """Built once per process in a temporary folder that is removed at once (the tokenizer keeps its
    vocabulary in memory): no folder is left behind."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="concept-erase-tokenizer-") as tmp:
        tok = CLIPTokenizer.from_pretrained(str(write_clip_tokenizer(tmp, max_length)), model_max_length=max_length)
    if len(tok) < 49000:
        raise RuntimeError(f"the CLIP tokenizer came out with {len(tok)} tokens instead of 49408")
    return tok


def load_clip_tokenizer(max_length: int = 77):
    """A fresh copy each call: a caller may add tokens (textual inversion) without touching the others."""
    return copy.deepcopy(_loaded(max_length))
