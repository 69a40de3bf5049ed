"""Which files a Moshi model is built from, found and checked before anything is built.

The arguments are ``python -m moshi.server``'s: ``hf_repo`` (a Hub repo id or a local folder laid
out like one, with or without ``config.json``), ``moshi_weight``, ``mimi_weight``,
``lora_weight``, ``config_path`` (each a local path or ``hf://org/repo/file``) and
``fuse_lora``; plus ``checkpoint``, a kyutai moshi-finetune checkpoint folder
(``checkpoint_NNNNNN/`` or its ``consolidated/``) holding ``config.json`` and either
``lora.safetensors`` (adapters applied on the base ``hf_repo``) or ``consolidated.safetensors``
(every LM weight, in place of the base's). Mimi always comes from the base.

:func:`resolve_checkpoint` turns them into a :class:`ResolvedCheckpoint`: the resolved files,
the kind (base, lora, full), the configs, and whether the weights are the moshi-finetune TTT
fork's. Every problem found here (a missing or truncated file, a pickle, a config that is not
JSON or does not build, weights whose keys or shapes do not fit) is a :class:`CheckpointError`
naming the file and what to do; moshi's own loaders then build the model
(:meth:`ResolvedCheckpoint.checkpoint_info`), LoRA included.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import requests
import torch
from moshi.models import loaders

from ttt_bench.constants import N_CODEBOOKS

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
LORA_NAME = "lora.safetensors"
FULL_NAME = "consolidated.safetensors"
TRAINING_CONFIG_NAME = "training_config.json"
TTT_FORK_KEY_PARTS = (".seq_modeling_block.", ".original_layer.")  # the TTT fork's wrapped layers
NO_TOKENIZER = Path(os.devnull)  # ttt-bench never reads text
SHOWN_KEYS = 5  # how many keys an error lists
# what a request that got no answer raises (huggingface_hub's OfflineModeIsEnabled is a ConnectionError)
NO_ANSWER = (requests.ConnectionError, requests.Timeout, ConnectionError, TimeoutError)


class CheckpointError(ValueError):
    """A checkpoint that cannot be loaded as given; the message names the file and what to do."""


@dataclass(frozen=True)
class LoadArgs:
    """How a user names a Moshi model (moshi.server's names, plus moshi-finetune's ``checkpoint``)."""

    hf_repo: str | None = None
    moshi_weight: str | None = None
    mimi_weight: str | None = None
    lora_weight: str | None = None
    config_path: str | None = None
    fuse_lora: bool = True
    checkpoint: str | None = None

    def __post_init__(self):
        if isinstance(self.fuse_lora, str) and self.fuse_lora.lower() in ("true", "false"):
            object.__setattr__(self, "fuse_lora", self.fuse_lora.lower() == "true")
        if not isinstance(self.fuse_lora, bool):
            raise ValueError(f"fuse_lora must be true or false, got {self.fuse_lora!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def given(self) -> dict[str, Any]:
        """The arguments that differ from their defaults."""
        return {f.name: getattr(self, f.name) for f in fields(self) if getattr(self, f.name) != f.default}


@dataclass
class ResolvedCheckpoint:
    """A Moshi model's files, found and checked; what moshi's loaders build it from.

    kind: "base" (the repo's own weights), "lora" (adapters on the base) or "full" (all LM
    weights replaced). lm_config None means moshi's Moshi 7B defaults (a repo without config.json).
    ttt_fork: why these weights are the moshi-finetune TTT fork's (None when they are not).
    """

    kind: str
    hf_repo: str
    moshi_weights: Path
    mimi_weights: Path
    lora_weights: Path | None = None
    config_path: Path | None = None
    mimi_config_path: Path | None = None
    lm_config: dict[str, Any] | None = None
    raw_config: dict[str, Any] | None = None
    mimi_config: dict[str, Any] | None = None
    model_type: str = "moshi"
    fuse_lora: bool = True
    directory: Path | None = None  # the moshi-finetune checkpoint folder (consolidated/)
    training_config: dict[str, Any] | None = None
    training_config_path: Path | None = None
    training_args_path: Path | None = None  # where the base the run was trained on was read
    ttt_fork: str | None = None
    args: LoadArgs = field(default_factory=LoadArgs)

    def files(self) -> dict[str, Path]:
        """Every file the model is built from, by role."""
        roles = {"moshi_weights": self.moshi_weights, "mimi_weights": self.mimi_weights,
                 "lora_weights": self.lora_weights, "config": self.config_path,
                 "mimi_config": self.mimi_config_path, "training_config": self.training_config_path,
                 "training_args": self.training_args_path}
        return {role: path for role, path in roles.items() if path is not None}

    def files_with_sha256(self) -> dict[str, dict[str, str]]:
        """{role: {"path", "sha256"}} (hashes cached per path, size and mtime)."""
        return {role: {"path": str(path), "sha256": file_sha256(path)} for role, path in self.files().items()}

    @property
    def short_name(self) -> str:
        """What a leaderboard row shows: the checkpoint folder, the repo or the weights file."""
        if self.directory is not None:
            folder = self.directory.parent if self.directory.name == "consolidated" else self.directory
            name = f"{folder.parent.parent.name}/{folder.name}" if folder.parent.name == "checkpoints" else folder.name
            return f"{name} {self.kind}"
        if self.args.moshi_weight:
            return Path(str(self.args.moshi_weight)).name
        name = self.hf_repo if "/" in self.hf_repo and not Path(self.hf_repo).is_dir() else Path(self.hf_repo).name
        return f"{name} +lora" if self.lora_weights else name

    @property
    def is_default(self) -> bool:
        """The default model (moshiko from the Hub, nothing else given)."""
        return self.args.given() in ({}, {"hf_repo": loaders.DEFAULT_REPO})

    def codec_identity(self) -> str:
        """Equal for two checkpoints exactly when their Mimi codecs are the same."""
        return json.dumps({"mimi": file_sha256(self.mimi_weights), "config": self.mimi_config,
                           "num_codebooks": self._num_codebooks()}, sort_keys=True)

    def _num_codebooks(self) -> int:
        if self.lm_config is None:
            return N_CODEBOOKS
        return max(self.lm_config["dep_q"], self.lm_config["n_q"] - self.lm_config["dep_q"])

    def checkpoint_info(self) -> loaders.CheckpointInfo:
        """moshi's description of this model (what ``get_moshi`` / ``get_mimi`` build)."""
        return loaders.CheckpointInfo(
            moshi_weights=self.moshi_weights, mimi_weights=self.mimi_weights, tokenizer=NO_TOKENIZER,
            lm_config=self.lm_config, raw_config=self.raw_config, mimi_config=self.mimi_config,
            model_type=self.model_type, lora_weights=self.lora_weights)

    def moshi_kwargs(self) -> dict[str, Any]:
        """Extra arguments of ``CheckpointInfo.get_moshi`` for this kind."""
        if self.lora_weights is None:  # e.g. the merged weights of a LoRA run: never add fresh adapters
            return {"lm_kwargs_overrides": {"lora": False}}
        return {"fuse_lora": self.fuse_lora}

    def describe(self) -> dict[str, Any]:
        """What results.json records about where the model came from."""
        out: dict[str, Any] = {"kind": self.kind, "hf_repo": self.hf_repo, **self.args.given()}
        if self.lora_weights is not None:
            out["fuse_lora"] = self.fuse_lora
        if self.ttt_fork:
            out["ttt_fork"] = self.ttt_fork
        out["files"] = self.files_with_sha256()
        return out


