"""Security headers of the HTML pages the server renders itself (the gallery and a model's card): a
Content-Security-Policy allowing only what each page uses, no MIME sniffing, no framing by other sites."""

from __future__ import annotations

import base64
import hashlib
import re

# The card's images are data: URIs and its only styles are inline; it also carries this policy in a <meta> tag,
# because the gallery opens it from a blob: URL, where no response header applies.
CARD_CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
_NEVER_FRAMED = {"X-Content-Type-Options": "nosniff", "X-Frame-Options": "DENY"}


def card_headers() -> dict[str, str]:
    return {"Content-Security-Policy": f"{CARD_CSP}; frame-ancestors 'none'", **_NEVER_FRAMED}


def gallery_headers(page: str) -> dict[str, str]:
    """The gallery's inline script is allowed by its hash (computed from the page served, so an edit keeps working);
    it fetches the API on this origin and shows images from blob: URLs."""
    hashes = " ".join(f"'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"
                      for script in re.findall(r"<script>(.*?)</script>", page, flags=re.S))
    csp = (f"default-src 'self'; script-src {hashes}; style-src 'unsafe-inline'; img-src 'self' blob: data:; "
           "connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
    return {"Content-Security-Policy": csp, **_NEVER_FRAMED}
