"""Runs agent-written code in an isolated child process. Filled by the lifecycle issue (#3)."""
