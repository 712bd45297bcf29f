"""Small data and probes shared by the tests."""

from __future__ import annotations

import gc


def chats(n: int = 16) -> list[dict]:
    """A trivially learnable task: always answer 'OK <n>'."""
    return [
        {"messages": [{"role": "user", "content": f"Say the number {i}."},
                      {"role": "assistant", "content": f"OK {i}"}]}
        for i in range(n)
    ]


def live_models() -> int:
    """How many transformers models are still alive in this process."""
    from transformers import PreTrainedModel

    gc.collect()
    return sum(1 for o in gc.get_objects() if isinstance(o, PreTrainedModel))
