"""schemathesis hooks for scripts/api-contract.sh.

A client sends a fresh Idempotency-Key with each new request and the same key only with a
retry of the same request; the fuzzer draws keys from a small space and would reuse one across
different requests, which the engine rightly refuses (422 `idempotency_key_reused`, tested on
its own in the engine's tests). So a valid key drawn for a case is made unique; an invalid one
is sent as drawn, to be refused.
"""

import itertools
import re

import schemathesis

VALID_KEY = re.compile(r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$")
KEY_LEN_MAX = 255
_counter = itertools.count(1)


@schemathesis.hook
def before_call(context, case, kwargs):
    headers = case.headers or {}
    for name in list(headers):
        if name.lower() != "idempotency-key":
            continue
        key = headers[name]
        if isinstance(key, str) and VALID_KEY.match(key) and len(key) <= KEY_LEN_MAX:
            suffix = f"~{next(_counter)}"
            headers[name] = key[: KEY_LEN_MAX - len(suffix)].rstrip(" ") + suffix
