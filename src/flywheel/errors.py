"""The one refusal type the stages raise; the edges turn it into an OpenAI-style error."""

from __future__ import annotations


class ServiceError(Exception):
    """A refused operation; ``status_code`` is the HTTP status the edges answer with, ``code``
    the machine-readable reason and ``param`` the field at fault, when there is one."""

    def __init__(
        self, status_code: int, message: str, code: str | None = None, param: str | None = None
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.code = code
        self.param = param
