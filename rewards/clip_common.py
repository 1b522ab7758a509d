"""Pieces shared by the CLIP-based global rewards (PickScore, HPSv2, aesthetic predictor).

* :func:`load_clip_tokenizer`: the CLIP byte-level BPE tokenizer (49408 tokens) as a
  ``transformers.CLIPTokenizer``, built from the ``bpe_simple_vocab_16e6.txt.gz`` merges file that
  OpenAI CLIP and open_clip ship (a copy is in ``rewards/assets/clip-bpe``), so that HPSv2 tokenizes
  offline exactly like open_clip's ``SimpleTokenizer`` (see :data:`CHECK_ENCODINGS`).
* :func:`check_clip_tokenizer`: rejects a missing or degenerate vocabulary (an offline
  ``from_pretrained`` can yield a 3-token tokenizer that maps every word to one id).
* :func:`load_hf_model`: ``from_pretrained`` for a local directory or a hub id that refuses a
  checkpoint with missing or mismatched weights (transformers only logs those and leaves random
  values in place).
"""

from __future__ import annotations

import gzip
import hashlib
from pathlib import Path
from typing import Any

import torch

from rewards.base import RewardError

ASSET_DIR = Path(__file__).resolve().parent / "assets" / "clip-bpe"
BPE_PATH = ASSET_DIR / "bpe_simple_vocab_16e6.txt.gz"
BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"
CLIP_VOCAB_SIZE = 49408
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
SOT_ID, EOT_ID = 49406, 49407
CONTEXT_LENGTH = 77
# Encodings (with start/end tokens) produced by open_clip 3.3.0's SimpleTokenizer on this vocab.
CHECK_ENCODINGS = {
    "A photo of a cat.": [49406, 320, 1125, 539, 320, 2368, 269, 49407],
    "Portrait of a woman's hands, 8k, highly-detailed!!": [
        49406,
        5352,
        539,
        320,
        2308,
        568,
        3500,
        267,
        279,
        330,
        267,
        5302,
        268,
        12609,
        748,
        49407,
    ],
}
_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def torch_dtype(name: str, owner: str) -> torch.dtype:
    """Map an options dtype name to a torch dtype; RewardError naming ``owner`` otherwise."""
    if name not in _DTYPES:
        raise RewardError(f"{owner} options: dtype={name!r}: must be one of {sorted(_DTYPES)}")
    return _DTYPES[name]


def _byte_symbols() -> list[str]:
    """The 256 byte symbols of CLIP's BPE, in vocabulary order.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space, NBSP,
    soft hyphen) are moved to code points 256, 257, ... in increasing byte order, so that no
    symbol is whitespace or a control character. The printable ones come first in the vocabulary.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    shifted = [b for b in range(256) if b not in set(printable)]
    return [chr(b) for b in printable] + [chr(256 + i) for i in range(len(shifted))]


def load_clip_tokenizer(bpe_path: str | None = None):
    """The CLIP BPE tokenizer built from a ``bpe_simple_vocab_16e6.txt.gz`` merges file.

    Vocabulary order (what fixes the ids): 256 byte symbols, the same with the end-of-word
    suffix ``</w>``, the first 48894 merges (joined), then ``<|startoftext|>`` (49406) and
    ``<|endoftext|>`` (49407); padding uses ``<|endoftext|>``.

    Args:
        bpe_path: the gzipped merges file; default: the copy shipped with rlfh (sha256-checked).

    Returns:
        A validated ``transformers.CLIPTokenizer`` with 49408 tokens.

    Raises:
        RewardError: when the file is missing, unreadable or not the CLIP vocabulary.
    """
    from transformers import CLIPTokenizer

    path = Path(bpe_path).expanduser() if bpe_path is not None else BPE_PATH
    if not path.is_file():
        raise RewardError(f"CLIP BPE merges file not found at {path} (expected bpe_simple_vocab_16e6.txt.gz)")
    raw = path.read_bytes()
    if bpe_path is None and hashlib.sha256(raw).hexdigest() != BPE_SHA256:
        raise RewardError(f"{path} is not CLIP's bpe_simple_vocab_16e6.txt.gz (sha256 mismatch)")
    try:
        lines = gzip.decompress(raw).decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as e:
        raise RewardError(f"cannot read {path} as a gzipped UTF-8 merges file: {e}") from e
    n_merges = CLIP_VOCAB_SIZE - 2 * 256 - 2
    # Line 0 is a version header; CLIP uses exactly the next n_merges lines.
    merges = [tuple(line.split()) for line in lines[1 : 1 + n_merges]]
    if len(merges) != n_merges or any(len(m) != 2 for m in merges):
        raise RewardError(f"{path}: expected {n_merges} merge lines of two symbols after the header")
    symbols = _byte_symbols()
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=CONTEXT_LENGTH)
    check_clip_tokenizer(tok, str(path))
    return tok


def check_clip_tokenizer(tokenizer: Any, where: str) -> None:
    """Raise RewardError unless ``tokenizer`` encodes like CLIP's BPE (sizes and known ids)."""
    size = len(tokenizer)
    if size != CLIP_VOCAB_SIZE:
        raise RewardError(
            f"tokenizer from {where} has {size} tokens, expected CLIP's {CLIP_VOCAB_SIZE} "
            "(vocab.json / merges.txt / tokenizer.json missing or not CLIP's)"
        )
    for text, want in CHECK_ENCODINGS.items():
        got = tokenizer(text).input_ids
        if got != want:
            raise RewardError(f"tokenizer from {where} encodes {text!r} as {got}, CLIP BPE gives {want}")


