"""Preference data in: load any supported source into one canonical table of pairs,
and find cheap data-quality problems before anything expensive runs.

One concern a module, in the order data flows through them:

- ``sources``: files, directories, standard input and hub datasets -> ``(line, record)``,
  streaming, with the per-record size bound (``MAX_RECORD_BYTES``);
- ``transcripts``: HH-RLHF transcripts to and from ``{"role", "content"}`` messages;
- ``schemas``: the four record schemas (``config.Schema``) and their detection, the canonical
  pair (``PAIR_SCHEMA``) and its digests (``pair_digest``: "the same pair");
- ``readers``: ``PairReader``, ``iter_pairs``, ``load_pairs`` and ``spool_pairs``: records -> pairs;
- ``table``: ``PairTable``, a scan's pairs with their texts in a temporary file;
- ``quality``: the cheap data-quality findings (``find_quality_issues``);
- ``validation``: ``validate_dataset``, what ``safer-audit validate`` prints;
- ``tokens``: the token counters the truncation check and ``scan`` share.

The names below are the package's public ones: import them from ``safer_audit.data``.
"""

from ..config import MAX_RECORD_BYTES
from ..errors import DataError, DataErrors
from .quality import FINDING_KINDS, QualityFinding, find_quality_issues
from .readers import LoadResult, PairReader, iter_pairs, load_pairs, spool_pairs
from .schemas import MESSAGES_TYPE, PAIR_ID_LENGTH, PAIR_SCHEMA, Conversations, pair_digest
from .sources import HUB_PREFIX, STDIN, TABLE, is_table, source_name
from .table import PairTable, pair_frame, response_lengths
from .tokens import token_counter, tokenizer_counter
from .transcripts import ROLES, parse_hh_transcript, render_transcript
from .validation import ValidationSummary, validate_dataset

__all__ = [
    "FINDING_KINDS", "HUB_PREFIX", "MAX_RECORD_BYTES", "MESSAGES_TYPE", "PAIR_ID_LENGTH", "PAIR_SCHEMA", "ROLES",
    "STDIN", "TABLE", "Conversations", "DataError", "DataErrors", "LoadResult", "PairReader", "PairTable", "QualityFinding",
    "ValidationSummary", "find_quality_issues", "is_table", "iter_pairs", "load_pairs", "pair_digest", "pair_frame", "parse_hh_transcript",
    "render_transcript", "response_lengths", "source_name", "spool_pairs", "token_counter", "tokenizer_counter", "validate_dataset",
]
