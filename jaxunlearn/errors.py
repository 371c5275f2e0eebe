"""One exception type for every bad input, so the CLI can print one clear line."""


class JaxUnlearnError(ValueError):
    """A user-facing error: bad data set, bad shapes, bad indices, bad config, ..."""
