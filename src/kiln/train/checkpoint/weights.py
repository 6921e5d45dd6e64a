"""Model weights without pickle: ``model.safetensors`` plus the config that rebuilds the model.

``kiln.load_model(run_dir)`` reads the run's ``model.safetensors``, rebuilds the network from the
config and the input contract stored in its metadata (through the registry) and loads the weights;
tied weights (a GPT's embedding and head) survive because safetensors' ``save_model``/``load_model``
handle shared tensors. Where the file sits in a run directory is :mod:`kiln.run`'s contract.

Example:
    >>> model = load_model("runs/digits")          # doctest: +SKIP
    >>> model(torch.randn(1, 1, 32, 32)).shape     # doctest: +SKIP
    torch.Size([1, 10])
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import torch
from torch import nn

from kiln.config import Config, dump_config
from kiln.data.base import DataInfo
from kiln.run import (
    WEIGHTS,
    data_info_from_json,
    read_data_info,
    weights_file,
)

__all__ = ["WEIGHTS", "consolidate_checkpoint", "load_model", "model_from_metadata", "save_weights"]


def save_weights(model: nn.Module, path: str | Path, cfg: Config, info: DataInfo) -> Path:
    """Write ``model``'s weights to ``path`` with the config and data info as metadata."""
    from safetensors import SafetensorError
    from safetensors.torch import save_model

    from kiln.errors import DiskError

    p = Path(path)
    tmp = p.with_name(f".{p.name}.tmp")
    meta = {"kiln_config": dump_config(cfg), "kiln_data_info": json.dumps(asdict(info))}
    try:
        save_model(model, str(tmp), metadata=meta)
        tmp.replace(p)
    except (OSError, SafetensorError) as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, OSError) or "os error 28" not in str(exc):
            raise  # an OSError (ENOSPC included) is already one line in the CLI
        raise DiskError(
            f"the disk is full writing {p}: free space, then write the weights from the last "
            f"checkpoint (intact) with `kiln consolidate {p.parent} --out {p}`"
        ) from None
    return p


def model_from_metadata(file: Path, meta: dict[str, str], *, trust_code: bool) -> nn.Module:
    """The untrained model that a weights file's ``kiln_config`` metadata describes.

    A registry name is rebuilt as it is; a ``model.target`` import path is refused unless
    ``trust_code`` (see :mod:`kiln.trust`).

    Raises:
        ValueError: the file has no Kiln metadata.
        kiln.errors.UnsafeFileError: the metadata names an import path and ``trust_code`` is off.
    """
    if "kiln_config" not in meta or "kiln_data_info" not in meta:
        raise ValueError(f"{file} has no Kiln metadata; pass model=<your nn.Module> to load it")
    import yaml

    from kiln.registry import build_model
    from kiln.trust import refuse_file_target

    cfg = Config.model_validate(yaml.safe_load(meta["kiln_config"]))
    refuse_file_target(cfg.model.target, file, trust_code=trust_code)
    return build_model(cfg.model, data_info_from_json(meta["kiln_data_info"]))


def load_model(
    run: str | Path,
    *,
    model: nn.Module | None = None,
    device: str | torch.device = "cpu",
    trust_code: bool = False,
) -> nn.Module:
    """Rebuild a trained model from a run directory (or a ``.safetensors`` file), in eval mode.

    Args:
        run: a run directory holding ``model.safetensors``, or the file itself.
        model: an instance to load into (for user models that cannot be rebuilt by import path).
        device: where to put the weights.
        trust_code: allow the file's ``model.target`` import path to be imported and called
            (a run trained on your own class); off, only registry models are rebuilt.

    Raises:
        FileNotFoundError: no weights there (the run may not have finished; use its checkpoint).
        kiln.errors.UnsafeFileError: the file names an import path and ``trust_code`` is off.
    """
    from kiln.safeio.tensorfile import load_into, read_header

    file = weights_file(run)
    entries, meta = read_header(file)  # a damaged header is one line naming the file
    if model is None:
        model = model_from_metadata(file, meta, trust_code=trust_code)
    load_into(model, file, entries, device=device)  # dtypes and shapes checked first
    return model.to(device).eval()


def consolidate_checkpoint(
    checkpoint: str | Path,
    *,
    out: str | Path | None = None,
    model: nn.Module | None = None,
    trust_code: bool = False,
) -> dict[str, torch.Tensor]:
    """The full model weights of any checkpoint (sharded FSDP2 or not), in one process.

    Optionally writes them as a ``.safetensors`` file (``out``) that :func:`load_model` reads.
    The model is rebuilt from the checkpoint's config (pass ``model`` for a user's own class);
    a ``model.target`` import path there is refused unless ``trust_code`` (see :mod:`kiln.trust`).

    Example:
        >>> w = consolidate_checkpoint("runs/x/checkpoints/step-40.ckpt",
        ...                            out="runs/x/model-step40.safetensors")  # doctest: +SKIP
    """
    from kiln.train.checkpoint import state
    from kiln.train.checkpoint.files import load_checkpoint
    from kiln.train.checkpoint.schema import WEIGHT_KEYS

    path = Path(checkpoint)
    saved = load_checkpoint(path, require=WEIGHT_KEYS)
    cfg = Config.model_validate(saved["config"])
    run_dir = path.parent.parent  # RUN/checkpoints/step-N.ckpt
    info = read_data_info(run_dir, hint="the checkpoint must sit in its run's checkpoints/")
    if model is None:
        from kiln.registry import build_model
        from kiln.trust import refuse_file_target

        refuse_file_target(cfg.model.target, path, trust_code=trust_code)
        model = build_model(cfg.model, info)
    if "sharded" in saved:
        weights = state.consolidate(model, path.parent / saved["sharded"])
    else:
        model.load_state_dict(saved["model"])
        weights = {k: v.detach().clone() for k, v in model.state_dict().items()}
    if out is not None:
        save_weights(model, out, cfg, info)
    return weights
