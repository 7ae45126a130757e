"""The admin token: when SERVING_ADMIN_TOKEN is set, state-changing endpoints need
`Authorization: Bearer <token>` (401 without credentials, 403 with wrong ones); prediction and
read-only routes stay open."""

from __future__ import annotations

import hmac

from fastapi import HTTPException, Request


def require_admin(request: Request) -> None:
    """A route dependency; compares in constant time."""
    token = request.app.state.settings.serving_admin_token
    if token is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        raise HTTPException(401, detail="this endpoint needs 'Authorization: Bearer <SERVING_ADMIN_TOKEN>'",
                            headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.strip().encode(), token.get_secret_value().encode()):
        raise HTTPException(403, detail="the bearer token is not the admin token")
