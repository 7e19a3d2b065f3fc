"""Typed async client of the user-segments HTTP API.

Usage::

    async with SegmentsClient("http://user-segments:8080", token="...") as client:
        await client.create_segment("VOICE_MESSAGES")
        await client.update_user_segments(1000, add=["VOICE_MESSAGES"])
        print(await client.get_user_segments(1000))  # ['VOICE_MESSAGES']

Results are msgspec Structs (``models``), errors subclasses of ``SegmentsError``, one
per error code of the API (``errors``); 429 and 503 answers are retried honouring
``Retry-After`` (``client``).  The names exported here are the client's and every name
of ``errors`` and ``models`` (their ``__all__``).
"""

from user_segments_client import errors, models
from user_segments_client.client import BATCH_MAX_USERS, VERSION, SegmentsClient
from user_segments_client.errors import *  # noqa: F403  (the names in errors.__all__)
from user_segments_client.models import *  # noqa: F403  (the names in models.__all__)

__version__ = VERSION

__all__ = ["BATCH_MAX_USERS", "SegmentsClient", "__version__", *errors.__all__, *models.__all__]
