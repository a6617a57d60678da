"""pytest plugin entry point (``pytest11``); the ``discord_emulator`` fixture lands with the emulator."""
