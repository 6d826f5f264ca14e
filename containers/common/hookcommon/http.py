"""HTTP GETs through the proxies given on the kernel command line (needs requests)."""

from __future__ import annotations

import re

import requests
from requests.utils import should_bypass_proxies

from hookcommon.cmdline import HookConfig
from hookcommon.log import reason

TIMEOUT = (5.0, 15.0)  # connect, read


def proxies_for(url: str, cfg: HookConfig) -> dict[str, str]:
    """The cmdline proxies for url, none when NO_PROXY matches it."""
    if should_bypass_proxies(url, no_proxy=cfg.no_proxy):
        return {}
    proxies = {"http": cfg.http_proxy, "https": cfg.https_proxy}
    return {scheme: proxy for scheme, proxy in proxies.items() if proxy}


def describe(exc: requests.RequestException) -> str:
    """Why a request failed, in a few words (urllib3's nested wrappers stripped)."""
    if isinstance(exc, requests.HTTPError) and exc.response is not None:
        return f"HTTP {exc.response.status_code} {exc.response.reason}"
    if isinstance(exc, requests.Timeout):
        return "timed out"
    errno = re.search(r"\[Errno -?\d+\] ([^'\")\]]+)", str(exc))
    if isinstance(exc, requests.ConnectionError):
        return f"cannot connect ({errno.group(1).strip() if errno else reason(exc)})"
    return reason(exc)


def get(url: str, cfg: HookConfig, *, user_agent: str) -> requests.Response:
    """GET url (cmdline proxies, not the environment's); raise for an HTTP error status."""
    with requests.Session() as session:
        session.trust_env = False
        response = session.get(url, proxies=proxies_for(url, cfg), timeout=TIMEOUT,
                               headers={"User-Agent": user_agent})
        response.raise_for_status()
        return response
