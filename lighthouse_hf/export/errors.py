"""What ``export_checkpoint`` raises and warns."""


class ExportError(ValueError):
    """Bad input (SRC, adapter, DST or an option); raised before anything is written."""


class VerificationError(RuntimeError):
    """The written checkpoint failed verification; it was removed and DST left untouched."""


class ExportWarning(UserWarning):
    """Something the user should know about an export that went through."""


class UnrecoveredCheckpointWarning(ExportWarning):
    """The source was trained with Lighthouse but never ran the dense recovery phase."""


class InterruptedExportWarning(ExportWarning):
    """An earlier export to the same DST was killed; this one cleaned up or completed after it."""
