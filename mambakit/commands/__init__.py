"""Commands of the CLI that belong to no single part of the library."""
