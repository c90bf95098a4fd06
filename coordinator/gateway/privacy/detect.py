"""Sensitive content in a prompt: candidates by regex, confirmed by a validator where one exists.

| kind | candidate | confirmed by |
|---|---|---|
| email | RFC-shaped local@domain.tld | — |
| phone | digits with + ( ) - . spaces | `phonenumbers`: valid for its +CC or a `phone_regions` |
| credit_card | 13-19 digits, spaces or dashes between | Luhn (`stdnum.luhn`) |
| iban | CC + 2 check digits + 11-30 alphanumerics | ISO 7064 mod 97 (`stdnum.iban`) |
| national_id | US SSN ddd-dd-dddd | `stdnum.us.ssn` (area, group, serial rules) |
| ip_address | dotted quad; colon-hex | `ipaddress` |
| secret | AWS, GitHub, OpenAI/Anthropic, Slack, Google, Stripe keys, JWTs, PEM private keys | — |

plus the operator's own regexes (`[gateway.privacy] patterns`). Validators come from
well-kept libraries (phonenumbers is Google's libphonenumber; python-stdnum); presidio's
pattern recognizers do the same candidate-then-checksum work but need spaCy, which the gateway
should not load for this. `scan` runs once per request on the prompt's text; `mask` replaces
each finding with `[KIND]`. Pure: no I/O, thread-safe.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import phonenumbers
from stdnum import iban, luhn
from stdnum.us import ssn

_EMAIL = re.compile(r"[A-Za-z0-9._%+-]{1,64}@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63})*"
                    r"\.[A-Za-z]{2,24}")
_PHONE = re.compile(r"(?<![\w.])\+?\(?\d[\d ().-]{6,18}\d(?![\w])")
_CARD = re.compile(r"(?<!\d)\d(?:[ -]?\d){12,18}(?!\d)")
_IBAN = re.compile(r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]){11,30}\b")
_SSN = re.compile(r"(?<!\d)\d{3}-\d{2}-\d{4}(?!\d)")
_IPV4 = re.compile(r"(?<![\d.])(?:\d{1,3}\.){3}\d{1,3}(?![\d.])")
_IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){2,7}[0-9A-Fa-f]{0,4}(?:%\w+)?(?![\w:])"
                   r"|(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){1,6}:[0-9A-Fa-f]{1,4}(?![\w:])")
_SECRET = re.compile(
    r"\b(?:AKIA|ASIA)[0-9A-Z]{16}\b"  # AWS access key id
    r"|\bgh[pousr]_[A-Za-z0-9]{36,255}\b"  # GitHub tokens
    r"|\bgithub_pat_[A-Za-z0-9_]{22,255}\b"
    r"|\bsk-(?:ant-|proj-)?[A-Za-z0-9_-]{20,}"  # OpenAI / Anthropic keys
    r"|\bxox[abposr]-[A-Za-z0-9-]{10,}"  # Slack
    r"|\bAIza[0-9A-Za-z_-]{35}"  # Google API key
    r"|\b[rs]k_live_[0-9A-Za-z]{20,}"  # Stripe
    r"|\beyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}"  # JWT
    r"|-----BEGIN (?:[A-Z]+ )?PRIVATE KEY-----")
# A secret's regex runs only on text containing one of these (each pattern starts with one)
_SECRET_MARKERS = ("AKIA", "ASIA", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_", "sk-",
                   "xox", "AIza", "k_live_", "eyJ", "PRIVATE KEY")
_DIGITS = b"0123456789"
# A run of digits with the separators numbers are written with: what number-shaped detectors
# look inside
_CLUSTER = re.compile(r"\+?\(?\d[\d ().:-]{5,}\d\)?")  # 7 characters at least: 1.1.1.1


@dataclass(frozen=True, slots=True)
class Finding:
    kind: str
    start: int
    end: int


@dataclass(frozen=True, slots=True)
class Scan:
    findings: tuple[Finding, ...]

    @property
    def sensitive(self) -> bool:
        return bool(self.findings)

    def kinds(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for f in self.findings:
            out[f.kind] = out.get(f.kind, 0) + 1
        return out


CLEAN = Scan(())


class Detector:
    def __init__(self, detectors: Iterable[str], patterns: Mapping[str, str] | None = None,
                 phone_regions: Sequence[str] = ("US",)) -> None:
        self.detectors = frozenset(detectors)
        self.regions = tuple(phone_regions) or ("US",)
        self.patterns = [(name, re.compile(p)) for name, p in (patterns or {}).items()]
        # (detector, the fewest digits a finding has): a regex pass costs ~20 ns a character,
        # so each runs only when a C-speed precheck (digit count, a marker substring) says a
        # finding is possible; prose with a few numbers runs almost none of them
        checks = {"email": (self._email, 0), "iban": (self._iban, 8),
                  "ip_address": (self._ipv6, 0), "secret": (self._secret, 0)}
        self._checks = [c for kind, c in checks.items() if kind in self.detectors]
        # number-shaped findings are looked for in the text's digit clusters only (one regex
        # pass finds them; prose's short numbers are skipped by length)
        numeric = {"phone": self._phone, "credit_card": self._card, "national_id": self._ssn,
                   "ip_address": self._ipv4}
        self._numeric = [fn for kind, fn in numeric.items() if kind in self.detectors]

    def scan(self, texts: Iterable[str]) -> Scan:
        """Every finding in `texts` (a prompt, or a chat's message contents)."""
        found: list[Finding] = []
        for text in texts:
            if not text:
                continue
            raw = text.encode("utf-8", "surrogatepass")
            digits = len(raw) - len(raw.translate(None, _DIGITS))
            for check, min_digits in self._checks:
                if digits >= min_digits:
                    check(text, found, digits)
            if digits >= 4 and self._numeric:
                for m in _CLUSTER.finditer(text):
                    c = m.group()
                    for fn in self._numeric:
                        fn(c, m.start(), found)
            for name, rx in self.patterns:
                found += (Finding(name, m.start(), m.end()) for m in rx.finditer(text)
                          if m.end() > m.start())
        return Scan(tuple(found)) if found else CLEAN

    def mask(self, text: str) -> tuple[str, Scan]:
        """`text` with each finding replaced by `[KIND]` (overlaps merged, the first wins)."""
        s = self.scan((text,))
        if not s.sensitive:
            return text, s
        out: list[str] = []
        at = 0
        for f in sorted(s.findings, key=lambda f: (f.start, -f.end)):
            if f.start < at:
                continue
            out += (text[at:f.start], f"[{f.kind.upper()}]")
            at = f.end
        out.append(text[at:])
        return "".join(out), s

    # ---- detectors: append confirmed findings
    @staticmethod
    def _email(text: str, out: list[Finding], digits: int) -> None:
        if "@" in text:
            out += (Finding("email", m.start(), m.end()) for m in _EMAIL.finditer(text))

    def _phone(self, c: str, at: int, out: list[Finding]) -> None:
        for m in _PHONE.finditer(c):
            digits = sum(ch.isdigit() for ch in m.group())
            if 8 <= digits <= 15 and not _IPV4.fullmatch(m.group()) \
                    and self._valid_phone(m.group()):
                out.append(Finding("phone", at + m.start(), at + m.end()))

    def _valid_phone(self, s: str) -> bool:
        for region in (None,) if s.startswith("+") else self.regions:
            try:
                if phonenumbers.is_valid_number(phonenumbers.parse(s, region)):
                    return True
            except phonenumbers.NumberParseException:
                continue
        return False

    @staticmethod
    def _card(c: str, at: int, out: list[Finding]) -> None:
        if len(c) < 13:
            return
        for m in _CARD.finditer(c):
            digits = re.sub(r"[ -]", "", m.group())
            if 13 <= len(digits) <= 19 and luhn.is_valid(digits):
                out.append(Finding("credit_card", at + m.start(), at + m.end()))

    @staticmethod
    def _iban(text: str, out: list[Finding], digits: int) -> None:
        out += (Finding("iban", m.start(), m.end()) for m in _IBAN.finditer(text)
                if iban.is_valid(m.group()))

    @staticmethod
    def _ssn(c: str, at: int, out: list[Finding]) -> None:
        if "-" in c:
            out += (Finding("national_id", at + m.start(), at + m.end())
                    for m in _SSN.finditer(c) if ssn.is_valid(m.group()))

    @staticmethod
    def _ipv4(c: str, at: int, out: list[Finding]) -> None:
        if c.count(".") < 3:
            return
        for m in _IPV4.finditer(c):
            try:
                ipaddress.IPv4Address(m.group())
            except ValueError:
                continue
            out.append(Finding("ip_address", at + m.start(), at + m.end()))

    @staticmethod
    def _ipv6(text: str, out: list[Finding], digits: int) -> None:
        i = text.find(":")  # an IPv6 address has two colons at most 5 characters apart
        while i >= 0 and text.find(":", i + 1, i + 6) < 0:
            i = text.find(":", i + 1)
        if i < 0:
            return
        at = 0  # whitespace-separated words with two colons or more are the candidates
        for word in text.split():
            start = text.index(word, at)
            at = start + len(word)
            if word.count(":") < 2:
                continue
            for m in _IPV6.finditer(word):
                try:
                    ipaddress.IPv6Address(m.group().split("%")[0])
                except ValueError:
                    continue
                out.append(Finding("ip_address", start + m.start(), start + m.end()))

    @staticmethod
    def _secret(text: str, out: list[Finding], digits: int) -> None:
        if any(marker in text for marker in _SECRET_MARKERS):
            out += (Finding("secret", m.start(), m.end()) for m in _SECRET.finditer(text))
