"""Wire types, model ids, sampling: the only code every role shares. No I/O here."""
