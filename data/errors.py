"""The one exception type of the data pipeline."""


class DataError(ValueError):
    """Bad data or a bad data setting: a one-line message naming the file, key or value at fault."""
