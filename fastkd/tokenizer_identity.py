"""What makes two tokenizers the same for a cache: the corpus cache and GLUE's tokenized tasks key on
it (both import it from here: neither module has to import the other)."""

from __future__ import annotations

import hashlib
import json


def tokenizer_fingerprint(tokenizer) -> str:
    """Identity of a tokenizer's behaviour: class, vocabulary, casing, backend pipeline."""
    h = hashlib.sha256()
    h.update(type(tokenizer).__name__.encode())
    h.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    h.update(repr(getattr(tokenizer, "do_lower_case", None)).encode())
    if getattr(tokenizer, "backend_tokenizer", None) is not None:
        # Without the truncation/padding settings: each call of the tokenizer sets them on the
        # backend, so they would change the key between two loads of one corpus in one process.
        backend = json.loads(tokenizer.backend_tokenizer.to_str())
        backend.pop("truncation", None)
        backend.pop("padding", None)
        h.update(json.dumps(backend, sort_keys=True).encode())
    return h.hexdigest()[:16]
