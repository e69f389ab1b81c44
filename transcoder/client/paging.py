"""
Every job of C{GET /jobs}, page after page: the server gives 50 at a time
by default and a cursor to the next page, which a list must follow rather
than stop at the first.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Generator
from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred

from transcoder.client.jobs import RemoteJob

if TYPE_CHECKING:
    from transcoder.client.api import Client

# The server's largest page.
MAX_PAGE = 500


class JobList:
    """
    The jobs of L{Client.jobs}: C{async for job in client.jobs()} fetches a
    page when the previous one is used up; C{await client.jobs()} gives the
    whole list.
    """

    def __init__(self, client: Client, state: str | None, page_size: int) -> None:
        if not 1 <= page_size <= MAX_PAGE:
            raise ValueError(f"page_size is 1 to {MAX_PAGE}, not {page_size}")
        self._client = client
        self._state = state
        self._page_size = page_size

    async def __aiter__(self) -> AsyncIterator[RemoteJob]:
        cursor: str | None = None
        while True:
            jobs, cursor = await self._client.page(self._state, self._page_size, cursor)
            for job in jobs:
                yield job
            if cursor is None or not jobs:
                return

    def all(self) -> Deferred[list[RemoteJob]]:
        """Every page's jobs, in one list."""
        return Deferred.fromCoroutine(self._all())

    async def _all(self) -> list[RemoteJob]:
        return [job async for job in self]

    def __await__(self) -> Generator[Any, None, list[RemoteJob]]:
        return self.all().__await__()
