"""A CLIP-style byte-level BPE vocabulary, learned here from a small built-in corpus.

No tokenizer can be downloaded where sdfarm is tested, so the tiny model gets its own: the same
scheme as OpenAI's CLIP tokenizer (GPT-2's byte-to-unicode table, lowercase text, "</w>" marking
the end of a word, the two special tokens last in the vocabulary) with a few hundred merges learned
from typical Stable Diffusion prompt words. `transformers.CLIPTokenizer` loads the result exactly
as it loads SD 1.x's tokenizer, so everything downstream runs unchanged on real weights.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from itertools import pairwise
from pathlib import Path

__all__ = ["BOS_TOKEN", "EOS_TOKEN", "MODEL_MAX_LENGTH", "write_tokenizer"]

log = logging.getLogger(__name__)

BOS_TOKEN = "<|startoftext|>"
EOS_TOKEN = "<|endoftext|>"
MODEL_MAX_LENGTH = 77  # CLIP's context: 75 prompt tokens plus bos and eos
END_OF_WORD = "</w>"

# Typical prompt vocabulary. Repeats are deliberate: frequency decides which merges come first.
CORPUS = """
a photo of a cat, highly detailed, oil painting, trending on artstation, sharp focus
a photograph of an astronaut riding a horse on the moon, cinematic lighting, 8k, octane render
portrait of a beautiful woman, intricate, elegant, digital painting, concept art, smooth
a dog sitting in a field of flowers at sunset, golden hour, volumetric light, bokeh
a castle on a hill, fantasy landscape, matte painting, by greg rutkowski and alphonse mucha
a cute little robot, pixar style, 3d render, unreal engine, studio lighting, high quality
an old man with a beard, wrinkles, dramatic lighting, black and white photography, 35mm film
a futuristic city at night, neon lights, cyberpunk, rain, reflections, blade runner
a bowl of fruit on a wooden table, still life, watercolor, soft colors, masterpiece
a red sports car on a mountain road, motion blur, professional photo, canon eos
a forest with tall trees and fog, morning light, mysterious atmosphere, ultra realistic
a dragon flying over the ocean, epic, highly detailed scales, fire, storm clouds
a cozy cabin in the snow, winter, warm light in the window, illustration, children book
a bird on a branch, macro photography, shallow depth of field, vibrant colors, nature
an anime girl with blue hair, school uniform, cherry blossoms, makoto shinkai, beautiful sky
a spaceship in deep space, stars, nebula, science fiction, hard surface, artstation hq
a knight in shining armor, medieval, sword and shield, heroic pose, full body, character design
a cat wearing a hat, funny, cartoon, simple background, vector art, flat colors, logo
the interior of a library, books, wooden shelves, warm light, architecture, wide angle
a lighthouse on a rocky coast, waves crashing, sunset, impressionism, claude monet
a portrait of a lion, wildlife photography, national geographic, award winning, detailed fur
a plate of sushi, food photography, professional, delicious, top view, natural light
a mountain lake with reflections, landscape photography, hdr, crisp, clear water, summer
a steampunk airship, brass and copper, gears, victorian, detailed, concept art
an abstract painting, colorful shapes, geometric, modern art, kandinsky, bold lines
a cup of coffee on a rainy day, window, cozy, lofi, soft focus, pastel colors
a beautiful garden with roses, spring, butterflies, fairy tale, magical, glowing
a skull with flowers, dark fantasy, gothic, horror, moody, low key lighting
a pixel art village, retro game, 16 bit, isometric, sprites, bright palette
a marble statue of a greek god, museum, sculpture, classical, dramatic shadows
a photo of a dog, a photo of a cat, a painting of a house, a drawing of a tree
blurry, low quality, bad anatomy, extra fingers, deformed, ugly, watermark, text, cropped
worst quality, jpeg artifacts, out of frame, duplicate, disfigured, poorly drawn hands
highly detailed, highly detailed, sharp focus, sharp focus, 4k, 8k, hd, trending, trending
"""

# Roughly CLIP's pre-tokenizer pattern (letters runs, single digits, punctuation runs) in
# Python's `re`, which lacks \p{L}; it only shapes which merges are learned, not how
# transformers tokenizes at run time.
WORD_PATTERN = re.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|(?:[^\s\w]|_)+""",
    re.IGNORECASE,
)


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable unicode characters (CLIP uses the same)."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    codes = printable[:]
    shifted = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            codes.append(256 + shifted)
            shifted += 1
    return dict(zip(printable, (chr(c) for c in codes), strict=True))


