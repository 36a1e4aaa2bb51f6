"""The Python client of a synthgen server (httpx, numpy and tqdm only).

    from synthgen_client import Client
    with Client("http://127.0.0.1:8000") as client:
        images, labels = client.generate("mnist-cgan", n=64, label="7", seed=0)
"""

from synthgen_client.aio import AsyncClient
from synthgen_client.errors import (
    AuthenticationError,
    ConflictError,
    InvalidRequestError,
    JobFailedError,
    NotFoundError,
    OverloadedError,
    RateLimitedError,
    ServerError,
    SynthgenError,
)
from synthgen_client.sync import Client

__version__ = "0.1.0"
__all__ = ["AsyncClient", "AuthenticationError", "Client", "ConflictError", "InvalidRequestError", "JobFailedError",
           "NotFoundError", "OverloadedError", "RateLimitedError", "ServerError", "SynthgenError"]