def load_hf_model(
    cls: Any,
    source: str,
    what: str,
    *,
    revision: str | None = None,
    cache_dir: str | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    allow_unused: tuple[str, ...] = (),
):
    """``cls.from_pretrained(source)`` in eval mode, refusing missing or mismatched weights.

    Args:
        cls: a transformers model class (``CLIPModel``, ``CLIPVisionModelWithProjection``).
        source: a local directory (``config.json`` + ``model.safetensors`` or
            ``pytorch_model.bin``) or a hub id.
        what: what the model is, for error messages.
        revision: hub revision. cache_dir: hub cache directory.
        dtype: parameter dtype. device: where to put the model.
        allow_unused: prefixes of checkpoint keys that may go unused (e.g. ``text_model.`` when
            only the vision tower is built).

    Raises:
        RewardError: the source is absent or unreadable, or weights are missing, unexpected or of
            the wrong shape.
    """
    path = Path(source).expanduser()
    local = path.is_dir()
    if not local and (path.exists() or source.count("/") != 1):
        raise RewardError(f"{what}: {source!r} is neither a model directory nor a hub id 'owner/name'")
    try:
        model, info = cls.from_pretrained(
            str(path) if local else source,
            revision=revision,
            cache_dir=cache_dir,
            dtype=dtype,
            output_loading_info=True,
            local_files_only=local,
        )
    except Exception as e:  # OSError, ValueError, safetensors errors: all mean "no usable weights"
        raise RewardError(
            f"{what}: cannot load {cls.__name__} from {source!r} (expected a Hugging Face model "
            f"folder with config.json and model.safetensors or pytorch_model.bin): {e}"
        ) from e
    unexpected = [k for k in info.get("unexpected_keys", []) if not k.startswith(allow_unused)]
    problems = {
        "missing": list(info.get("missing_keys", [])),
        "unexpected": unexpected,
        "mismatched": [str(m) for m in info.get("mismatched_keys", [])],
    }
    problems = {k: v for k, v in problems.items() if v}
    if problems:
        raise RewardError(
            f"{what}: checkpoint {source!r} does not fit {cls.__name__}: "
            + "; ".join(f"{k} {v[:8]}{' ...' if len(v) > 8 else ''}" for k, v in problems.items())
        )
    return model.to(device).eval().requires_grad_(False)


def unit(x: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit L2 norm, computed in float32: (B, D) -> (B, D)."""
    x = x.float()
    return x / x.norm(dim=-1, keepdim=True)
