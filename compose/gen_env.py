"""Create compose/.env from compose/.env.example with a fresh random secret per CHANGE_ME.

``make up`` runs it when compose/.env is missing; it never overwrites an existing file.
Standard library only, so it runs with any Python 3 before the venv exists.
"""

from __future__ import annotations

import secrets
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
PLACEHOLDER = "CHANGE_ME"


def main() -> int:
    target = HERE / ".env"
    if target.exists():
        print(f"{target} exists; leaving it as it is")
        return 0
    lines = []
    for line in (HERE / ".env.example").read_text().splitlines():
        name, sep, value = line.partition("=")
        if sep and not line.lstrip().startswith("#") and value.strip() == PLACEHOLDER:
            # URL-safe: no ':' or ',' (REALM_KEYS is KEY:REALM,...) and nothing to quote.
            line = f"{name}={secrets.token_urlsafe(32)}"
        lines.append(line)
    target.write_text("\n".join(lines) + "\n")
    target.chmod(0o600)
    print(f"created {target} with fresh secrets (chmod 600); edit it for real deployments")
    return 0


if __name__ == "__main__":
    sys.exit(main())
