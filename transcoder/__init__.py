"""transcoder: an HTTP video transcoding service on Twisted."""

__version__ = "0.1.0"
