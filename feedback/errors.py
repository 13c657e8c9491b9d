"""The error types every layer shares.

* ``UserError``: a mistake a user can fix. The CLI prints it as one line and
  exits with status 2; anything else is a bug and keeps its traceback.
* ``APIError``: the one error type for everything an HTTP caller gets back
  (gateway, engine, votes, keys): status, message, OpenAI's error ``type``,
  ``param``, ``code`` and extra ``headers`` (``Retry-After``). One function,
  ``serve.protocol.error_body``, renders it in OpenAI's shape.

They live in ``feedback`` because that is the layer every other package may import.
"""

from __future__ import annotations

# OpenAI's error types by status; a status not listed is a server error.
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 408: "invalid_request_error", 409: "invalid_request_error",
               413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
               429: "rate_limit_error",
               503: "server_error"}


class UserError(Exception):
    """Bad input, a missing file or package, a wrong setting: say what to fix."""


class APIError(UserError):
    """An error for an HTTP caller, answered in OpenAI's error shape with this status.

    ``type`` defaults to OpenAI's type for the status, ``code`` to the status itself.
    """

    def __init__(self, status: int, message: str, param: str | None = None, code: int | str | None = None,
                 headers: dict[str, str] | None = None, type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param = status, message, param
        self.code = code if code is not None else status
        self.type = type or ERROR_TYPES.get(status, "server_error")
        self.headers = headers