# ----------------------------------------------------------------------------- resolving


def resolve_checkpoint(args: LoadArgs) -> ResolvedCheckpoint:
    """Find and check every file of the model ``args`` names (see the module docstring)."""
    directory = _consolidated_dir(args.checkpoint) if args.checkpoint else None
    trained_on, training_args_path = _trained_base(directory) if directory is not None else ({}, None)
    args, trained_files = _with_trained_base(args, trained_on, training_args_path)
    hf_repo = args.hf_repo or loaders.DEFAULT_REPO
    hub = _Hub()  # the Hub is probed at most once per model
    base = _Base(hf_repo, hub)
    config_path = (_user_file(args.config_path, "config_path", hub) if args.config_path
                   else directory / CONFIG_NAME if directory is not None
                   else base.config())
    if directory is not None and not config_path.is_file():
        raise FileNotFoundError(f"moshi-finetune checkpoint {directory}: {CONFIG_NAME} not found; "
                                "give the checkpoint_NNNNNN folder or its consolidated/ folder")
    raw_config = read_json(config_path, "config") if config_path is not None else None
    lm_config = dict(raw_config) if raw_config is not None else None
    names = _pop_file_names(lm_config)

    kind, lora_weights, full_weights = "base", None, None
    if directory is not None:
        kind, found = _finetune_weights(directory)
        lora_weights, full_weights = (found, None) if kind == "lora" else (None, found)
    if args.lora_weight:
        lora_weights, kind = _user_file(args.lora_weight, "lora_weight", hub), "lora"
    elif names["lora_name"] and kind == "base":
        lora_weights, kind = base.file(names["lora_name"], "lora_name"), "lora"

    moshi_weights = (_user_file(args.moshi_weight, "moshi_weight", hub) if args.moshi_weight
                     else full_weights or trained_files.get("moshi_weights")
                     or base.file(names["moshi_name"], "moshi_name"))
    mimi_weights = (_user_file(args.mimi_weight, "mimi_weight", hub) if args.mimi_weight
                    else trained_files.get("mimi_weights") or base.file(names["mimi_name"], "mimi_name"))
    mimi_config_path = base.file(names["mimi_config_name"], "mimi_config_name") if names["mimi_config_name"] else None
    training_config_path = directory / TRAINING_CONFIG_NAME if directory is not None else None
    if training_config_path is not None and not training_config_path.is_file():
        training_config_path = None

    resolved = ResolvedCheckpoint(
        kind=kind, hf_repo=hf_repo, moshi_weights=moshi_weights, mimi_weights=mimi_weights,
        lora_weights=lora_weights, config_path=config_path, mimi_config_path=mimi_config_path,
        lm_config=lm_config, raw_config=raw_config,
        mimi_config=read_json(mimi_config_path, "mimi config") if mimi_config_path else None,
        model_type=names["model_type"], fuse_lora=bool(args.fuse_lora), directory=directory,
        training_config=read_json(training_config_path, "training config") if training_config_path else None,
        training_config_path=training_config_path, training_args_path=training_args_path, args=args)
    for role, path in resolved.files().items():
        if role.endswith("weights"):
            require_safetensors(path, role)
    resolved.ttt_fork = _ttt_fork_evidence(resolved)
    if resolved.ttt_fork is None:
        check_fits(resolved)
    return resolved


