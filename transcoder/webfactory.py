"""
The root resource for the stock web server:

    twistd -n web --listen tcp:8080 --class transcoder.webfactory.resource

configured from the C{TRANSCODER_*} variables that C{tap.py} reads
(C{--listen} then belongs to C{twistd web}; C{TRANSCODER_LISTEN} is unused).

C{twistd web} builds a plain L{twisted.web.server.Site}, so the project's
streaming request is not installed: stock Twisted spools every body to a
temporary file before any resource runs (the resource copies it from there),
and parses multipart bodies into memory as well.  The C{twistd transcoder}
plugin has neither cost and is the recommended deployment; see
docs/deployment.md for measured figures.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import IServiceCollection
from twisted.web.resource import IResource
from twisted.web.server import Site

from transcoder._env import options_from_env
from transcoder.service import Options, makeService


def build_resource(options: Options, reactor: Any) -> IResource:
    """
    The root resource of the service described by C{options}.  Everything
    C{makeService} builds but its listener (the job registry and whatever
    else it runs) starts once C{reactor} runs and stops before it shuts down.
    """
    top = makeService(options, reactor)
    listeners = [s for s in IServiceCollection(top) if isinstance(s, StreamServerEndpointService)]
    if len(listeners) != 1 or not isinstance(listeners[0].factory, Site):
        raise RuntimeError("makeService no longer has exactly one HTTP listener")
    (listener,) = listeners
    # twistd web listens itself; the rest of the service runs as under twistd transcoder.
    listener.disownServiceParent()

    def stop() -> Any:
        return top.stopService() if top.running else None

    reactor.callWhenRunning(top.startService)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    root: IResource = listener.factory.resource
    return root


def resource() -> IResource:
    """The zero-argument factory for C{twistd web --class}."""
    from twisted.internet import reactor

    return build_resource(options_from_env(os.environ), reactor)
