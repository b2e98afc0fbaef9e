"""The hot path, one file per step a request takes:

- `handler.py`  the aiohttp handler: request id, shutdown and key checks, errors out;
- `auth.py`     the client API key;
- `parse.py`    the body into model, stream flag, session key (pure; `json_limits.py`,
                `multipart.py` bound it before parsing);
- `dispatch.py` admission, candidates, the policy's pick, retries, waiting for room;
- `attempt.py`  one attempt on one engine, and the one place that accounts for it;
- `relay.py`    the exchange with the engine and the answer to the client (`headers.py`
                says which headers cross);
- `failures.py` how an attempt fails and which failures retry.

The network below is `deepinfer_router/upstream/` (keep-alive pools, HTTP/1.1 framing).
"""

from .auth import check_api_key
from .handler import Proxy, request_id
from .parse import max_body_bytes

__all__ = ["Proxy", "check_api_key", "max_body_bytes", "request_id"]