def _trained_base(directory: Path) -> tuple[dict[str, Any], Path | None]:
    """The base a moshi-finetune run was trained on (``moshi_paths``: hf_repo_id, moshi_path,
    mimi_path), from the fork's ``training_config.json`` beside the weights or the run's
    ``args.yaml`` (``run_dir/checkpoints/checkpoint_NNNNNN/consolidated/``)."""
    import yaml

    folder = directory.parent if directory.name == "consolidated" else directory
    candidates = [directory / TRAINING_CONFIG_NAME]
    if folder.parent.name == "checkpoints":
        candidates.append(folder.parent.parent / "args.yaml")
    for path in candidates:
        if not path.is_file():
            continue
        try:
            data = json.loads(path.read_text()) if path.suffix == ".json" else yaml.safe_load(path.read_text())
        except (ValueError, yaml.YAMLError) as exc:
            raise CheckpointError(f"training arguments {path} cannot be read ({exc}); fix the file, or "
                                  "move it away and name the base with hf_repo=") from None
        paths = data.get("moshi_paths") if isinstance(data, dict) else None
        if isinstance(paths, dict):
            return {k: paths.get(k) for k in ("hf_repo_id", "moshi_path", "mimi_path")}, path
    return {}, None


def _with_trained_base(args: LoadArgs, trained_on: dict[str, Any], where: Path | None
                       ) -> tuple[LoadArgs, dict[str, Path]]:
    """Fill in the base the run was trained on where the user named none: ``hf_repo``, and the
    base's own weight files when the run named them (role -> path)."""
    if not trained_on:
        return args, {}
    if args.hf_repo or args.moshi_weight or args.mimi_weight:
        if args.hf_repo and trained_on.get("hf_repo_id") and args.hf_repo != trained_on["hf_repo_id"]:
            warn_once(f"{args.checkpoint} was trained on {trained_on['hf_repo_id']} ({where}); "
                      f"evaluating it on hf_repo={args.hf_repo} as asked")
        return args, {}
    logger.info("checkpoint %s: base %s, from %s", args.checkpoint, trained_on, where)
    files = {}
    for role, key in (("moshi_weights", "moshi_path"), ("mimi_weights", "mimi_path")):
        if trained_on.get(key):
            path = Path(trained_on[key]).expanduser()
            if not path.is_file():
                raise FileNotFoundError(f"{where}: the run was trained with {key}={trained_on[key]}, which is not "
                                        "here; name the base with hf_repo= (and moshi_weight=, mimi_weight=)")
            files[role] = path
    return replace(args, hf_repo=trained_on.get("hf_repo_id") or args.hf_repo), files


