"""
The Python client (treq) and the C{transcoder} command's client side.

It imports nothing of the server: a program that only drives a server does
not load the service's modules.
"""

from transcoder.client.api import Client, ProgressCallback, RemoteJob, TranscoderError

__all__ = ["Client", "ProgressCallback", "RemoteJob", "TranscoderError"]
