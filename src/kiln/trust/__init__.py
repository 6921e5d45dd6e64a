"""What Kiln may import or run from files it reads: nothing the user did not choose.

A run directory, a ``model.safetensors``, a checkpoint or an exported ``.pt2`` may come from
someone else. Reading one must never run code that the file names:

* :mod:`kiln.trust.targets`: a model rebuilt from a file uses a registry name
  (``model.name``); an import path (``model.target``) read from a file is refused unless the user
  opts in (``--trust-code`` / ``trust_code=True``) or gave that same path themselves, and any
  target is checked to be an ``nn.Module`` subclass or a model factory *before* it is called.
* :mod:`kiln.trust.pt2`: an exported ``.pt2`` is inspected before ``torch.export.load``: entries
  that torch would unpickle with ``weights_only=False`` (or native code) are refused.

Both raise :class:`kiln.errors.UnsafeFileError`; the message names what was refused and the
opt-in. This package imports torch only inside the checks that need it.

Example:
    >>> from kiln.trust import refuse_file_target
    >>> refuse_file_target(None, "runs/x/model.safetensors", trust_code=False)  # a registry name
"""

from __future__ import annotations

from kiln.trust.pt2 import check_pt2
from kiln.trust.targets import TRUST_OPTION, check_model_target, refuse_file_target

__all__ = ["TRUST_OPTION", "check_model_target", "check_pt2", "refuse_file_target"]