class _Base:
    """The base repo: a Hub id (through the HF cache, as moshi resolves it) or a local folder."""

    def __init__(self, hf_repo: str, hub: "_Hub | None" = None):
        self.hf_repo = hf_repo
        self.hub = hub or _Hub()
        local = Path(hf_repo).expanduser()
        self.local = local if local.is_dir() else None
        if self.local is None and (local.exists() or hf_repo.startswith((".", "/", "~")) or hf_repo.count("/") != 1):
            raise FileNotFoundError(f"hf_repo={hf_repo!r} is neither a folder nor a Hub repo id (org/name); "
                                    "give the folder a Moshi repo was downloaded to, or a repo id")

    def config(self) -> Path | None:
        """The repo's config.json, or None (then moshi assumes Moshi 7B, with a warning)."""
        if self.local is not None:
            path = self.local / CONFIG_NAME
            if path.is_file():
                return path
            warn_once(f"{self.local} holds no {CONFIG_NAME}: assuming Moshi 7B with moshi's default file "
                      f"names ({loaders.MOSHI_NAME}, {loaders.MIMI_NAME}), as moshi's loader does")
            return None
        try:
            return self.hub.get(self.hf_repo, CONFIG_NAME, missing_ok=True) or self._no_config()
        except HubUnreachableError:
            if _cached(self.hf_repo):  # the repo is in the cache, without a config.json
                return self._no_config()
            raise

    def _no_config(self) -> None:
        warn_once(f"Repository {self.hf_repo} contains no {CONFIG_NAME}: assuming Moshi 7B with moshi's default "
                  f"file names ({loaders.MOSHI_NAME}, {loaders.MIMI_NAME}), as moshi's loader does")
        return None

    def file(self, name: str, role: str) -> Path:
        if name.startswith(("hf://", "file://")) or Path(name).is_absolute():
            return _user_file(name, role, self.hub)
        if self.local is not None:
            path = self.local / name
            if not path.is_file():
                raise FileNotFoundError(f"Moshi checkpoint {self.local}: {role} file {name} not found "
                                        f"(looked for {path})")
            return path
        return self.hub.get(self.hf_repo, name)


_warned: set[str] = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


class HubUnreachableError(CheckpointError):
    """A Hub file that is not in the HF cache while the Hub cannot be reached (offline or no network)."""


# How long the probe waits for a TCP connection to the Hub, unless HF_HUB_ETAG_TIMEOUT is set (then
# that): where the Hub is reachable a connection takes well under a second, and where it is not
# (a firewall that drops packets) nobody should wait for huggingface_hub's 10 s, five times over.
PROBE_CONNECT_TIMEOUT_S = 3.0


