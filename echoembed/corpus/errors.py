"""The corpus job's own user errors (both are ``UserError``s: the CLI prints them, exit 2)."""

from __future__ import annotations

from echoembed.errors import InputError, UserError


class CorpusJobError(UserError):
    """OUT_DIR holds another job's output (other artifact, template, input or sharding), or is
    not an embed-corpus directory; the message says what differs and that ``--force`` clears it."""


class BadRowError(InputError):
    """A row cannot be embedded under ``on_bad_row="error"``; the message names the file, the
    line (or Parquet row), the id and the reason."""
