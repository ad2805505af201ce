"""The one exception type for bad user input."""


class UserError(Exception):
    """Bad input from the user (a file, a column, a value, an option).

    The CLI reports it as one line on stderr and exits with code 2, without a traceback.
    The message must name the culprit: the file, the field and the offending value.
    """