class _Hub:
    """Files of Hub repos through the HF cache, as moshi's ``hf_get`` finds them, except when the
    Hub cannot be reached: then huggingface_hub would retry every request five times (1+2+4+8+8 s of
    back-off, a warning per try) before falling back to its cache. Instead, before the first
    download, one request with a short timeout and no retry asks whether the Hub answers at all
    (any HTTP status counts as an answer); if it does not, files come from the cache alone
    (``local_files_only``, what huggingface_hub falls back to), and a file missing there is a
    :class:`HubUnreachableError` that says what to do. A Hub that answers gets huggingface_hub's
    downloads untouched: their timeouts and retries are not shortened. With ``HF_HUB_OFFLINE=1``
    nothing is sent at all."""

    def __init__(self):
        self._unreachable: str | None = None  # why the Hub cannot be reached
        self._probed = False

    def get(self, repo: str, filename: str, missing_ok: bool = False) -> Path | None:
        """The file's local path; None for a file the repo does not hold when ``missing_ok``."""
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, OfflineModeIsEnabled

        reason = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else self._probe(repo, filename)
        try:
            if reason is None:
                return Path(hf_hub_download(repo, filename))
            path = Path(hf_hub_download(repo, filename, local_files_only=True))
        except (LocalEntryNotFoundError, OfflineModeIsEnabled) as exc:  # not in the cache, and no answer
            # (or, after the probe, an answer huggingface_hub does not understand, e.g. a bare 404)
            cause = exc.__cause__ or exc
            if reason is None and not isinstance(cause, NO_ANSWER):
                raise _hub_error(repo, filename, cause) from None
            # the Hub may also stop answering between the probe and the download (huggingface_hub
            # then retried, with its warnings)
            raise HubUnreachableError(_unreachable_message(repo, filename, reason or _short_reason(cause))) from None
        except EntryNotFoundError as exc:  # the Hub answered: the repo holds no such file
            if missing_ok:
                return None
            raise _hub_error(repo, filename, exc) from None
        except Exception as exc:  # the Hub answered: no such repo, gated, unauthorised, ...
            raise _hub_error(repo, filename, exc) from None
        if not constants.HF_HUB_OFFLINE:
            warn_once(f"the Hugging Face Hub cannot be reached ({reason}): using the cached copy of {repo}")
        return path

    def _probe(self, repo: str, filename: str) -> str | None:
        """None when the Hub answers a HEAD request for the file, otherwise why not (once)."""
        if self._probed:
            return self._unreachable
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session

        connect = constants.HF_HUB_ETAG_TIMEOUT if "HF_HUB_ETAG_TIMEOUT" in os.environ else PROBE_CONNECT_TIMEOUT_S
        url = hf_hub_url(repo, filename)
        try:
            get_session().head(url, headers=build_hf_headers(), allow_redirects=False,
                               timeout=(connect, constants.HF_HUB_ETAG_TIMEOUT))
        except OSError as exc:  # requests' connection errors and timeouts are OSErrors
            self._unreachable = f"{constants.ENDPOINT}: {_short_reason(exc)}"
        self._probed = True
        return self._unreachable


def _cached(repo: str) -> bool:
    from huggingface_hub import constants

    return (Path(constants.HF_HUB_CACHE) / f"models--{repo.replace('/', '--')}" / "snapshots").is_dir()


def _short_reason(exc: BaseException) -> str:
    """A connection error in a few words (requests' messages nest urllib3's several levels deep)."""
    if isinstance(exc, requests.Timeout):
        return f"no answer in time ({type(exc).__name__})"
    text = str(exc)
    errno = re.findall(r"\[Errno -?\d+\] [^)'\"]+", text)
    if errno:
        return errno[-1].strip()
    first = text.strip().splitlines()[0] if text.strip() else ""
    return f"{type(exc).__name__}: {first}" if first and len(first) <= 200 else type(exc).__name__


