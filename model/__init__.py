"""MiniMind: the shared package every numbered script imports."""
