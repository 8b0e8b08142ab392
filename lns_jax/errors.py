"""The error types shared across the package's floors (this module imports nothing of lns_jax).

:class:`ConfigError` is raised by :mod:`lns_jax.config`'s checks and by the lower
modules that check the part of a config they own (``lns_jax.models``,
``lns_jax.data``); it lives here so that they need not import :mod:`lns_jax.config`,
which imports them for the allowed values. ``lns_jax.config.ConfigError`` is the
same class.
"""


class ConfigError(ValueError):
  """A config value is invalid; the message names the field and what is allowed."""