def _unreachable_message(repo: str, filename: str, reason: str) -> str:
    """One line: what is missing, why, and the three ways out."""
    from huggingface_hub import constants

    return (f"Moshi checkpoint {repo} ({filename}) is not in the Hugging Face cache {constants.HF_HUB_CACHE} "
            f"and the Hub cannot be reached ({reason}). Either fill the cache where the Hub is reachable "
            f"(`hf download {repo}`, same HF_HOME) and run with HF_HUB_OFFLINE=1; or pass hf_repo=LOCAL_DIR, "
            "a folder holding a copy of the repository; or preset=tiny for a smoke run (random weights, "
            "not a measurement)")


def _hub_error(hf_repo: str, name: str, exc: Exception) -> FileNotFoundError:
    first_line = str(exc).strip().splitlines()[0].rstrip(".") if str(exc).strip() else type(exc).__name__
    return FileNotFoundError(f"could not load {name} of Moshi checkpoint {hf_repo!r}: {first_line}")


def _user_file(value: str | Path, role: str, hub: "_Hub | None" = None) -> Path:
    """A file argument: a local path or ``hf://org/repo/file`` (through the HF cache, as moshi)."""
    text = str(value)
    if text.startswith("hf://"):
        parts = text.removeprefix("hf://").split("/")
        return (hub or _Hub()).get("/".join(parts[:2]), "/".join(parts[2:]))
    path = loaders.hf_get(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{role}={text}: no such file" + (" (it is a folder)" if path.is_dir() else ""))
    return path


def _consolidated_dir(value: str | Path) -> Path:
    """``checkpoint_NNNNNN/`` or ``checkpoint_NNNNNN/consolidated/`` -> the folder with the files."""
    directory = Path(value).expanduser()
    if not directory.is_dir():
        raise FileNotFoundError(f"checkpoint={value}: no such folder; give a moshi-finetune "
                                "checkpoint_NNNNNN folder or its consolidated/ folder")
    if (directory / "ttt_config.json").is_file():
        raise CheckpointError(f"checkpoint={value} is a ttt-bench TTT checkpoint (ttt_config.json); pass it as "
                              "ttt_checkpoint= to the ttt model. checkpoint= takes a moshi-finetune checkpoint")
    inner = directory / "consolidated"
    return inner if not (directory / CONFIG_NAME).is_file() and inner.is_dir() else directory


def _finetune_weights(directory: Path) -> tuple[str, Path]:
    lora, full = directory / LORA_NAME, directory / FULL_NAME
    if lora.is_file() and full.is_file():
        raise CheckpointError(f"moshi-finetune checkpoint {directory} holds both {LORA_NAME} and {FULL_NAME}; "
                              "keep the one you mean, or pass lora_weight= or moshi_weight= explicitly")
    if lora.is_file():
        return "lora", lora
    if full.is_file():
        return "full", full
    others = sorted(p.name for p in directory.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".ckpt"))
    seen = f" (found {', '.join(others)}: ttt-bench never unpickles weights)" if others else ""
    raise FileNotFoundError(f"moshi-finetune checkpoint {directory}: neither {LORA_NAME} nor {FULL_NAME} "
                            f"found{seen}; moshi-finetune writes one of them next to {CONFIG_NAME}")


def read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text())
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{what} {path} is not a JSON text file ({exc}); give the JSON config") from None
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{what} {path} is not valid JSON ({exc}); fix or re-save it") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{what} {path} holds a JSON {type(data).__name__}, not an object of settings")
    return data


def _pop_file_names(lm_config: dict[str, Any] | None) -> dict[str, Any]:
    """The non-LM keys moshi's CheckpointInfo takes out of config.json, with its defaults."""
    config = lm_config if lm_config is not None else {}
    names = {"moshi_name": config.pop("moshi_name", loaders.MOSHI_NAME),
             "mimi_name": config.pop("mimi_name", loaders.MIMI_NAME),
             "mimi_config_name": config.pop("mimi_config_name", None),
             "lora_name": config.pop("lora_name", None),
             "model_type": config.pop("model_type", "moshi")}
    for key in ("tokenizer_name", "lm_gen_config", "tts_config", "stt_config", "model_id"):
        config.pop(key, None)
    return names


