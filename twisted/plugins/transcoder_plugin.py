"""
The C{twistd transcoder} plugin: C{transcoder.service}'s L{Options} and
C{makeService}, the same pair C{transcoder serve} uses.

This directory is part of the C{twisted.plugins} namespace and must never get
an C{__init__.py}.  Only L{ServiceMaker} is imported here, so listing plugins
(C{twistd --help}) does not import the service.
"""

from twisted.application.service import ServiceMaker

Transcoder = ServiceMaker(
    "Transcoder",
    "transcoder.service",
    "HTTP video transcoding service: uploads streamed to disk, mencoder/ffmpeg jobs.",
    "transcoder",
)
