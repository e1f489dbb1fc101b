"""The errors that the ``reconpatch`` commands report as one line, without a traceback."""

BAD_INPUT_ERRORS = (ValueError, FileExistsError, FileNotFoundError)
"""Bad settings, missing files and existing outputs: the user's to fix, so a traceback would only hide the message."""
