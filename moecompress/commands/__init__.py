"""CLI subcommands, one module each; moecompress.cli wires them together."""
