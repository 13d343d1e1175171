"""Shared test setup: the `plugin_path` fixture (defined in plugin_env.py) is available to every test."""

pytest_plugins = ["plugin_env"]
