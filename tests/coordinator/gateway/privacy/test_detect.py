"""The privacy detector, table-driven: each kind found (and confirmed by its validator), near
misses not found, operator regexes, masking, and the config's errors."""

from __future__ import annotations

import pytest

from meshd.coordinator.gateway.privacy.config import DETECTORS, PrivacyConfig
from meshd.coordinator.gateway.privacy.detect import Detector

DET = Detector(DETECTORS, {"employee_id": r"\bEMP-\d{6}\b"}, ("US", "GB"))


@pytest.mark.parametrize(("text", "kinds"), [
    ("mail jane.doe+tag@example.co.uk today", {"email": 1}),
    ("call +1 415-555-2671 or (212) 555-0199", {"phone": 2}),
    ("ring +44 20 7946 0958 after six", {"phone": 1}),
    ("card 4111 1111 1111 1111 exp 12/29", {"credit_card": 1}),
    ("amex 3782-822463-10005", {"credit_card": 1}),
    ("pay DE89 3704 0044 0532 0130 00 now", {"iban": 1}),
    ("GB82WEST12345698765432", {"iban": 1}),
    ("ssn 123-45-6789", {"national_id": 1}),
    ("hosts 10.0.0.12 and 2001:db8::1", {"ip_address": 2}),
    ("key AKIAIOSFODNN7EXAMPLE", {"secret": 1}),
    ("token ghp_" + "a" * 36, {"secret": 1}),
    ("sk-ant-" + "x" * 30 + " leaked", {"secret": 1}),
    ("-----BEGIN RSA PRIVATE KEY-----\nMIIE", {"secret": 1}),
    ("jwt eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.dozjgNryP4J3jVmNHl0w5N", {"secret": 1}),
    ("badge EMP-123456", {"employee_id": 1}),
])
def test_found(text: str, kinds: dict[str, int]) -> None:
    assert DET.scan([text]).kinds() == kinds


@pytest.mark.parametrize("text", [
    "The quick brown fox jumps over the lazy dog.",
    "Meet at 3:45 on 2024-01-02; version 1.2.3; 1,234 items at $56.78.",
    "order 4111 1111 1111 1112",  # fails Luhn
    "DE89 3704 0044 0532 0130 01",  # fails the IBAN checksum
    "ssn 000-12-3456 and 666-12-3456",  # never issued
    "999.1.1.1 is not an address",
    "call 555-0199",  # too short for a phone number
    "an email-like user@localhost",
    "sk-short",
])
def test_not_found(text: str) -> None:
    assert DET.scan([text]).kinds() == {}


def test_mask_replaces_each_finding_and_keeps_the_rest() -> None:
    text = "Hi, I am jane@example.com, card 4111 1111 1111 1111, from 10.0.0.12."
    masked, scan = DET.mask(text)
    assert masked == "Hi, I am [EMAIL], card [CREDIT_CARD], from [IP_ADDRESS]."
    assert scan.kinds() == {"email": 1, "credit_card": 1, "ip_address": 1}
    assert DET.mask("nothing here") == ("nothing here", DET.scan(["nothing here"]))


def test_only_the_configured_detectors_run() -> None:
    emails = Detector(["email"])
    assert emails.scan(["jane@example.com 4111 1111 1111 1111"]).kinds() == {"email": 1}


@pytest.mark.parametrize(("kw", "msg"), [
    ({"detectors": ("email", "dna")}, "gateway.privacy.detectors: 'dna'"),
    ({"patterns": {"email": "x"}}, "gateway.privacy.patterns.email"),
    ({"patterns": {"emp": "("}}, "gateway.privacy.patterns.emp: bad regex"),
    ({"sensitive_classes": ()}, "gateway.privacy.sensitive_classes"),
    ({"sensitive_classes": ("Top Secret",)}, "gateway.privacy.sensitive_classes"),
    ({"action": "drop"}, "gateway.privacy.action"),
    ({"phone_regions": ("usa",)}, "gateway.privacy.phone_regions"),
])
def test_config_errors_name_the_field(kw: dict[str, object], msg: str) -> None:
    with pytest.raises(ValueError, match=msg.replace(".", r"\.").replace("(", r"\(")):
        PrivacyConfig(**kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(("kw", "msg"), [
    ({"privacy_classes": ("Top Secret",)}, "privacy_classes"),
    ({"privacy_action": "drop"}, "privacy_action: must be refuse or mask"),
])
def test_tenant_privacy_errors_name_the_field(kw: dict[str, object], msg: str) -> None:
    from meshd.coordinator.gateway.governance.config import TenantPolicy

    with pytest.raises(ValueError, match=msg):
        TenantPolicy(**kw)  # type: ignore[arg-type]
