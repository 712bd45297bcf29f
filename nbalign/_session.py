"""The notebook session's state, in one explicit object: the `%%lora` setting later training cells use.

Only the API layer (and the magics above it) read it, and the API writes it INTO each run's spec, so a
spec is the whole run. Users reach it as `nbalign.session` (this module is private so that name stays the
object: `nbalign.session.reset()`).
"""

from __future__ import annotations

from .adapters import AdapterSpec


class Session:
    def __init__(self):
        self.adapter = AdapterSpec()

    def reset(self) -> None:
        """Back to the default adapter, and free the model kept loaded for generation."""
        from .generation import CACHE

        self.adapter = AdapterSpec()
        CACHE.release()

    def __repr__(self) -> str:
        return f"nbalign session: {self.adapter.describe()} for later training cells"


session = Session()
