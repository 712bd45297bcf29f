"""The notebook session's state, in one explicit object: the `%%lora` setting every training cell uses,
and the one model kept loaded for generation (bounded, so re-running cells does not grow memory)."""

from __future__ import annotations

from .specs import AdapterSpec


class Session:
    def __init__(self):
        self.adapter = AdapterSpec()
        self._loaded: tuple[str, object, object] | None = None  # (key, model, tokenizer)

    def cached_model(self, key: str, load):
        """The model for `key`, loading it with `load()` and dropping any other one kept before."""
        if self._loaded is None or self._loaded[0] != key:
            self.release()
            model, tokenizer = load()
            self._loaded = (key, model, tokenizer)
        return self._loaded[1], self._loaded[2]

    def release(self, key: str | None = None) -> None:
        """Free the kept model (only if it is `key`, when given)."""
        if self._loaded is not None and (key is None or self._loaded[0] == key):
            self._loaded = None
            from .models import free_memory

            free_memory()

    def reset(self) -> None:
        self.adapter = AdapterSpec()
        self.release()


session = Session()
