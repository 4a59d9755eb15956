"""Identity audit: find and repair text in which the speaker claims to be another model.

    from dsv3.audit import Auditor
    auditor = Auditor(identity="dsv3", creator="the dsv3 authors")   # both optional, these defaults
    auditor.find(text)     # -> list[Finding] with start, end, text, language, reason, pattern, slots
    auditor.fix(text)      # -> (repaired text, or None when the text must be dropped; log lines)

Both take `assistant=True` for an assistant's turn of a chat. Files and folders (plain text, JSONL
text fields, chat records) are scanned by `dsv3.audit.scan` and the `dsv3 audit` command. The
language data lives in `dsv3/audit/lang/`, one file per language.
"""

from dsv3.audit.auditor import CREATOR, IDENTITY, Auditor, Finding, Slot

__all__ = ["CREATOR", "IDENTITY", "Auditor", "Finding", "Slot"]
