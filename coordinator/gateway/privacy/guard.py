"""The privacy stage: before a request is tokenized, decide which node classes may serve it.

    req, classes = guard.check(req, serving)

A request is sensitive when its client says so (`x-meshd-privacy: sensitive`), when its
tenant's policy says every request is (`privacy_always`), or when the detector finds sensitive
content in its text (`[gateway.privacy] enabled`). A request that is not sensitive goes
anywhere (`classes` None). A sensitive one may go only to workers on nodes whose `privacy`
attribute — signed in the node's report and pinned by the operator for its key — is one of the
tenant's `privacy_classes` (else `sensitive_classes`); the choice run routes prefill, decode,
retries and continuations among those workers only, so its KV blocks never leave them. When
no eligible worker serves the model the tenant's (else the config's) action applies: refuse
(403 `sensitive_data_refused`, naming what was found, never the values) or mask (each finding
replaced by `[KIND]`; the request then goes anywhere). A request sensitive only by header or
policy has nothing to mask and is refused. A prompt sent as token ids is read as the model's
tokenizer decodes it (`decode`); masked, it is sent on as the masked text.

Off (`enabled = false`, no header, no `privacy_always`): one header and one policy lookup.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Protocol

import orjson
from prometheus_client.core import CounterMetricFamily
from prometheus_client.registry import Collector, CollectorRegistry

from meshd.coordinator.gateway.governance.config import TenantPolicy
from meshd.coordinator.gateway.governance.metrics import CpuSample
from meshd.coordinator.gateway.http.api_request import ApiRequest
from meshd.coordinator.gateway.http.errors import ApiError
from meshd.coordinator.gateway.http.openai_api import ChatRequest
from meshd.coordinator.gateway.privacy.config import PrivacyConfig
from meshd.coordinator.gateway.privacy.detect import Detector, Scan
from meshd.scheduler.privacy import node_class

HEADER_VALUES = ("sensitive", "auto")
Decode = Callable[[str, Sequence[int]], str]  # (model, token ids) -> text
DECISIONS = ("clean", "restricted", "masked", "refused")


class TenantPrivacy(Protocol):
    """A tenant's privacy settings (the governance policy's `TenantPolicy` has them)."""

    @property
    def privacy_classes(self) -> tuple[str, ...]: ...
    @property
    def privacy_action(self) -> str: ...
    @property
    def privacy_always(self) -> bool: ...


class PrivacyGuard:
    def __init__(self, config: PrivacyConfig,
                 tenant_of: Callable[[str | None], TenantPrivacy] | None = None,
                 decode: Decode | None = None) -> None:
        """`tenant_of(tenant)`: the tenant's policy (None: defaults for all); `decode(model,
        ids)`: the model's tokenizer, to read a token-id prompt (None: such prompts are
        sensitive only by header or policy)."""
        self.config = config
        self.decode = decode
        default = TenantPolicy()
        self.tenant_of = tenant_of or (lambda _t: default)
        self.detector = Detector(config.detectors, config.patterns, config.phone_regions)
        self.decisions = dict.fromkeys(DECISIONS, 0)
        self.findings: dict[str, int] = {}
        self.cpu = CpuSample()  # what the stage costs, timed in place on a sample

    def register(self, registry: CollectorRegistry) -> None:
        registry.register(_Collector(self))

    def describe(self) -> dict[str, Any]:
        return {"enabled": self.config.enabled, "decisions": dict(self.decisions),
                "findings": dict(self.findings),
                "sensitive_classes": list(self.config.sensitive_classes),
                "action": self.config.action,
                "cost_us": {"check": self.cpu.mean_us(), "samples": self.cpu.samples,
                            "every": CpuSample.EVERY}}

    def check(self, req: ApiRequest, serving: Callable[[str], Iterable[Any]]
              ) -> tuple[ApiRequest, frozenset[str] | None]:
        """`req` (masked, when that is the action taken) and the node classes it may use (None:
        any). `serving(model)`: the attributes of the nodes of every worker serving it now.
        Raises ApiError (400 for a bad header, 403 for a refused request)."""
        t0 = self.cpu.start()
        out = self._check(req, serving)
        if t0:
            self.cpu.stop(t0)
        return out

    def _check(self, req: ApiRequest, serving: Callable[[str], Iterable[Any]]
               ) -> tuple[ApiRequest, frozenset[str] | None]:
        pol = self.tenant_of(req.tenant)
        if not (self.config.enabled or req.privacy or pol.privacy_always):  # off: no more
            self.decisions["clean"] += 1
            return req, None
        if req.privacy not in ("", "auto", "sensitive"):
            raise ApiError(400, f"x-meshd-privacy must be one of {', '.join(HEADER_VALUES)}, "
                           f"got {req.privacy!r}.", code="invalid_privacy_header")
        read = req  # a token-id prompt is scanned (and masked) as the text it encodes
        if self.config.enabled and self.decode is not None and _token_prompt(req):
            with contextlib.suppress(ValueError, IndexError, KeyError, OverflowError):
                read = as_text(req, self.decode)  # ids it cannot decode are refused later
        scan = self.detector.scan(texts(read)) if self.config.enabled else Scan(())
        for kind, n in scan.kinds().items():
            self.findings[kind] = self.findings.get(kind, 0) + n
        declared = req.privacy == "sensitive" or pol.privacy_always
        if not (declared or scan.sensitive):
            self.decisions["clean"] += 1
            return req, None
        classes = frozenset(pol.privacy_classes or self.config.sensitive_classes)
        if any(node_class(attrs) in classes for attrs in serving(req.body.model)):
            self.decisions["restricted"] += 1
            return req, classes
        why = (", ".join(f"{k} x{n}" for k, n in sorted(scan.kinds().items()))
               if scan.sensitive else "marked sensitive")
        if (pol.privacy_action or self.config.action) == "mask" and scan.sensitive \
                and not declared:
            self.decisions["masked"] += 1
            return mask_request(read, self.detector), None
        self.decisions["refused"] += 1
        who = f"tenant {req.tenant!r}" if req.tenant else "this gateway"
        raise ApiError(403, f"This request holds sensitive data ({why}) and {who} may send it "
                       f"only to nodes of class {', '.join(sorted(classes))}; none serves "
                       f"model {req.body.model!r} now.", err_type="permission_error",
                       code="sensitive_data_refused")


def _token_prompt(req: ApiRequest) -> bool:
    return not isinstance(req.body, ChatRequest) and isinstance(req.body.prompt, tuple)


def as_text(req: ApiRequest, decode: Decode) -> ApiRequest:
    """`req` with its token-id prompt replaced by the text the model's tokenizer decodes."""
    body = req.body
    assert not isinstance(body, ChatRequest) and isinstance(body.prompt, tuple)
    text = decode(body.model, body.prompt)
    return dataclasses.replace(req, body=dataclasses.replace(body, prompt=text),
                               payload={**req.payload, "prompt": text})


def texts(req: ApiRequest) -> list[str]:
    """The request's text as the detector reads it: a chat's message contents, or a text
    prompt (a token-id prompt is decoded first, `as_text`; without a tokenizer it has no
    text: only the header or policy marks it)."""
    body = req.body
    if isinstance(body, ChatRequest):
        return [m.content for m in body.messages if m.content]
    return [body.prompt] if isinstance(body.prompt, str) else []


def mask_request(req: ApiRequest, detector: Detector) -> ApiRequest:
    """`req` with every finding in its text replaced by `[KIND]`: body, payload and raw."""
    body, payload = req.body, dict(req.payload)
    if isinstance(body, ChatRequest):
        msgs = [dataclasses.replace(m, content=detector.mask(m.content)[0]) if m.content else m
                for m in body.messages]
        if body.conversation is None:
            payload["messages"] = [_masked_message(raw, m.content)
                                   for raw, m in zip(payload["messages"], msgs, strict=True)]
        else:  # the text is the conversation's, masked below: none is left in the payload
            payload = {k: v for k, v in payload.items() if k not in _TEXT_FIELDS}
        new_body: Any = dataclasses.replace(body, messages=tuple(msgs))
        if body.conversation is not None:  # the prompt is rendered from it: mask it too
            from meshd.coordinator.gateway.privacy.conversation import mask_conversation

            new_body = dataclasses.replace(new_body, conversation=mask_conversation(
                body.conversation, lambda t: detector.mask(t)[0]), prefill=detector.mask(
                body.prefill)[0] if body.prefill else "")
    else:
        assert isinstance(body.prompt, str)
        text = detector.mask(body.prompt)[0]
        payload["prompt"] = text
        new_body = dataclasses.replace(body, prompt=text)
    return dataclasses.replace(req, body=new_body, payload=payload, raw=orjson.dumps(payload))


_TEXT_FIELDS = frozenset({"messages", "input", "system", "instructions"})


def _masked_message(raw: Any, content: str | None) -> Any:
    if not isinstance(raw, dict) or content is None:
        return raw
    return {**raw, "content": content}  # text parts become the masked joined text


class _Collector(Collector):
    def __init__(self, guard: PrivacyGuard) -> None:
        self.guard = guard

    def collect(self) -> Any:
        d = CounterMetricFamily("meshd_privacy_requests", "Privacy routing decisions: clean "
                                "(anywhere), restricted (eligible nodes only), masked, refused.",
                                labels=["decision"])
        for k, v in self.guard.decisions.items():
            d.add_metric([k], v)
        yield d
        f = CounterMetricFamily("meshd_privacy_findings", "Sensitive items found in prompts, "
                                "by kind.", labels=["kind"])
        for k, v in sorted(self.guard.findings.items()):
            f.add_metric([k], v)
        yield f
