"""sluice: the CLI, configuration and local process launchers that wire the packages together."""

__version__ = "0.1.0"
