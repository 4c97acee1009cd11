"""The `berth` command line: one click group per noun, thin over cli.client."""
