"""README's "Your TTT layers: ttt_checkpoint=" example, run as the README prints it: the block after
its marker comment saves a TTT checkpoint of the tiny preset, and ``get_model("ttt",
ttt_checkpoint=...)`` scores exactly as the saved model did."""

import re
from pathlib import Path

import torch

from ttt_bench.models.frozen import FrozenScorer
from ttt_bench.models.ttt import CONFIG_NAME, WEIGHTS_NAME, read_ttt_config, ttt_state_dict
from ttt_bench.registry import get_model

README = Path(__file__).resolve().parents[1] / "README.md"
MARKER = "<!-- ttt_checkpoint example: tests/test_readme_ttt_checkpoint.py runs this block -->"


def readme_block() -> str:
    text = README.read_text()
    assert text.count(MARKER) == 1, f"README.md should hold the marker once: {MARKER}"
    match = re.match(r"\s*```python\n(.*?)\n```", text.split(MARKER, 1)[1], re.S)
    assert match, "the marker is not followed by a ```python block"
    return match.group(1)


def fake_training(lm) -> None:
    """Stands in for the README's ``train(lm)``: moves every TTT parameter, and only those."""
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, tensor in ttt_state_dict(lm).items():
            tensor.add_(torch.randn(tensor.shape, generator=generator) * 0.05)


def test_the_readme_example_saves_a_checkpoint_that_scores_as_the_saved_model(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the example writes my_ttt/ where it runs
    namespace = {"train": fake_training}
    exec(compile(readme_block(), f"{README}:ttt_checkpoint example", "exec"), namespace)

    folder = tmp_path / "my_ttt"
    assert sorted(p.name for p in folder.iterdir()) == sorted([CONFIG_NAME, WEIGHTS_NAME])
    options, base = read_ttt_config(folder)
    assert base == namespace["base"] and options.layers == namespace["options"].layers

    codes = torch.randint(0, 256, (2, 8, 40), generator=torch.Generator().manual_seed(3))
    saved = FrozenScorer(lm=namespace["lm"]).score(codes, chunk_size=8)  # the model as trained and saved
    loaded = get_model("ttt", ttt_checkpoint=str(folder)).score(codes, chunk_size=8)
    scored = ~saved.isnan()
    assert scored.any() and torch.equal(scored, ~loaded.isnan())
    assert (saved[scored] - loaded[scored]).abs().max() <= 1e-6

    untrained = get_model("ttt", **base, layers="last 2", inner="mlp", mini_batch_size=16).score(codes, chunk_size=8)
    assert (untrained[scored] - saved[scored]).abs().max() > 1e-3  # the training moved the NLL: it was loaded
