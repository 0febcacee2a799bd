"""Checking another LoRA implementation against the reference, and the golden vectors.

A package above ``train`` and ``hf`` (it reads Hugging Face and PEFT directories through
``minilora.hf`` and runs minilora's model as the reference). One function per job:

- [`check_merge`][]: a merged model against base + adapter, tensor by tensor;
- [`check_logits`][]: someone's logits against the reference forward, position by position;
- [`write_vectors`][]: the golden vectors, a versioned set of inputs and float64 references.
"""

from minilora.check.logits import check_logits
from minilora.check.merge import check_merge
from minilora.check.report import EXACT, ROUND_OFF, UNRESOLVABLE, VERDICTS, WRONG, Report, Row
from minilora.check.vectors import VECTORS_VERSION, write_vectors

__all__ = ["EXACT", "ROUND_OFF", "UNRESOLVABLE", "VECTORS_VERSION", "VERDICTS", "WRONG", "Report",
           "Row", "check_logits", "check_merge", "write_vectors"]
