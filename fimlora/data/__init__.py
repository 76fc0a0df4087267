"""Calibration data, in three eager, in-memory stages (calibration needs only a few batches):
`read_examples` (file or Hub dataset -> `TextExamples`, in ``readers``), `encode_examples`
(-> one dict of 1-D tensors per example, in ``encoding``) and `make_batches` (-> padded
batches, in ``batches``). The built-in demo set, ``builtin_sentiment.jsonl``, is a resource of
this package (``importlib.resources.files("fimlora.data")``)."""

from .batches import collate, make_batches, pad_token_id_for
from .encoding import encode_examples, label_ids
from .readers import SUPPORTED_EXTENSIONS, TextExamples, builtin_examples, read_examples

__all__ = [
    "SUPPORTED_EXTENSIONS",
    "TextExamples",
    "builtin_examples",
    "collate",
    "encode_examples",
    "label_ids",
    "make_batches",
    "pad_token_id_for",
    "read_examples",
]
