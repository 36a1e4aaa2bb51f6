"""Webhooks: the calling API key's secret for verifying the signed job notifications."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from app.api.deps import CallerDep, WebhooksDep, require_api_key
from app.api.schemas import ErrorPublic, WebhookSecretPublic
from app.engine.webhooks import key_secret

router = APIRouter(prefix="/v1/webhooks", tags=["jobs"], dependencies=[Depends(require_api_key)],
                   responses={code: {"model": ErrorPublic} for code in (401, 403)})


@router.get("/secret", summary="Your webhook secret", response_model=WebhookSecretPublic,
            description="The secret that signs the notifications of your jobs' `callback_url`: each POST carries "
                        "`X-Synthgen-Signature: t=<unix seconds>,v1=<hex>` where hex is HMAC-SHA256 of "
                        "`<t>.<raw body>` under this secret. Reject a stale `t` to stop replays.")
async def get_webhook_secret(caller: CallerDep, webhooks: WebhooksDep) -> WebhookSecretPublic:
    return WebhookSecretPublic(secret=key_secret(webhooks.master, caller.owner))
