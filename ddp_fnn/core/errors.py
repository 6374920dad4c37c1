"""The user's mistakes, as one exception type every layer raises and the CLI prints."""


class ConfigError(ValueError):
    """A user's setting is wrong; the message is one line naming the option and value."""
