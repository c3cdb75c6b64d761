"""The one error type for user mistakes; the CLI prints it as one line and exits with code 2."""


class GlitrError(Exception):
    """A user mistake (bad file, key, recipe or argument), reported without a traceback."""
