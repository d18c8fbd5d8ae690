"""schemathesis hooks for scripts/api-contract.sh.

A client sends a fresh Idempotency-Key with each new request and the same key only with a
retry of the same request; the fuzzer draws keys from a small space and would reuse one across
different requests, which the engine rightly refuses (422 `idempotency_key_reused`, tested on
its own in the engine's tests). So a valid key drawn for a case is made unique; an invalid one
is sent as drawn, to be refused.

The payment provider signs its webhook (`Tcore-Signature: t=<unix s>,v1=<hex HMAC-SHA256 of
"t.body">`) with the secret in TCORE_CONTRACT_WEBHOOK_SECRET: a case that carries the header is
sent signed, as the provider would send it, so the fuzzer reaches the event's own checks; a case
without it is sent without, to be refused.
"""

import hashlib
import hmac
import itertools
import json
import os
import re
import time

import schemathesis

VALID_KEY = re.compile(r"^[\x21-\x7e]([\x20-\x7e]*[\x21-\x7e])?$")
KEY_LEN_MAX = 255
_counter = itertools.count(1)


WEBHOOK_PATH = "/v1/payments/webhook"
SIGNATURE_HEADER = "tcore-signature"


def sign_webhook(case, kwargs):
    secret = os.environ.get("TCORE_CONTRACT_WEBHOOK_SECRET", "").encode()
    headers = case.headers or {}
    names = [name for name in headers if name.lower() == SIGNATURE_HEADER]
    if not secret or not names or not isinstance(case.body, (dict, list, str, int, float, bool, type(None))):
        return
    body = json.dumps(case.body).encode()
    at = int(time.time())
    signature = hmac.new(secret, f"{at}.".encode() + body, hashlib.sha256).hexdigest()
    for name in names:
        headers[name] = f"t={at},v1={signature}"
    headers["Content-Type"] = "application/json"
    # The signed bytes are the bytes sent.
    kwargs["json"] = None
    kwargs["data"] = body


@schemathesis.hook
def before_call(context, case, kwargs):
    if case.operation.path == WEBHOOK_PATH:
        sign_webhook(case, kwargs)
    headers = case.headers or {}
    for name in list(headers):
        if name.lower() != "idempotency-key":
            continue
        key = headers[name]
        if isinstance(key, str) and VALID_KEY.match(key) and len(key) <= KEY_LEN_MAX:
            suffix = f"~{next(_counter)}"
            headers[name] = key[: KEY_LEN_MAX - len(suffix)].rstrip(" ") + suffix
