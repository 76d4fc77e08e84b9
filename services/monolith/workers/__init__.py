"""Background workers of the monolith; each module has `async def run(settings, stop)`."""
