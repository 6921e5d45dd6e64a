"""Base pydantic model shared by every Kiln config section (no torch, no kiln imports)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

__all__ = ["_Strict"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
