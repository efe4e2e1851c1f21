"""The exception for problems with what a user gave (files, flags, configuration, models, bundles): the
command line prints its message and exits with 2. Anything else is a bug in int8mt and keeps its traceback."""


class UserError(ValueError):
    """A problem with the user's input, named in the message with what to do about it."""
