"""Facts of Mimi and Moshi's audio that ttt-bench relies on, defined once (imports nothing from
the package, so every module can use them).

Mimi turns 24 kHz audio into 8 codebooks at 12.5 frames per second: one frame is 1920 samples.
``audio/codec.py`` refuses a Mimi that does not agree.
"""

FRAME_RATE = 12.5  # Mimi frames per second
SAMPLE_RATE = 24000  # Hz
FRAME_SIZE = 1920  # samples per frame: SAMPLE_RATE / FRAME_RATE
N_CODEBOOKS = 8  # audio codebooks: 0 semantic, 1-7 acoustic
