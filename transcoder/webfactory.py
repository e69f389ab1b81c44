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
from transcoder.service import Options, RegistryService, makeService


def build_resource(options: Options, reactor: Any) -> IResource:
    """
    The root resource of the service described by C{options}, with its job
    registry started once C{reactor} runs and stopped before it shuts down.
    The service's own listener is never started.
    """
    services = list(IServiceCollection(makeService(options, reactor)))
    registries = [s for s in services if isinstance(s, RegistryService)]
    sites = [
        s.factory
        for s in services
        if isinstance(s, StreamServerEndpointService) and isinstance(s.factory, Site)
    ]
    if len(registries) != 1 or len(sites) != 1:
        raise RuntimeError("makeService no longer has one registry and one site")
    registry, site = registries[0], sites[0]

    def stop() -> Any:
        return registry.stopService() if registry.running else None

    reactor.callWhenRunning(registry.startService)
    reactor.addSystemEventTrigger("before", "shutdown", stop)
    root: IResource = site.resource
    return root


def resource() -> IResource:
    """The zero-argument factory for C{twistd web --class}."""
    from twisted.internet import reactor

    return build_resource(options_from_env(os.environ), reactor)
