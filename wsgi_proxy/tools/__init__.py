"""Operator tools, never imported by the server: the command line, the demo, the launcher, usage reports."""
