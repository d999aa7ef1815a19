"""The one error family for mistakes a user can fix; the CLI prints its message as one line."""


class TuneFactoryError(Exception):
    """A user-fixable problem: the message says what was wrong, where, and what to do."""


class RecipeError(TuneFactoryError):
    """A recipe key is unknown, mistyped, or combined with an incompatible option."""


class DataError(TuneFactoryError):
    """A dataset file or row cannot be read or aligned."""


class ModelError(TuneFactoryError):
    """A model source cannot be found or loaded."""