# ----------------------------------------------------------------------------- checking files


def require_safetensors(path: Path, role: str) -> None:
    """``path`` must be a readable, complete safetensors file (never a pickle)."""
    if not loaders._is_safetensors(path):
        kind = " (a PyTorch pickle)" if _looks_pickled(path) else ""
        raise CheckpointError(f"{role} {path} is not a .safetensors file{kind}; ttt-bench never unpickles "
                              "weights: convert it with safetensors.torch.save_file")
    safetensors_shapes(path, role)


def _looks_pickled(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(2)
    except OSError:
        return False
    return head == b"PK" or head[:1] == b"\x80"


def safetensors_shapes(path: Path, role: str = "weights") -> dict[str, tuple[int, ...]]:
    """Key -> shape from a safetensors file's header (nothing loaded); a truncated or corrupt
    file is a :class:`CheckpointError`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}
    except SafetensorError as exc:
        pickled = " It looks like a PyTorch pickle, which ttt-bench never opens." if _looks_pickled(path) else ""
        raise CheckpointError(f"{role} {path} is truncated or not a safetensors file ({exc}).{pickled} "
                              "Copy or save it again") from None


def load_safetensors(path: Path, role: str = "weights", device: str = "cpu") -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file`` with a truncated or corrupt file as a :class:`CheckpointError`."""
    from safetensors.torch import load_file

    safetensors_shapes(path, role)
    return load_file(str(path), device=device)


def key_mismatch(loaded: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]],
                 required: set[str] | None = None) -> str | None:
    """A description of the keys that do not fit (first few of each sort), or None.

    required: the expected keys that must be present (default: all of them)."""
    required = set(expected) if required is None else required
    missing = sorted(required - set(loaded))
    unexpected = sorted(set(loaded) - set(expected))
    shapes = sorted(f"{k} {loaded[k]} (model: {expected[k]})" for k in set(loaded) & set(expected)
                    if tuple(loaded[k]) != tuple(expected[k]))
    parts = [f"{len(keys)} {what}: {', '.join(keys[:SHOWN_KEYS])}{', ...' if len(keys) > SHOWN_KEYS else ''}"
             for what, keys in (("missing", missing), ("unexpected", unexpected), ("of another shape", shapes))
             if keys]
    return "; ".join(parts) or None


_META_SHAPES: dict[str, dict[str, tuple[int, ...]]] = {}  # per config: a training run's checkpoints share one


def _meta_state_shapes(resolved: ResolvedCheckpoint, lora: bool) -> dict[str, tuple[int, ...]]:
    """Key -> shape of the LM the config builds (on the meta device: no memory, no weights)."""
    key = json.dumps([resolved.lm_config, lora], sort_keys=True, default=str)
    if key not in _META_SHAPES:
        _META_SHAPES[key] = _build_meta_state_shapes(resolved, lora)
    return _META_SHAPES[key]


def _build_meta_state_shapes(resolved: ResolvedCheckpoint, lora: bool) -> dict[str, tuple[int, ...]]:
    overrides = {} if lora else {"lora": False}
    where = resolved.config_path or f"moshi's default Moshi 7B config (no {CONFIG_NAME} in {resolved.hf_repo})"
    try:
        lm = loaders.get_moshi_lm(None, lm_kwargs=resolved.lm_config, device="meta", dtype=torch.float32,
                                  lm_kwargs_overrides=overrides)
    except Exception as exc:  # the config's values reach LMModel's constructor: any error there
        raise CheckpointError(f"config {where} does not build a Moshi LM ({type(exc).__name__}: {exc}); "
                              "fix the config or pass config_path= the config.json the weights were saved "
                              "with") from None
    return {k: tuple(v.shape) for k, v in lm.state_dict().items()}


