"""The domain: segment and membership rules, shared by the API, the consumer and the reconciler.

Nothing in here imports aiohttp, asyncpg or redis: adapters depend on the domain,
never the reverse.
"""
