"""MiniMind: the shared package every numbered script imports."""

from .quiet import silence_library_noise

# Here rather than in each script, so no entry point (scripts, API server, streamlit page) can forget it.
silence_library_noise()