def check_fits(resolved: ResolvedCheckpoint) -> None:
    """The LM weights (and LoRA adapters) fit the model the config builds: keys and shapes."""
    wants_lora = bool((resolved.lm_config or {}).get("lora", False))
    if resolved.lora_weights is not None and not wants_lora:
        raise CheckpointError(f"LoRA weights {resolved.lora_weights} given, but the config "
                              f"{resolved.config_path or '(Moshi 7B defaults)'} does not enable LoRA "
                              "(lora: true, lora_rank, lora_scaling); pass config_path= the config.json "
                              "saved with the adapters")
    if wants_lora and resolved.lora_weights is None and resolved.kind == "base" and not resolved.args.moshi_weight:
        raise CheckpointError(f"config {resolved.config_path} enables LoRA (lora: true) but no LoRA weights were "
                              f"given; pass lora_weight= the adapters saved with it (or checkpoint= their folder), "
                              f"or moshi_weight= the merged weights")
    plain = _meta_state_shapes(resolved, lora=False)
    problem = key_mismatch(safetensors_shapes(resolved.moshi_weights, "moshi_weights"), plain)
    if problem:
        raise CheckpointError(f"Moshi weights {resolved.moshi_weights} do not fit the model of config "
                              f"{resolved.config_path or '(Moshi 7B defaults)'}: {problem}. Check that the "
                              "config is the one the weights were saved with")
    if resolved.lora_weights is None:
        return
    with_lora = _meta_state_shapes(resolved, lora=True)
    adapters = {k for k in with_lora if ".lora_A." in k or ".lora_B." in k}
    problem = key_mismatch(safetensors_shapes(resolved.lora_weights, "lora_weights"), with_lora, adapters)
    if problem:
        raise CheckpointError(f"LoRA weights {resolved.lora_weights} do not fit the model of config "
                              f"{resolved.config_path}: {problem}. Check lora_rank in the config and the "
                              "base model (hf_repo)")


def _ttt_fork_evidence(resolved: ResolvedCheckpoint) -> str | None:
    """Why these are the moshi-finetune TTT fork's weights, or None."""
    ttt = (resolved.training_config or {}).get("ttt")
    if isinstance(ttt, dict) and ttt.get("enable", False):  # the fork's TTTArgs.enable defaults to False
        return f"{resolved.training_config_path} has a 'ttt' section"
    for role in ("lora_weights", "moshi_weights"):
        path = getattr(resolved, role)
        if path is None:
            continue
        keys = [k for k in safetensors_shapes(path, role) if any(part in k for part in TTT_FORK_KEY_PARTS)]
        if keys:
            return f"{path} holds TTT-fork keys such as {keys[0]}"
    return None


# ----------------------------------------------------------------------------- sha256


def sha256_cache_path() -> Path:
    from ttt_bench.audio.cache import default_cache_dir

    return default_cache_dir() / "file_sha256.json"


def file_sha256(path: Path) -> str:
    """sha256 of a file, cached per (resolved path, size, mtime) so a large file is hashed once."""
    path = Path(path).resolve()
    stat = path.stat()
    key, stamp = str(path), [stat.st_size, stat.st_mtime_ns]
    cache_path = sha256_cache_path()
    cache = _read_sha256_cache(cache_path)
    entry = cache.get(key)
    if entry and entry.get("stamp") == stamp:
        return entry["sha256"]
    if stat.st_size > 1 << 30:
        logger.info("computing sha256 of %s (%.1f GB, once: it is cached)", path, stat.st_size / 1e9)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    cache = _read_sha256_cache(cache_path)  # another process may have added entries meanwhile
    cache[key] = {"stamp": stamp, "sha256": digest.hexdigest()}
    try:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache_path.with_name(f".{cache_path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(cache, indent=1, sort_keys=True))
        os.replace(tmp, cache_path)
    except OSError as exc:  # a read-only cache costs time, not correctness
        logger.debug("could not write the sha256 cache %s: %s", cache_path, exc)
    return digest.hexdigest()


def _read_sha256_cache(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}