def _word_counts(text: str) -> Counter[tuple[str, ...]]:
    """Split lowercased text into words of byte-symbols, the last one carrying "</w>"."""
    byte_encoder = bytes_to_unicode()
    counts: Counter[tuple[str, ...]] = Counter()
    for word in WORD_PATTERN.findall(" ".join(text.lower().split())):
        symbols = [byte_encoder[b] for b in word.encode("utf-8")]
        symbols[-1] += END_OF_WORD
        counts[tuple(symbols)] += 1
    return counts


def _merge_word(word: tuple[str, ...], pair: tuple[str, str]) -> tuple[str, ...]:
    merged: list[str] = []
    i = 0
    while i < len(word):
        if i + 1 < len(word) and (word[i], word[i + 1]) == pair:
            merged.append(word[i] + word[i + 1])
            i += 2
        else:
            merged.append(word[i])
            i += 1
    return tuple(merged)


def learn_merges(text: str, num_merges: int) -> list[tuple[str, str]]:
    """Learn `num_merges` BPE merges from `text`, most frequent pair first (ties: smallest pair)."""
    words = _word_counts(text)
    merges: list[tuple[str, str]] = []
    while len(merges) < num_merges:
        pairs: Counter[tuple[str, str]] = Counter()
        for word, count in words.items():
            for pair in pairwise(word):
                pairs[pair] += count
        if not pairs:
            raise ValueError(
                f"num_merges must be at most {len(merges)} for this corpus "
                f"(every word is already one token), got {num_merges}"
            )
        # Sorting by (-count, pair) makes the result independent of dict ordering.
        best = min(pairs.items(), key=lambda item: (-item[1], item[0]))[0]
        merges.append(best)
        words = Counter({_merge_word(word, best): count for word, count in words.items()})
    return merges


def build_vocab(merges: list[tuple[str, str]]) -> dict[str, int]:
    """CLIP's vocabulary order: 256 byte symbols, the same with "</w>", merges, then specials."""
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + END_OF_WORD for s in symbols] + ["".join(m) for m in merges]
    tokens += [BOS_TOKEN, EOS_TOKEN]
    vocab: dict[str, int] = {}
    for token in tokens:
        # Two different merges can spell the same string; ids stay contiguous either way.
        vocab.setdefault(token, len(vocab))
    return vocab


def write_tokenizer(dir: Path, num_merges: int = 400) -> None:
    """Write vocab.json, merges.txt and the configs that `CLIPTokenizer.from_pretrained` reads."""
    if num_merges < 0:
        raise ValueError(f"num_merges must be 0 or more, got {num_merges}")
    merges = learn_merges(CORPUS, num_merges)
    vocab = build_vocab(merges)
    dir.mkdir(parents=True, exist_ok=True)
    (dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    merge_lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (dir / "merges.txt").write_text("\n".join(merge_lines) + "\n", encoding="utf-8")
    # The same settings as SD 1.x's tokenizer/ folder: pad with eos, 77 positions.
    special_tokens = {
        "bos_token": BOS_TOKEN,
        "eos_token": EOS_TOKEN,
        "pad_token": EOS_TOKEN,
        "unk_token": EOS_TOKEN,
    }
    config = {
        "tokenizer_class": "CLIPTokenizer",
        "model_max_length": MODEL_MAX_LENGTH,
        "do_lower_case": True,
        "add_prefix_space": False,
        "errors": "replace",
        **special_tokens,
    }
    (dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    (dir / "special_tokens_map.json").write_text(json.dumps(special_tokens, indent=2) + "\n")
    log.debug("wrote a %d-token CLIP vocabulary to %s", len(vocab), dir)
