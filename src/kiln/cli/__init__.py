"""The ``kiln`` command line: one module per verb, each thin over the library."""
