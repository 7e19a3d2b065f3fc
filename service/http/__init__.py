"""The HTTP adapter: aiohttp handlers over the service layer."""
