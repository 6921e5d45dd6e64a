"""Save and load pruned models: ``model.safetensors`` plus a ``pruned.json`` record.

:func:`save_pruned` writes the weights with plain keys and the layer sizes in the safetensors
metadata; :func:`load_pruned` rebuilds the network, resizes its layers and loads strictly.
Both are re-exported from :mod:`kiln.compress.prune.core`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kiln.compress.prune import structured as st

__all__ = ["RECORD", "WEIGHTS", "load_pruned", "save_pruned"]

WEIGHTS = "model.safetensors"
RECORD = "pruned.json"


def save_pruned(
    model: nn.Module,
    folder: str | Path,
    *,
    notes: Mapping[str, Any] | None = None,
    metadata: Mapping[str, str] | None = None,
) -> Path:
    """Write ``folder/model.safetensors`` (plain keys) and ``folder/pruned.json``.

    The safetensors metadata holds ``metadata`` (the run's config, see ``prune_run.kiln_metadata``)
    and ``kiln_pruned``: the layer sizes :func:`load_pruned` needs to rebuild a structured
    model. An unstructured result also loads with ``kiln.load_model(folder/model.safetensors)``.

    Example:
        >>> import tempfile
        >>> net = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
        >>> _ = st.prune_structured(net, 0.5)
        >>> path = save_pruned(net, tempfile.mkdtemp())
        >>> load_pruned(path, model=nn.Sequential(nn.Linear(4, 4), nn.ReLU(),
        ...                                       nn.Linear(4, 2)))[0].out_features
        2
    """
    from safetensors.torch import save_model

    if any(k.endswith("_mask") for k, _ in model.named_buffers()):
        raise ValueError("make the pruning masks permanent (make_permanent) before saving")
    out = Path(folder)
    out.mkdir(parents=True, exist_ok=True)
    sizes = st.widths(model)
    meta = {**(metadata or {}), "kiln_pruned": json.dumps({"format": 1, "widths": sizes})}
    path = out / WEIGHTS
    tmp = path.with_name(f".{path.name}.tmp")
    save_model(model, str(tmp), metadata=meta)
    tmp.replace(path)
    (out / RECORD).write_text(json.dumps({**(notes or {}), "widths_saved": sizes}, indent=1))
    return path


def load_pruned(
    path: str | Path,
    *,
    model: nn.Module | None = None,
    device: str | torch.device = "cpu",
    trust_code: bool = False,
) -> nn.Module:
    """Rebuild a pruned model from ``folder`` (or its ``model.safetensors``), in eval mode.

    The network is built from the run config in the file (or ``model`` for a user's own
    instance), its layers are resized to the saved widths, then the weights are loaded
    strictly. A ``model.target`` import path in that config is refused unless ``trust_code``
    (see :mod:`kiln.trust`).

    Raises:
        FileNotFoundError: no ``model.safetensors`` there.
        ValueError: the file is not a pruned model, or has no config and no ``model`` was given.

    Example:
        >>> net = load_pruned("runs/digits/pruned")           # doctest: +SKIP
    """
    from safetensors.torch import load_model as st_load

    from kiln.safeio.tensorfile import read_header

    p = Path(path)
    file = p / WEIGHTS if p.is_dir() else p
    if not file.is_file():
        raise FileNotFoundError(f"no {WEIGHTS} in {p}; run `kiln prune RUN` first")
    meta = read_header(file)[1]  # a damaged header is one line naming the file
    if "kiln_pruned" not in meta:
        raise ValueError(f"{file} is not a pruned model; load it with kiln.load_model")
    if model is None:
        if "kiln_config" not in meta:
            raise ValueError(f"{file} has no Kiln config; pass model=<your nn.Module> to load it")
        import yaml

        from kiln.config import Config
        from kiln.registry import build_model
        from kiln.run import data_info_from_json
        from kiln.trust import refuse_file_target

        cfg = Config.model_validate(yaml.safe_load(meta["kiln_config"]))
        refuse_file_target(cfg.model.target, file, trust_code=trust_code)
        model = build_model(cfg.model, data_info_from_json(meta["kiln_data_info"]))
    st.resize_(model, json.loads(meta["kiln_pruned"])["widths"])
    st_load(model, str(file), strict=True, device=str(device))
    return model.to(device).eval()
