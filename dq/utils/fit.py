"""The warnings Lightning gives every `trainer.fit` of dq's apps that no setting of dq can act on."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def known_fit_warnings(*messages: str) -> Iterator[None]:
    """Around `trainer.fit`: hide the warnings every dq fit gives (in-memory tensors need no loader workers; torch's
    deprecation raised inside Lightning's own code) and those whose message matches one of the `messages` regexes."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", ".*does not have many workers.*")
        warnings.filterwarnings("ignore", r".*isinstance\(treespec, LeafSpec\)` is deprecated.*", FutureWarning)
        for message in messages:
            warnings.filterwarnings("ignore", message)
        yield
