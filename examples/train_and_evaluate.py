"""Evaluate while training: a tiny Moshi takes a few optimiser steps, and every N steps
ttt-bench evaluates the model in memory on the bundled LibriLight sample and logs the results
beside the training loss, to Weights & Biases and/or TensorBoard.

    python examples/train_and_evaluate.py --steps 6 --eval_every 3 --tensorboard_dir runs/tb
    WANDB_MODE=offline python examples/train_and_evaluate.py --wandb_project my-ttt

The evaluation leaves the model, its train/eval mode, its requires_grad flags and the random
number generators as they were, so the training run is the one it would have been without it.
In a moshi-finetune training script, the same call goes where that script evaluates (see the
README, "Evaluate during training").
"""

from __future__ import annotations

import argparse
import logging
from typing import Sequence

import torch
import torch.nn.functional as F

from ttt_bench import simple_evaluate
from ttt_bench.models.loading.moshi import ModelSource, load_lm


def training_loss(lm, codes: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of Moshi's audio logits on teacher-forced ``codes`` [B, 17, T] (text + audio)."""
    out = lm(codes)
    targets = codes[:, lm.audio_offset:lm.audio_offset + lm.dep_q]
    return F.cross_entropy(out.logits[out.mask], targets[out.mask])


def random_batch(lm, batch: int, frames: int, generator: torch.Generator) -> torch.Tensor:
    """Stand-in training data (your data loader goes here): random text and audio tokens."""
    codes = torch.randint(0, lm.card, (batch, lm.num_codebooks, frames), generator=generator)
    codes[:, 0] = torch.randint(0, lm.text_card, (batch, frames), generator=generator)
    return codes


def main(argv: Sequence[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--eval_every", type=int, default=3)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--tasks", default="librilight_sample")
    p.add_argument("--limit", type=int, default=1, help="documents per evaluation")
    p.add_argument("--max_frames", type=int, default=100, help="frames per document (the sample has ~1000)")
    p.add_argument("--wandb_project", default=None, help="log to this W&B project (WANDB_MODE=offline works)")
    p.add_argument("--wandb_dir", default=None)
    p.add_argument("--tensorboard_dir", default=None, help="log to TensorBoard event files here")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    torch.manual_seed(0)
    lm = load_lm(ModelSource.make(preset="tiny"))  # your model, e.g. moshi-finetune's
    lm.train()
    optimizer = torch.optim.AdamW(lm.parameters(), lr=args.lr)
    data = torch.Generator().manual_seed(0)

    run = writer = None
    if args.wandb_project:
        import wandb

        run = wandb.init(project=args.wandb_project, dir=args.wandb_dir, config=vars(args))
    if args.tensorboard_dir:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(args.tensorboard_dir)

    evaluations = []
    for step in range(1, args.steps + 1):
        loss = training_loss(lm, random_batch(lm, 2, 32, data))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if run is not None:
            run.log({"train/loss": loss.item()}, step=step)
        if writer is not None:
            writer.add_scalar("train/loss", loss.item(), step)
        if step % args.eval_every == 0:
            first = step == args.eval_every  # the built-in checks of the scoring: once is enough
            results = simple_evaluate(
                model={"tiny": lm}, model_args="preset=tiny",  # preset=tiny: the tiny Mimi encodes the audio
                tasks=args.tasks, limit=args.limit,
                task_args={"max_frames": args.max_frames, "verify_loss_computation": first,
                           "verify_causality": first},
                wandb_run=run, tensorboard_writer=writer, step=step)
            nll = {task: models["tiny"]["mean_nll"] for task, models in results["results"].items()}
            print(f"step {step}: train loss {loss.item():.4f}, eval mean NLL {nll}")
            evaluations.append({"step": step, "results": results})

    if writer is not None:
        writer.close()
    if run is not None:
        run.finish()
    return evaluations


if __name__ == "__main__":
    main()
