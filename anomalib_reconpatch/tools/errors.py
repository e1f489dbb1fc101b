"""The errors that the ``reconpatch`` commands report as one line, without a traceback."""

BAD_INPUT_ERRORS = (ValueError, FileExistsError, FileNotFoundError)
"""Bad settings, missing files and existing outputs: the user's to fix, so a traceback would only hide the message."""


def error_text(error: BaseException) -> str:
    """The error's message followed by its notes (``add_note``), which name the files behind many of them."""
    return "\n".join([str(error), *getattr(error, "__notes__", ())])
