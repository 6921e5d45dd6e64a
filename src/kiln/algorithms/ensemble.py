"""Ensembles: several trained models answer together, by mean probability or by majority vote.

Why: models trained from different initialisations, data orders or settings make partly
independent mistakes, so averaging their predicted probabilities is usually more accurate and
better calibrated than any one of them (Lakshminarayanan et al., 2017, "deep ensembles").
A *snapshot ensemble* gets members for free from the checkpoints of one run (Huang et al., 2017);
it helps most when the learning rate was cycled, so the checkpoints sit in different minima.

:class:`Ensemble` is a plain ``nn.Module``: its output drops into the cross-entropy loss, argmax,
metrics, export and serving unchanged.

* ``mode="mean"``, classification and language modelling: the log of the mean softmax
  probability over members (the member outputs are logits). Regression: the mean output.
* ``mode="vote"`` (classification): each member votes for its argmax class. The output is the
  log of ``(votes + 0.5 * mean_probability) / (members + 0.5)``, a distribution whose argmax is
  the majority class. **Ties** between classes with the same number of votes go to the class with
  the higher mean probability (the half-weighted term is below one vote, so it never overturns a
  majority); an exact tie in that too goes to the lowest class index. The loss reported for a
  vote ensemble is the cross-entropy of that vote distribution, so compare votes by accuracy.

Loaders build an ensemble from run directories (:func:`load_ensemble`, each run's
``model.safetensors``) or from one run's last checkpoints (:func:`load_snapshots`).

Example:
    >>> import torch
    >>> from torch import nn
    >>> members = [nn.Linear(4, 3) for _ in range(3)]
    >>> ens = Ensemble(members, mode="mean", task="classification")
    >>> logp = ens(torch.randn(2, 4))
    >>> logp.shape, torch.allclose(logp.exp().sum(-1), torch.ones(2))
    (torch.Size([2, 3]), True)
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kiln.run import CHECKPOINTS, CONFIG, checkpoint_files, read_config, read_data_info, run_dir_of

if TYPE_CHECKING:
    from kiln.data.base import DataInfo

__all__ = [
    "Ensemble",
    "check_compatible",
    "check_same_split",
    "load_ensemble",
    "load_snapshots",
    "mean_log_prob",
    "snapshot_paths",
    "vote_log_prob",
]

MODES = ("mean", "vote")
TASKS = ("classification", "regression", "lm")
# Data settings that do not change which examples are held out or how inputs are normalised.
_LOADER_ONLY = {
    "batch_size",
    "eval_batch_size",
    "num_workers",
    "persistent_workers",
    "pin_memory",
    "drop_last",
}


def mean_log_prob(outputs: Sequence[Tensor]) -> Tensor:
    """The log of the mean softmax probability of several logit tensors (classes on dim -1).

    Computed as ``logsumexp(log_softmax) - log(n)`` in float32, which is exact where averaging
    probabilities first would underflow for confident predictions.

    Args:
        outputs: logits of the same shape ``(..., classes)``, one per member or view.

    Returns:
        Log-probabilities ``(..., classes)`` whose ``exp`` sums to 1 over the last dim.

    Example:
        >>> a, b = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 2.0]])
        >>> mean_log_prob([a, b]).exp()
        tensor([[0.5000, 0.5000]])
    """
    if not outputs:
        raise ValueError("mean_log_prob needs at least one output tensor")
    logp = torch.stack([o.float().log_softmax(-1) for o in outputs])
    return torch.logsumexp(logp, dim=0) - math.log(len(outputs))


def vote_log_prob(outputs: Sequence[Tensor]) -> Tensor:
    """Majority vote of several logit tensors, as log-frequencies whose argmax is the vote.

    Each member votes for its argmax class. The result is
    ``log((votes + 0.5 * mean_probability) / (n + 0.5))``: the half-weighted mean probability
    adds less than one vote, so it only decides between classes with equal votes (the class with
    the higher mean probability wins); an exact tie in that too goes to the lowest class index.
    Values are floored at ``1e-12`` before the log so a loss on them stays finite.

    Args:
        outputs: logits of the same shape ``(..., classes)``, one per member.

    Returns:
        Log-frequencies ``(..., classes)``.

    Example:
        >>> votes = [torch.tensor([[3.0, 0, 0]]), torch.tensor([[0, 3.0, 0]]),
        ...          torch.tensor([[0, 3.0, 0]])]
        >>> int(vote_log_prob(votes).argmax(-1))
        1
    """
    if not outputs:
        raise ValueError("vote_log_prob needs at least one output tensor")
    classes = outputs[0].shape[-1]
    votes = sum(F.one_hot(o.argmax(-1), classes).float() for o in outputs)
    mean_p = mean_log_prob(outputs).exp()
    freq = (votes + 0.5 * mean_p) / (len(outputs) + 0.5)
    return freq.clamp_min(1e-12).log()


class Ensemble(nn.Module):
    """Several models as one: mean probability (or mean output) or majority vote.

    Args:
        models: the members; each maps the same input to logits (classification, ``lm``) or
            values (regression) of the same shape.
        mode: ``mean`` or ``vote`` (vote needs class outputs).
        task: ``classification``, ``regression`` or ``lm``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> ens = Ensemble([nn.Linear(4, 1), nn.Linear(4, 1)], task="regression")
        >>> ens(torch.randn(5, 4)).shape
        torch.Size([5, 1])
    """

    def __init__(
        self, models: Sequence[nn.Module], *, mode: str = "mean", task: str = "classification"
    ) -> None:
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"ensemble mode must be one of {', '.join(MODES)}, got {mode!r}")
        if task not in TASKS:
            raise ValueError(f"ensemble task must be one of {', '.join(TASKS)}, got {task!r}")
        if mode == "vote" and task == "regression":
            raise ValueError(
                "mode='vote' needs class predictions, but the task is regression; "
                "use mode='mean' (the mean of the members' outputs)"
            )
        if len(models) == 0:
            raise ValueError("an ensemble needs at least one model")
        self.members = nn.ModuleList(models)
        self.mode = mode
        self.task = task

    def forward(self, x: Tensor) -> Tensor:
        outputs = [m(x) for m in self.members]
        if self.task == "regression":
            return torch.stack([o.float() for o in outputs]).mean(0)
        if self.mode == "vote":
            return vote_log_prob(outputs)
        return mean_log_prob(outputs)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}, task={self.task!r}, members={len(self.members)}"


# --------------------------------------------------------------------------- loading


def check_compatible(runs: Sequence[str | Path], infos: Sequence[DataInfo]) -> DataInfo:
    """Check that the runs' models can be combined: same task, classes, input and outputs.

    Args:
        runs: the runs' names or paths (for the message).
        infos: each run's :class:`~kiln.data.base.DataInfo`, in the same order.

    Returns:
        The first run's info.

    Raises:
        ValueError: naming the first field that differs and the runs' values of it.

    Example:
        >>> from kiln.data.base import DataInfo
        >>> a = DataInfo("classification", (64,), num_classes=10)
        >>> b = DataInfo("classification", (64,), num_classes=3)
        >>> check_compatible(["a", "b"], [a, b])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        ValueError: cannot ensemble these runs: num_classes differs (a: 10, b: 3); ...
    """
    if len(runs) != len(infos) or not infos:
        raise ValueError("check_compatible needs one DataInfo per run, and at least one run")
    first = infos[0]
    for name, info in zip(runs[1:], infos[1:], strict=True):
        for field in ("task", "num_classes", "input_shape", "num_outputs", "vocab_size"):
            a, b = getattr(first, field), getattr(info, field)
            if a != b:
                raise ValueError(
                    f"cannot ensemble these runs: {field} differs ({runs[0]}: {a}, {name}: {b}); "
                    "every member must be trained on the same kind of data"
                )
        if first.class_names and info.class_names and first.class_names != info.class_names:
            raise ValueError(
                f"cannot ensemble these runs: class_names differ ({runs[0]}: {first.class_names},"
                f" {name}: {info.class_names}); class index i must mean the same class in every "
                "member"
            )
    return first


def check_same_split(runs: Sequence[str | Path]) -> None:
    """Check that the runs hold out the same examples, so scoring them together is fair.

    A run's train/val/test split and its input normalisation come from its ``seed`` and its
    ``data`` settings. If two members differ there, examples held out by one were trained on by
    the other, and the ensemble's (and that member's) score would be inflated.

    Args:
        runs: run directories.

    Raises:
        ValueError: naming the setting that differs and how to fix it.
    """
    from kiln.train.build import resolve_layout

    dirs = [run_dir_of(r) for r in runs]
    cfgs = [read_config(d) for d in dirs]

    def key(i: int) -> dict[str, object]:
        data = cfgs[i].data.model_dump()
        out = {
            f"data.{k}": v for k, v in data.items() if k not in _LOADER_ONLY and k != "split_seed"
        }
        out["data.layout"] = resolve_layout(cfgs[i])
        split = cfgs[i].data.split_seed
        out["split seed (data.split_seed, else seed)"] = (
            split if split is not None else cfgs[i].seed
        )
        return out

    ref = key(0)
    for i in range(1, len(dirs)):
        other = key(i)
        for name, value in ref.items():
            if other[name] != value:
                raise ValueError(
                    f"{dirs[0]} and {dirs[i]} hold out different examples ({name}: {value} vs "
                    f"{other[name]}), so examples held out by one were trained on by the other "
                    "and the scores would be inflated. Score an ensemble "
                    "of runs that share the data settings and the split seed (for a seed "
                    "ensemble, train each member with the same data.split_seed and its own "
                    "seed), or use a snapshot ensemble of one run (--snapshots N)"
                )


def load_ensemble(
    runs: Sequence[str | Path],
    *,
    mode: str = "mean",
    device: str | torch.device = "cpu",
    trust_code: bool = False,
) -> Ensemble:
    """An ensemble of trained runs, each loaded from its ``model.safetensors``.

    Args:
        runs: run directories (or their ``model.safetensors`` files).
        mode: ``mean`` or ``vote`` (see :class:`Ensemble`).
        device: where to put the weights.
        trust_code: allow the runs' ``model.target`` import paths (see :mod:`kiln.trust`).

    Raises:
        ValueError: the runs differ in task, classes, input shape or outputs.
        FileNotFoundError: a path is not a finished run.

    Example:
        >>> ens = load_ensemble(["runs/a", "runs/b", "runs/c"])   # doctest: +SKIP
        >>> ens(x).argmax(-1)                                      # doctest: +SKIP
    """
    from kiln.train.checkpoint.weights import load_model

    if not runs:
        raise ValueError("load_ensemble needs at least one run directory")
    dirs = [run_dir_of(r) for r in runs]
    info = check_compatible([str(d) for d in dirs], [read_data_info(d) for d in dirs])
    models = [load_model(d, device=device, trust_code=trust_code) for d in dirs]
    return Ensemble(models, mode=mode, task=info.task)


def snapshot_paths(run: str | Path, n: int) -> list[Path]:
    """The last ``n`` ``step-*.ckpt`` checkpoints of a run, oldest first.

    Raises:
        ValueError: ``n < 1`` or fewer than ``n`` checkpoints exist (the message lists them).
    """
    if n < 1:
        raise ValueError(f"a snapshot ensemble needs n >= 1 checkpoints, got {n}")
    run_dir = run_dir_of(run)
    folder = run_dir / CHECKPOINTS
    found = checkpoint_files(run_dir)
    if len(found) < n:
        names = ", ".join(p.name for p in found) or "none"
        raise ValueError(
            f"asked for {n} snapshots but {folder} has {len(found)} step-*.ckpt checkpoints "
            f"({names}); ask for fewer, or train with checkpoint.keep_last={n} (and "
            "checkpoint.every_n_steps to save more often than once per epoch)"
        )
    return found[-n:]


def load_snapshots(
    run: str | Path,
    n: int,
    *,
    mode: str = "mean",
    device: str | torch.device = "cpu",
    trust_code: bool = False,
) -> Ensemble:
    """A snapshot ensemble: the last ``n`` checkpoints of one run, as fresh models.

    Each checkpoint (sharded or not) is consolidated into one set of weights and loaded into a
    model rebuilt from the run's config; a ``model.target`` import path there is refused unless
    ``trust_code`` (see :mod:`kiln.trust`).

    Example:
        >>> ens = load_snapshots("runs/digits", 3)   # doctest: +SKIP
    """
    from kiln.train.build import build_model_for
    from kiln.train.checkpoint.weights import consolidate_checkpoint
    from kiln.trust import refuse_file_target

    run_dir = run_dir_of(run)
    paths = snapshot_paths(run_dir, n)
    cfg = read_config(run_dir)
    refuse_file_target(cfg.model.target, run_dir / CONFIG, trust_code=trust_code)
    info = read_data_info(run_dir)
    models = []
    for p in paths:
        model = build_model_for(cfg, info)
        model.load_state_dict(consolidate_checkpoint(p, trust_code=trust_code))
        models.append(model.to(device).eval())
    return Ensemble(models, mode=mode, task=info.task)
