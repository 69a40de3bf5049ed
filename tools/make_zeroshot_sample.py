#!/usr/bin/env python
"""Build ttt_bench/data/zeroshot_sample: offline pairs for the pair-likelihood task, in the layout
of the Hub's speed/* datasets (``data/train-00000-of-00001.parquet`` with the datasets ``Audio``
feature; columns id, positive, negative, type, positive_transcription, negative_transcription).

Thirty pairs of real speech made by espeak-ng, the negative made from the positive:

* ``lexical`` (like sWUGGY): a word against a non-word made by exchanging two of its consonants
  (espeak-ng reads the non-word by its letter-to-sound rules);
* ``syntax`` (like sBLIMP): a sentence against the same words with two neighbours swapped;
* ``story`` (like tStoryCloze): a two-sentence story with its ending against the ending of
  another story.

Synthetic speech: for demos and smoke tests, not for measurements.

    python tools/make_zeroshot_sample.py [--out DIR]

Needs espeak-ng on PATH (apt install espeak-ng); datasets, pyarrow, soundfile and soxr come with
ttt-bench.
"""

from __future__ import annotations

import argparse
import io
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

logger = logging.getLogger("make_zeroshot_sample")

OUT = Path(__file__).resolve().parent.parent / "ttt_bench" / "data" / "zeroshot_sample"
SAMPLE_RATE = 16000
MAX_TOTAL_BYTES = 3_000_000
VOICES = ["en-us+m3", "en-gb+f3"]
VOWELS = set("aeiouy")

WORDS = ["garden", "window", "basket", "pencil", "market", "rabbit", "silver", "doctor", "candle", "monkey"]

SENTENCES = [
    "the old man walked to the river",
    "she gave the book to her brother",
    "a small dog slept under the table",
    "the children are playing in the park",
    "we will visit our friends tomorrow",
    "the train left the station at noon",
    "he has never seen such a big ship",
    "my sister bought a new red coat",
    "the birds were singing in the morning",
    "they painted the fence last summer",
]

STORIES = [
    ("Tom was hungry after school.", "He made himself a sandwich."),
    ("It started to rain on the way home.", "Anna opened her umbrella."),
    ("The phone rang in the middle of the night.", "Sam got up to answer it."),
    ("Lucy planted seeds in the spring.", "By summer the flowers had bloomed."),
    ("The car would not start this morning.", "Dad called a mechanic."),
    ("Ben lost his keys at the beach.", "He searched the sand for an hour."),
    ("The baby was crying loudly.", "Her mother rocked her to sleep."),
    ("Kate studied hard for the test.", "She got the best grade in her class."),
    ("The cake was in the oven too long.", "It came out burnt and black."),
    ("Our team was behind at half time.", "We scored twice and won the game."),
]


def nonword(word: str) -> str:
    """The word with its first consonant and its last different one exchanged (garden -> nardeg)."""
    consonants = [i for i, c in enumerate(word) if c not in VOWELS]
    i = consonants[0]
    j = next(k for k in reversed(consonants) if word[k] != word[i])
    letters = list(word)
    letters[i], letters[j] = letters[j], letters[i]
    return "".join(letters)


def swap_neighbours(sentence: str, index: int) -> str:
    words = sentence.split()
    k = 1 + index % (len(words) - 2)
    words[k], words[k + 1] = words[k + 1], words[k]
    return " ".join(words)


def pairs() -> list[dict]:
    rows = []
    for i, word in enumerate(WORDS):
        rows.append({"type": "lexical", "positive": word, "negative": nonword(word)})
    for i, sentence in enumerate(SENTENCES):
        rows.append({"type": "syntax", "positive": sentence, "negative": swap_neighbours(sentence, i)})
    for i, (start, end) in enumerate(STORIES):
        other = STORIES[(i + 3) % len(STORIES)][1]
        rows.append({"type": "story", "positive": f"{start} {end}", "negative": f"{start} {other}"})
    return rows


def synthesize(text: str, voice: str) -> bytes:
    """espeak-ng speech as 16 kHz mono FLAC bytes."""
    wav = subprocess.run(["espeak-ng", "-v", voice, "-s", "160", "--stdout", text], check=True,
                         capture_output=True).stdout
    audio, rate = sf.read(io.BytesIO(wav), dtype="float32", always_2d=True)
    audio = soxr.resample(audio.mean(axis=1), rate, SAMPLE_RATE)
    buffer = io.BytesIO()
    sf.write(buffer, audio, SAMPLE_RATE, format="FLAC", subtype="PCM_16")
    return buffer.getvalue()


def write_parquet(rows: list[dict], path: Path) -> None:
    import datasets
    import pyarrow as pa

    features = datasets.Features({
        "id": datasets.Value("int64"), "positive": datasets.Audio(sampling_rate=SAMPLE_RATE),
        "negative": datasets.Audio(sampling_rate=SAMPLE_RATE), "type": datasets.Value("string"),
        "positive_transcription": datasets.Value("string"), "negative_transcription": datasets.Value("string")})
    columns = {name: [row[name] for row in rows] for name in features}
    table = pa.Table.from_pydict(columns, schema=features.arrow_schema)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the Audio feature goes into the file's schema metadata, as push_to_hub writes it
    datasets.Dataset(table, info=datasets.DatasetInfo(features=features)).to_parquet(str(path))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if shutil.which("espeak-ng") is None:
        raise SystemExit("espeak-ng not found on PATH: install it (apt install espeak-ng) and run again")
    rows = []
    for i, pair in enumerate(pairs()):
        voice = VOICES[i % len(VOICES)]
        rows.append({"id": i, "type": pair["type"],
                     "positive": {"bytes": synthesize(pair["positive"], voice), "path": f"{i:03d}_positive.flac"},
                     "negative": {"bytes": synthesize(pair["negative"], voice), "path": f"{i:03d}_negative.flac"},
                     "positive_transcription": pair["positive"], "negative_transcription": pair["negative"]})
        logger.info("%02d %-8s %s | %s", i, pair["type"], pair["positive"], pair["negative"])
    if args.out.exists():
        shutil.rmtree(args.out)
    parquet = args.out / "data" / "train-00000-of-00001.parquet"
    write_parquet(rows, parquet)
    size = parquet.stat().st_size
    if size > MAX_TOTAL_BYTES:
        raise SystemExit(f"{parquet}: {size} bytes, more than the {MAX_TOTAL_BYTES} a repository sample may take")
    logger.info("wrote %d pairs to %s (%.0f kB)", len(rows), parquet, size / 1000)


if __name__ == "__main__":
    main()
