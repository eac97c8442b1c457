"""User-facing errors: one line that names the file, key or tensor and what was expected."""


class DsvError(Exception):
    """An error caused by the user's input (checkpoint, config, prompt, flag).

    The CLI prints ``str(err)`` on one line and exits non-zero, without a traceback
    unless ``--debug`` is given.
    """


class CheckpointError(DsvError):
    """A checkpoint folder, shard, header or tensor is missing or malformed."""


class ConfigError(DsvError):
    """config.json is missing a key, or its values contradict each other."""
