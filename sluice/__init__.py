"""sluice: the CLI, the run config that composes every package's section, the demo and the report."""

__version__ = "0.1.0"
