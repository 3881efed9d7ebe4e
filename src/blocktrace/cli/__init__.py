"""Command-line interface: one module per command, argument handling only."""
