"""Fine-tuning a model being compressed with Kiln's Trainer: one function for QAT and pruning.

Quantization-aware training (:func:`kiln.compress.quantize.ao.trainer_finetune`) and pruning
cycles (:func:`kiln.compress.prune.run.trainer_finetune`) both train the model they are given
for a few epochs and go on with the weights that run kept. They differ only in how they prepare
the config and what they measure around it; the training itself is :func:`finetune_in_run`.

The model is passed to the Trainer as ``model=``, so what the compression put around its
parameters (fake-quantization observers, pruning masks) stays and trains with it.

Example:
    >>> from kiln.compress.finetune import finetune_in_run
    >>> result = finetune_in_run(cfg, model, data, "out/ft")  # doctest: +SKIP
    >>> result.run_dir / "model.safetensors"  # what `model` now holds  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from torch import nn

from kiln.run import WEIGHTS

if TYPE_CHECKING:
    from kiln.config import Config
    from kiln.data.base import DataBundle
    from kiln.train.finish import FitResult

__all__ = ["finetune_in_run"]


def finetune_in_run(
    cfg: Config,
    model: nn.Module,
    data: DataBundle,
    run_dir: str | Path,
    *,
    verbose: bool = False,
) -> FitResult:
    """Train ``model`` in place with Kiln's Trainer, then load back the weights the run kept.

    The run (checkpoints, ``metrics.jsonl``, ``summary.json``, ``model.safetensors``) is
    written to ``run_dir``. The Trainer leaves the last epoch's weights in ``model``; the run's
    ``model.safetensors`` holds the best ones by its monitored metric (or its EMA/SWA weights
    when ``cfg`` asks for them), and those are what ``model`` holds on return, on the CPU in
    eval mode.

    Args:
        cfg: the fine-tuning config (e.g. from ``qat_config`` or the run's config with fewer
            epochs).
        model: the model to train; changed in place.
        data: the data bundle to train and validate on.
        run_dir: where the fine-tuning run is written.
        verbose: print the Trainer's progress lines.

    Returns:
        The Trainer's result (validation and test metrics, the best checkpoint).

    Example:
        >>> finetune_in_run(cfg, pruned, data, tmp / "cycle-1").val  # doctest: +SKIP
        {'loss': 0.08, 'acc': 0.97}
    """
    from kiln.train.trainer import Trainer

    result = Trainer(cfg, model=model, data=data, run_dir=run_dir, verbose=verbose).fit()
    _load_kept(model, Path(result.run_dir) / WEIGHTS)  # the kept weights, not the last ones
    model.cpu().eval()
    return result


def _load_kept(model: nn.Module, file: Path) -> None:
    """Load ``file`` into ``model`` by name, every name the model has for each tensor included.

    A prepared QAT graph shares some observer buffers between modules; the run's file may list
    such a tensor under one name or under all of them, so a name is only missing when no tensor
    it aliases was loaded.
    """
    from kiln.errors import ModelError
    from kiln.safeio.tensorfile import load_file

    tensors, _ = load_file(file)
    own = model.state_dict()
    result = model.load_state_dict(tensors, strict=False)
    loaded = {own[k].data_ptr() for k in tensors if k in own}
    missing = [k for k in result.missing_keys if own[k].data_ptr() not in loaded]
    if result.unexpected_keys or missing:
        raise ModelError(
            f"{file} does not fit the fine-tuned {type(model).__name__} (missing "
            f"{missing[:5]}, unexpected {result.unexpected_keys[:5]}); the run saved another "
            "model than the one it was given"
        )
