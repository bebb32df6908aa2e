"""User-facing errors.

Everything that is the user's fault (bad names, shapes, ranges, missing files)
raises :class:`FewstepError` with a message that says what was wrong and how to
fix it. The CLI prints these without a traceback.
"""


class FewstepError(Exception):
    """An error caused by input the user can fix; the message says how."""


def check(condition: bool, message: str) -> None:
    """Raise :class:`FewstepError` with ``message`` unless ``condition`` holds."""
    if not condition:
        raise FewstepError(message)
