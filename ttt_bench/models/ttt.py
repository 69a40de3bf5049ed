"""The ttt adapter: Moshi with TTT layers in its main transformer, scored like ``frozen``.

Two architectures (``arch``): ``ttt_bench``, this project's gated TTT branch after each chosen
layer (``layers/ttt_layers.py``), and ``moshi_finetune_ttt``, the TTT layer of the moshi-finetune TTT
fork as that fork trains it (``layers/ttt_fork.py``), causal or, with ``causal=false``, with the
fork's look-ahead inside each mini-batch.

The TTT branches are moshi ``StreamingModule``s inside the transformer layers, so the frozen
scorer's chunked streaming pass carries their fast weights from chunk to chunk and resets them
per document: the TTT update happens in the same pass that produces the loss.

A TTT checkpoint is a directory with ``ttt_config.json`` (the options below and the base model)
and ``ttt.safetensors`` (the parameters under ``transformer.layers.<i>.ttt_branch.``).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch
from moshi.models.lm import LMModel
from safetensors.torch import save_file

from ttt_bench.registry import register_model
from ttt_bench.models.base import ScorerInfo, StreamLayout
from ttt_bench.models.loading.checkpoints import (TRAINING_CONFIG_NAME, CheckpointError, LoadArgs, key_mismatch, load_safetensors, read_json,
                          safetensors_shapes)
from ttt_bench.models.loading import ttt_fork_checkpoint as fork
from ttt_bench.models.frozen import FrozenScorer
from ttt_bench.models.loading.moshi import LOAD_ARG_NAMES, ModelSource
from ttt_bench.options import ModelArgs
from ttt_bench.models.layers.ttt_fork import ForkTTTBlock, ForkTTTConfig, insert_fork_ttt_block
from ttt_bench.models.layers.ttt_layers import INNER_KINDS, TTTBranch, insert_ttt_branch, reset_streaming_children_cache

logger = logging.getLogger(__name__)

CONFIG_NAME = "ttt_config.json"
WEIGHTS_NAME = "ttt.safetensors"
CHECKPOINT_FORMAT = "ttt-bench/ttt-checkpoint/v1"
BRANCH_KEY = ".ttt_branch."
FORK_BLOCK_KEY = ".seq_modeling_block."
ARCHS = ("ttt_bench", "moshi_finetune_ttt")
FORK_ARCH = "moshi_finetune_ttt"
FORK_ONLY = {"causal": True, "mlp_layers": 2, "mlp_hidden_dims": None, "mlp_expansion_factor": 4.0,
             "use_rope": False, "rope_theta": 10000.0}  # options of the fork's layer, and their defaults


@dataclass
class TTTOptions:
    """Where and how TTT goes into Moshi.

    layers: indices into the main transformer ([1, 3], 3, "1;3", "1 3", negative from the end),
    or "last N", or "all". num_heads None: the transformer's own number of heads.
    arch: "ttt_bench" (inner "linear" or "mlp") or "moshi_finetune_ttt" (the fork's TTT-MLP of
    ``mlp_layers`` layers, optional RoPE, and ``causal``: false reproduces its look-ahead).
    """

    layers: Any = "last 2"
    inner: str | None = None  # "linear" for ttt_bench, "mlp" (the only one) for the fork
    mini_batch_size: int = 16
    base_lr: float = 1.0
    num_heads: int | None = None
    gate_init: float = 0.1
    arch: str = "ttt_bench"
    causal: bool = True
    mlp_layers: int = 2
    mlp_hidden_dims: Any = None
    mlp_expansion_factor: float = 4.0
    use_rope: bool = False
    rope_theta: float = 10000.0

    def __post_init__(self):
        if self.arch not in ARCHS:
            raise ValueError(f"TTT arch={self.arch!r}: choose one of {', '.join(ARCHS)}")
        if self.inner is None:
            self.inner = "mlp" if self.arch == FORK_ARCH else "linear"
        if self.inner not in INNER_KINDS:
            raise ValueError(f"TTT inner={self.inner!r}: choose one of {', '.join(INNER_KINDS)}")
        self.mini_batch_size, self.mlp_layers = int(self.mini_batch_size), int(self.mlp_layers)
        self.base_lr, self.gate_init = float(self.base_lr), float(self.gate_init)
        self.mlp_expansion_factor, self.rope_theta = float(self.mlp_expansion_factor), float(self.rope_theta)
        self.causal, self.use_rope = as_bool(self.causal, "causal"), as_bool(self.use_rope, "use_rope")
        self.mlp_hidden_dims = parse_dims(self.mlp_hidden_dims)
        self.num_heads = None if self.num_heads in (None, "", "None") else int(self.num_heads)
        if self.mini_batch_size < 1:
            raise ValueError(f"TTT mini_batch_size must be >= 1, got {self.mini_batch_size}")
        if self.arch == FORK_ARCH and self.inner != "mlp":
            raise ValueError(f"TTT inner={self.inner!r}: arch={FORK_ARCH} has only the fork's TTT-MLP "
                             "(inner=mlp; its depth is mlp_layers)")
        if self.arch != FORK_ARCH:
            odd = [k for k, default in FORK_ONLY.items() if getattr(self, k) != default]
            if odd:
                raise ValueError(f"TTT option(s) {odd} exist only for arch={FORK_ARCH} (arch={self.arch} "
                                 "is causal, with a 1- or 2-layer inner model and no RoPE)")

    def resolve(self, lm: LMModel) -> "TTTOptions":
        """These options with ``layers`` as a sorted list of indices and ``num_heads`` set."""
        heads = self.num_heads or lm.transformer.layers[0].self_attn.num_heads
        return replace(self, layers=parse_layers(self.layers, len(lm.transformer.layers)), num_heads=heads)

    def fork_config(self, dim: int) -> ForkTTTConfig:
        return ForkTTTConfig(dim, self.num_heads, self.mini_batch_size, self.base_lr, self.mlp_layers,
                             self.mlp_hidden_dims, self.mlp_expansion_factor, self.use_rope,
                             self.rope_theta, self.causal)

    @property
    def lookahead(self) -> bool:
        """Whether a frame's loss depends on later frames (the fork's training forward)."""
        return self.arch == FORK_ARCH and not self.causal

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> "TTTOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown TTT option(s) {unknown}; known: {sorted(known)}")
        return cls(**data)


def as_bool(value: Any, name: str) -> bool:
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    if isinstance(value, (bool, int)) and value in (0, 1):
        return bool(value)
    raise ValueError(f"TTT {name}={value!r}: give true or false")


def parse_dims(dims: Any) -> tuple[int, ...] | None:
    """None, a list of sizes, or a string of them ("512;512")."""
    if dims in (None, "", "None"):
        return None
    if isinstance(dims, str):
        dims = [part for part in re.split(r"[\s;+:]+", dims.strip()) if part]
    return tuple(int(d) for d in dims)


def parse_layers(layers: Any, num_layers: int) -> list[int]:
    """Layer spec -> sorted distinct indices in [0, num_layers)."""
    if isinstance(layers, str):
        spec = layers.strip().lower()
        if spec == "all":
            return list(range(num_layers))
        last = re.fullmatch(r"last\s*[_-]?\s*(\d+)", spec)
        if last:
            n = int(last.group(1))
            if not 1 <= n <= num_layers:
                raise ValueError(f"TTT layers={layers!r}: the transformer has {num_layers} layers")
            return list(range(num_layers - n, num_layers))
        try:
            layers = [int(part) for part in re.split(r"[\s;+:]+", spec) if part]
        except ValueError:
            raise ValueError(f"TTT layers={layers!r}: give indices ('1;3'), 'last N' or 'all'") from None
    if isinstance(layers, int):
        layers = [layers]
    indices = []
    for index in layers:
        if not -num_layers <= int(index) < num_layers:
            raise ValueError(f"TTT layer index {index} out of range for a transformer of {num_layers} layers")
        indices.append(int(index) % num_layers)
    if not indices or len(set(indices)) != len(indices):
        raise ValueError(f"TTT layers={layers!r}: need distinct indices, at least one")
    return sorted(indices)


def insert_ttt_layers(lm: LMModel, options: TTTOptions, seed: int = 0) -> TTTOptions:
    """Add a gated TTT branch to the chosen layers of ``lm.transformer`` (random init from
    ``seed``, on ``lm``'s device and dtype). Returns the resolved options."""
    options = options.resolve(lm)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for index in options.layers:
            if options.arch == FORK_ARCH:
                block = ForkTTTBlock(options.fork_config(lm.dim), options.gate_init, device=lm.device,
                                     dtype=lm.dtype)
                insert_fork_ttt_block(lm.transformer.layers[index], block)
                continue
            branch = TTTBranch(lm.dim, options.inner, options.num_heads, options.mini_batch_size,
                               options.base_lr, options.gate_init, device=lm.device, dtype=lm.dtype)
            insert_ttt_branch(lm.transformer.layers[index], branch)
    reset_streaming_children_cache(lm)
    return options


def ttt_state_dict(lm: LMModel) -> dict[str, torch.Tensor]:
    """The TTT parameters of ``lm`` (everything under a ``ttt_branch`` or ``seq_modeling_block``)."""
    return {name: tensor for name, tensor in lm.state_dict().items()
            if BRANCH_KEY in name or FORK_BLOCK_KEY in name}


def save_ttt_checkpoint(lm: LMModel, options: TTTOptions, directory: str | Path,
                        base: dict[str, Any]) -> Path:
    """Write ``ttt_config.json`` and ``ttt.safetensors`` for the TTT layers of ``lm``.

    base: the base model the TTT layers were trained on, in loading arguments, e.g.
    {"hf_repo": "kyutai/..."}, {"checkpoint": "run/checkpoints/checkpoint_000500"} or
    {"preset": "tiny", "seed": 0}.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {name: t.detach().to("cpu").contiguous() for name, t in ttt_state_dict(lm).items()}
    if not tensors:
        raise ValueError("this model has no TTT layers to save")
    save_file(tensors, str(directory / WEIGHTS_NAME))
    config = {"format": CHECKPOINT_FORMAT, **asdict(options.resolve(lm)), "base": base,
              "base_dim": lm.dim, "base_num_layers": len(lm.transformer.layers)}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def read_ttt_config(directory: str | Path) -> tuple[TTTOptions, dict[str, Any]]:
    """(options, base) from a checkpoint directory."""
    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"TTT checkpoint {directory}: {CONFIG_NAME} not found (looked for {path})")
    config = read_json(path, "TTT config")
    if config.pop("format", None) != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path}: not a {CHECKPOINT_FORMAT} config; a TTT checkpoint of ttt-bench is "
                              f"written by save_ttt_checkpoint")
    base = config.pop("base", {})
    for key in ("base_dim", "base_num_layers"):
        config.pop(key, None)
    return TTTOptions.from_dict(config, str(path)), base


def load_ttt_weights(lm: LMModel, directory: str | Path) -> None:
    """Load ``ttt.safetensors`` into the TTT layers of ``lm``; any missing, unexpected or
    mis-shaped key is an error that lists them."""
    path = Path(directory) / WEIGHTS_NAME
    if not path.is_file():
        raise FileNotFoundError(f"TTT checkpoint {directory}: {WEIGHTS_NAME} not found (looked for {path})")
    expected = ttt_state_dict(lm)
    problem = key_mismatch(safetensors_shapes(path, "TTT weights"), {k: tuple(v.shape) for k, v in expected.items()})
    if problem:
        raise CheckpointError(f"TTT checkpoint {path} does not fit the model: {problem}. Check the base model "
                              f"and the TTT options in {CONFIG_NAME}")
    loaded = load_safetensors(path, "TTT weights")
    with torch.no_grad():
        for name, tensor in expected.items():
            tensor.copy_(loaded[name])


@register_model("ttt")
class TTTScorer(FrozenScorer):
    """Moshi with TTT layers. Loading arguments as ``frozen`` (a moshi-finetune ``checkpoint``
    included: its fine-tuned model is the base the TTT layers go into); the TTT options of
    ``TTTOptions``; or ``ttt_checkpoint`` (options, base model and weights from a directory)."""

    name = "ttt"
    attention_only = False  # fast weights carry the stream

    def __init__(self, lm: LMModel | None = None, device: str | torch.device | None = None,
                 dtype: str | torch.dtype | None = None, seed: int = 0, ttt_checkpoint: str | Path | None = None,
                 **kwargs: Any):
        self.ttt_checkpoint = str(ttt_checkpoint) if ttt_checkpoint is not None else None
        args = ModelArgs.split(kwargs, LOAD_ARG_NAMES)
        load_args = {k: v for k, v in args.load.items() if v is not None}
        ttt_options = args.options
        self.fork_checkpoint: dict[str, Any] | None = None
        if lm is None and ttt_checkpoint is None and load_args.get("checkpoint") and "preset" not in load_args:
            source = ModelSource.make(seed=seed, **load_args)
            if source.checkpoint.ttt_fork:
                self._load_fork_checkpoint(source, ttt_options, device, dtype)
                return
        requested = TTTOptions.from_dict(ttt_options, "ttt model_args")
        if ttt_checkpoint is not None:
            options, base = read_ttt_config(ttt_checkpoint)
            trained_on = {k: v for k, v in base.items() if k in LOAD_ARG_NAMES and v is not None}
            if lm is None and not load_args:
                load_args, seed = trained_on, int(base.get("seed", seed))
            elif lm is not None or load_args != trained_on:
                logger.warning("TTT checkpoint %s was trained on %s; scoring it on %s", ttt_checkpoint, base,
                               "lm=<user model>" if lm is not None else load_args)
        else:
            options = requested
        super().__init__(lm=lm, device=device, dtype=dtype, seed=seed, **load_args)
        if ttt_checkpoint is not None:
            _check_no_conflict(self.lm, options, ttt_options, ttt_checkpoint)
        self.ttt_options = insert_ttt_layers(self.lm, options, seed=seed)
        if ttt_checkpoint is not None:
            load_ttt_weights(self.lm, ttt_checkpoint)
        elif self.ttt_options.gate_init != 0.0:
            logger.warning("ttt: no ttt_checkpoint, so the TTT layers are untrained (random init, gate_init=%g)",
                           self.ttt_options.gate_init)
        self.lm.eval()

    def _load_fork_checkpoint(self, source: ModelSource, given: dict[str, Any], device, dtype) -> None:
        """A checkpoint of the moshi-finetune TTT fork: settings from its training_config.json,
        the base and LoRA by moshi's loaders, the TTT layers of ``arch=moshi_finetune_ttt``."""
        checkpoint = source.checkpoint
        others = sorted(set(given) - {"causal"})
        if others:
            raise ValueError(f"ttt options {others} given with the moshi-finetune TTT checkpoint "
                             f"{checkpoint.directory}: its settings come from {checkpoint.training_config_path}; "
                             "only causal= can be chosen")
        causal = as_bool(given.get("causal", True), "causal")
        lm = fork.build_base(checkpoint, device or "cpu", dtype)
        settings = fork.fork_settings(checkpoint, len(lm.transformer.layers), causal)
        FrozenScorer.__init__(self, lm=lm)
        self.source = source
        self.ttt_options = insert_ttt_layers(self.lm, TTTOptions(**settings.options))
        fork.set_attention_contexts(self.lm, settings)
        self.fork_checkpoint = {"training_config": str(checkpoint.training_config_path),
                                "ttt_layer_context": settings.ttt_layer_context,
                                "non_ttt_layer_context": settings.non_ttt_layer_context,
                                **fork.load_fork_weights(self.lm, checkpoint)}
        fork.fuse_lora(self.lm, checkpoint)
        self.lm.eval()

    def options(self) -> dict[str, Any]:
        options = {**super().options(), **asdict(self.ttt_options), "ttt_checkpoint": self.ttt_checkpoint}
        if self.fork_checkpoint is not None:
            options["fork_checkpoint"] = self.fork_checkpoint
        return options

    @property
    def lookahead(self) -> bool:
        return self.ttt_options.lookahead

    @property
    def info(self) -> ScorerInfo:
        info = super().info
        if self.ttt_options.arch == FORK_ARCH:
            causal = "true" if self.ttt_options.causal else "false"
            info.label = f"{info.label} ({FORK_ARCH}, causal={causal})"
        return info

    def check_chunk_size(self, chunk_size: int) -> None:
        """causal=false outputs a mini-batch only once all of it is read: chunks of whole ones."""
        if self.ttt_options.lookahead:
            check_whole_mini_batches(chunk_size, self.ttt_options.mini_batch_size)

    @classmethod
    def accepted_args(cls) -> set[str]:
        return super().accepted_args() | set(LOAD_ARG_NAMES) | {f.name for f in fields(TTTOptions)}

    @classmethod
    def check_args(cls, args: dict[str, Any], chunk_size: int) -> None:
        super().check_args(args, chunk_size)
        mini_batch = lookahead_mini_batch(args)
        if mini_batch is not None:
            check_whole_mini_batches(chunk_size, mini_batch)

    def score(self, codes: torch.Tensor, chunk_size: int = 64,
              layout: StreamLayout | None = None) -> torch.Tensor:
        self.check_chunk_size(chunk_size)
        return super().score(codes, chunk_size, layout)


def check_whole_mini_batches(chunk_size: int, mini_batch_size: int) -> None:
    if chunk_size % mini_batch_size:
        raise ValueError(f"ttt causal=false: chunk_size {chunk_size} is not a multiple of the TTT "
                         f"mini_batch_size {mini_batch_size} (each mini-batch is output only once all its "
                         f"frames are read); use --chunk_size {max(mini_batch_size, chunk_size // mini_batch_size * mini_batch_size)}")


def lookahead_mini_batch(args: dict[str, Any]) -> int | None:
    """The mini-batch size a look-ahead TTT model (``causal=false``) needs whole chunks of, read
    from the options or a local fork checkpoint's training_config.json; None if it is causal or
    the checkpoint is not local (then the loaded model is checked)."""
    if as_bool(args.get("causal", True), "causal"):
        return None
    if args.get("arch") == FORK_ARCH:
        return int(args.get("mini_batch_size", TTTOptions.mini_batch_size))
    if args.get("checkpoint") and not args.get("ttt_checkpoint"):
        folder = Path(str(args["checkpoint"]))
        for path in (folder / "consolidated" / TRAINING_CONFIG_NAME, folder / TRAINING_CONFIG_NAME):
            if path.is_file():
                ttt = (read_json(path, "training config") or {}).get("ttt") or {}
                return int(ttt.get("mini_batch_size", fork.FORWARD_DEFAULTS["mini_batch_size"]))
    return None


def _check_no_conflict(lm: LMModel, options: TTTOptions, given: dict[str, Any], checkpoint: str | Path) -> None:
    """Options given next to a checkpoint must agree with it."""
    stored = asdict(options.resolve(lm))
    wanted = asdict(TTTOptions(**{**asdict(options), **given}).resolve(lm))
    conflicts = {k: {"given": given[k], "checkpoint": stored[k]} for k in given if wanted[k] != stored[k]}
    if conflicts:
        raise ValueError(f"TTT options {conflicts} conflict with the checkpoint {checkpoint}; "
                         "drop them or use a matching checkpoint")
