"""Errors a user can act on. The CLI prints their message alone and exits with status 2."""


class UserError(Exception):
    """Bad input: the message names what is wrong and, where possible, how to fix it."""


class ConfigError(UserError):
    """A configuration file or override is malformed, unknown or inconsistent."""
