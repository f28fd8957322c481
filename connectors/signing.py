"""The key that signs the web console's sessions and the HTTP API's JWTs: ``[console]
signing_key``. The HTTP API (and ``botd token``) read it too; it is declared here, beside the
connectors, so that neither edge imports the other. Light: pydantic and core only.
"""

from __future__ import annotations

from typing import Annotated, ClassVar

from pydantic import Field

from core.config import SingleSection
from core.secrets import Secret, SecretForm


def _signing_key_problem(value: str) -> str:
    return "" if len(value) >= 32 else "a signing key needs at least 32 characters (e.g. `openssl rand -hex 32`)"


class SigningKeySection(SingleSection):
    """The section that holds the signing key (the web console's, ``[console]``)."""

    SECTION: ClassVar[str] = "console"

    signing_key: Annotated[Secret, SecretForm(_signing_key_problem)] | None = Field(
        default=None,
        description="Signs the console's logins and the HTTP API's JWTs (`botd token issue`): a secret reference to "
                    "at least 32 random characters (openssl rand -hex 32).",
        json_schema_extra={"zh": "为控制台登录和 HTTP API 的 JWT（`botd token issue`）签名：指向至少 32 个随机字符"
                                 "的秘密引用（openssl rand -hex 32）。"})
