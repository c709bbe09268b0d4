"""One webhook attempt: resolve the host, check every address, POST to the checked one.

The steps, all inside one deadline (`webhook_timeout_s`, the whole attempt, not each read):

1. Parse the stored URL (`shared.callback_urls`); one that does not parse fails for good.
2. Resolve its host here, once, and check every address it resolves to against the farm's
   rule (`refusal`); one refused address fails the delivery for good.
3. Connect to the first checked address itself (the URL is rewritten to it, `Host` and, for
   https, SNI and the certificate check keep the name), so no second lookup can lead elsewhere.
4. Send the body and read only the answer's status line and headers: never its body, never a
   redirect.

Whatever goes wrong comes back as an `Outcome` (what happened, and whether trying again could
help), never as an exception, so one delivery's failure ends only that attempt.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import httpx

from shared.callback_urls import (
    CallbackTarget,
    IPAddress,
    IPNetwork,
    host_address,
    parse_callback_url,
    refusal,
)

__all__ = ["Outcome", "post"]

_ERROR_CHARS = 200  # an error from the network stack is cut to this


@dataclass(frozen=True)
class Outcome:
    """An attempt's result: `error` empty when delivered; `permanent` when retrying is futile."""

    error: str = ""
    permanent: bool = False


class _Permanent(Exception):
    """An attempt that no retry can make succeed: a URL that does not parse, a refused address."""


async def post(
    http: httpx.AsyncClient,
    url: str,
    body: bytes,
    headers: Mapping[str, str],
    *,
    allow: Sequence[IPNetwork],
    deadline_s: float,
) -> Outcome:
    """POST `body` to `url` within `deadline_s`, to an address the farm may reach."""
    try:
        target = _target(url)
        async with asyncio.timeout(deadline_s):
            address = await _resolve(target, allow)
            status = await _send(http, target, address, body, headers)
    except _Permanent as e:
        return Outcome(str(e), permanent=True)
    except TimeoutError:
        return Outcome(f"no answer within the {deadline_s:g} s deadline")
    except socket.gaierror as e:
        return Outcome(f"the callback host {target.host!r} does not resolve ({e.strerror})")
    except (httpx.HTTPError, ssl.SSLError, OSError) as e:
        return Outcome(f"{type(e).__name__}: {e}"[:_ERROR_CHARS])
    return Outcome() if 200 <= status < 300 else Outcome(f"the receiver answered HTTP {status}")


def _target(url: str) -> CallbackTarget:
    try:
        return parse_callback_url(url)
    except ValueError as e:  # stored before URLs were parsed at submit, or written by hand
        raise _Permanent(f"the callback URL is not valid: {e}") from e


async def _resolve(target: CallbackTarget, allow: Sequence[IPNetwork]) -> IPAddress:
    literal = host_address(target.host)
    if literal is not None:
        addresses = [literal]
    else:
        loop = asyncio.get_running_loop()
        infos = await loop.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        addresses = []
        for info in infos:
            address = host_address(str(info[4][0]).partition("%")[0])  # drop an IPv6 scope
            if address is not None and address not in addresses:
                addresses.append(address)
    if not addresses:
        raise socket.gaierror(socket.EAI_NONAME, "no addresses")
    for address in addresses:
        why = refusal(address, allow)
        if why is not None:
            raise _Permanent(
                f"the callback host {target.host!r} resolves to {address}, a {why} address; "
                "the farm posts only to public addresses unless SDFARM_WEBHOOK_ALLOW_NETWORKS "
                "holds the network"
            )
    return addresses[0]


async def _send(
    http: httpx.AsyncClient,
    target: CallbackTarget,
    address: IPAddress,
    body: bytes,
    headers: Mapping[str, str],
) -> int:
    try:
        url = httpx.URL(
            scheme=target.scheme,
            host=str(address),
            port=target.port,
            raw_path=target.target.encode(),
        )
    except httpx.InvalidURL as e:
        raise _Permanent(f"the callback URL is not valid: {e}") from e
    request = http.build_request(
        "POST",
        url,
        content=body,
        headers={**headers, "Host": target.host_header, "Connection": "close"},
        extensions={"sni_hostname": target.host},  # https: SNI and the certificate name
    )
    response = await http.send(request, stream=True)
    await response.aclose()  # the status is the answer; its body is never read
    return response.status_code
