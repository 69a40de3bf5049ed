#!/usr/bin/env python
"""Build ttt_bench/data/librilight_sample: offline demo data in the LibriLight layout.

Three "chapters" of public-domain text (Lewis Carroll, 1865; L. Frank Baum, 1900) read by
espeak-ng with a different voice and speed per speaker, written as 16 kHz mono FLAC like
LibriLight, with a LibriLight-style ``.json`` beside each (speaker, book_meta, snr,
voice_activity in seconds). Two chapters share a book and speaker, so the book task has
something to join. Synthetic speech: for demos and smoke tests, not for measurements.

    python tools/make_librilight_sample.py [--out DIR]

Needs espeak-ng on PATH (apt install espeak-ng); soundfile and soxr come with ttt-bench.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

logger = logging.getLogger("make_librilight_sample")

OUT = Path(__file__).resolve().parent.parent / "ttt_bench" / "data" / "librilight_sample"
SAMPLE_RATE = 16000
MAX_TOTAL_BYTES = 5_000_000  # 5 MB, audio and metadata

ALICE_1 = """
Chapter one. Down the Rabbit-Hole.
Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to
do: once or twice she had peeped into the book her sister was reading, but it had no pictures or
conversations in it, "and what is the use of a book," thought Alice, "without pictures or
conversations?" So she was considering in her own mind, as well as she could, for the hot day made
her feel very sleepy and stupid, whether the pleasure of making a daisy-chain would be worth the
trouble of getting up and picking the daisies, when suddenly a White Rabbit with pink eyes ran close
by her. There was nothing so very remarkable in that; nor did Alice think it so very much out of the
way to hear the Rabbit say to itself, "Oh dear! Oh dear! I shall be late!" But when the Rabbit
actually took a watch out of its waistcoat-pocket, and looked at it, and then hurried on, Alice
started to her feet, for it flashed across her mind that she had never before seen a rabbit with
either a waistcoat-pocket, or a watch to take out of it, and burning with curiosity, she ran across
the field after it, and fortunately was just in time to see it pop down a large rabbit-hole under
the hedge. In another moment down went Alice after it, never once considering how in the world she
was to get out again. The rabbit-hole went straight on like a tunnel for some way, and then dipped
suddenly down, so suddenly that Alice had not a moment to think about stopping herself before she
found herself falling down a very deep well.
"""

ALICE_2 = """
Chapter two. The Pool of Tears.
"Curiouser and curiouser!" cried Alice; she was so much surprised, that for the moment she quite
forgot how to speak good English. "Now I'm opening out like the largest telescope that ever was!
Good-bye, feet!" For when she looked down at her feet, they seemed to be almost out of sight, they
were getting so far off. "Oh, my poor little feet, I wonder who will put on your shoes and stockings
for you now, dears? I'm sure I shan't be able! I shall be a great deal too far off to trouble myself
about you: you must manage the best way you can." Just then her head struck against the roof of the
hall: in fact she was now more than nine feet high, and she at once took up the little golden key
and hurried off to the garden door. Poor Alice! It was as much as she could do, lying down on one
side, to look through into the garden with one eye; but to get through was more hopeless than ever:
she sat down and began to cry again. "You ought to be ashamed of yourself," said Alice, "a great girl
like you, to go on crying in this way! Stop this moment, I tell you!" But she went on all the same,
shedding gallons of tears, until there was a large pool all round her, about four inches deep and
reaching half down the hall.
"""

OZ_1 = """
Chapter one. The Cyclone.
Dorothy lived in the midst of the great Kansas prairies, with Uncle Henry, who was a farmer, and
Aunt Em, who was the farmer's wife. Their house was small, for the lumber to build it had to be
carried by wagon many miles. There were four walls, a floor and a roof, which made one room; and
this room contained a rusty looking cookstove, a cupboard for the dishes, a table, three or four
chairs, and the beds. Uncle Henry and Aunt Em had a big bed in one corner, and Dorothy a little bed
in another corner. There was no garret at all, and no cellar, except a small hole dug in the ground,
called a cyclone cellar, where the family could go in case one of those great whirlwinds arose,
mighty enough to crush any building in its path. When Dorothy stood in the doorway and looked
around, she could see nothing but the great gray prairie on every side. Not a tree nor a house broke
the broad sweep of flat country that reached to the edge of the sky in all directions. The sun had
baked the plowed land into a gray mass, with little cracks running through it. Even the grass was
not green, for the sun had burned the tops of the long blades until they were the same gray color
to be seen everywhere.
"""


@dataclass(frozen=True)
class Chapter:
    speaker: str
    book: str
    file: str
    title: str
    author: str
    text: str
    voice: str  # espeak-ng voice (+variant)
    speed: int  # words per minute
    pitch: int


CHAPTERS = [
    Chapter("1001", "alice_in_wonderland_librivox_64kb_mp3", "01_carroll_alice_64kb",
            "Alice's Adventures in Wonderland", "Lewis Carroll", ALICE_1, "en-gb+f3", 170, 55),
    Chapter("1001", "alice_in_wonderland_librivox_64kb_mp3", "02_carroll_alice_64kb",
            "Alice's Adventures in Wonderland", "Lewis Carroll", ALICE_2, "en-gb+f3", 170, 55),
    Chapter("2002", "wonderful_wizard_oz_librivox_64kb_mp3", "01_baum_wizard_oz_64kb",
            "The Wonderful Wizard of Oz", "L. Frank Baum", OZ_1, "en-us+m3", 175, 40),
]


def synthesize(chapter: Chapter) -> np.ndarray:
    """espeak-ng speech as float32 mono at 16 kHz."""
    text = " ".join(chapter.text.split())
    wav = subprocess.run(["espeak-ng", "-v", chapter.voice, "-s", str(chapter.speed), "-p", str(chapter.pitch),
                          "-g", "4", "--stdout", text], check=True, capture_output=True).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    audio = soxr.resample(audio.mean(axis=1), rate, SAMPLE_RATE)
    return (0.9 * audio / max(1e-6, float(np.abs(audio).max()))).astype(np.float32)


def voice_activity(audio: np.ndarray, frame_s: float = 0.02, min_gap_s: float = 0.3) -> list[list[float]]:
    """Speech segments [[start, end], ...] in seconds from a simple energy threshold."""
    hop = int(frame_s * SAMPLE_RATE)
    n = len(audio) // hop
    energy = np.sqrt(np.mean(audio[: n * hop].reshape(n, hop) ** 2, axis=1))
    active = energy > 0.02 * energy.max()
    segments: list[list[float]] = []
    for i in np.flatnonzero(active):
        start, end = i * frame_s, (i + 1) * frame_s
        if segments and start - segments[-1][1] < min_gap_s:
            segments[-1][1] = end
        else:
            segments.append([start, end])
    return [[round(s, 2), round(e, 2)] for s, e in segments]


def snr_db(audio: np.ndarray, segments: list[list[float]]) -> float:
    """Speech power over the power outside speech (floored at 16-bit quantisation noise)."""
    mask = np.zeros(len(audio), dtype=bool)
    for s, e in segments:
        mask[int(s * SAMPLE_RATE): int(e * SAMPLE_RATE)] = True
    quantisation = (1 / 32768) ** 2 / 12
    noise = max(float(np.mean(audio[~mask] ** 2)) if (~mask).any() else 0.0, quantisation)
    return round(10 * np.log10(float(np.mean(audio[mask] ** 2)) / noise), 2)


def metadata(chapter: Chapter, audio: np.ndarray) -> dict:
    segments = voice_activity(audio)
    return {"speaker": chapter.speaker,
            "book_meta": {"title": chapter.title, "authors": [{"name": chapter.author}],
                          "language": "English", "url_text_source": "public domain",
                          "synthetic": f"espeak-ng voice {chapter.voice}, {chapter.speed} wpm"},
            "snr": snr_db(audio, segments), "voice_activity": segments}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng not found on PATH: install it (apt install espeak-ng) and run again")
    if args.out.exists():
        shutil.rmtree(args.out)
    total = 0
    for chapter in CHAPTERS:
        audio = synthesize(chapter)
        folder = args.out / chapter.speaker / chapter.book
        folder.mkdir(parents=True, exist_ok=True)
        flac = folder / f"{chapter.file}.flac"
        sf.write(flac, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
        sidecar = folder / f"{chapter.file}.json"
        sidecar.write_text(json.dumps(metadata(chapter, audio)) + "\n")
        total += flac.stat().st_size + sidecar.stat().st_size
        logger.info("%s: %.1f s, %d KB", flac.relative_to(args.out), len(audio) / SAMPLE_RATE, flac.stat().st_size // 1024)
    if total > MAX_TOTAL_BYTES:
        raise SystemExit(f"sample is {total / 1e6:.2f} MB, over the {MAX_TOTAL_BYTES / 1e6:.0f} MB budget: "
                         "shorten the texts")
    logger.info("wrote %s (%.2f MB)", args.out, total / 1e6)


if __name__ == "__main__":
    main()
