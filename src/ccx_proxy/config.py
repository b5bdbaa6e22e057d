"""Loading and validating ``channels.json`` into frozen dataclasses.

Validation runs once, at load; every problem is reported with its path
(``channels[1].baseUrl: ...``) and nothing half-valid is ever used.  Field names
follow the CCX gateway's channel model (camelCase).  A CCX ``config.json``,
whose Messages channels sit in its ``upstream`` array, loads too.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, Literal, cast

import orjson
from yarl import URL

from .headers import RESERVED_CUSTOM, channel_lines, credential_header, mask_secret
from .mapping import Allowlist, ModelTable, pattern_problem
from .policy import (
    ROUTING_FIELDS,
    TIMEOUT_FIELDS,
    AffinityPolicy,
    BreakerPolicy,
    RoutingPolicy,
    Timeouts,
    parse_section,
)
from .team.prices import EMPTY as EMPTY_PRICES
from .team.prices import PriceTable, parse_prices
from .thinking import OFF, THINKING_FIELDS, ThinkingOptions, parse_thinking
from .upstream.wire import Endpoints, Proxy, WireError, endpoints, environment_proxy, parse_proxy

ServiceType = Literal["claude"]
AuthHeader = Literal["x-api-key", "bearer", "auto"]
Status = Literal["active", "suspended", "disabled"]

SERVICE_TYPES: tuple[str, ...] = ("claude",)
AUTH_HEADERS: tuple[str, ...] = ("x-api-key", "bearer", "auto")
STATUSES: tuple[str, ...] = ("active", "suspended", "disabled")

CHANNEL_FIELDS = frozenset(
    {
        "name",
        "serviceType",
        "baseUrl",
        "apiKeys",
        "authHeader",
        "modelMapping",
        "supportedModels",
        "models",
        "priority",
        "status",
        "customHeaders",
        "baseUrls",
        "circuitBreaker",
        "proxyUrl",
        "insecureSkipVerify",
        "forwardAcceptEncoding",
        "prices",
        *THINKING_FIELDS,
        *TIMEOUT_FIELDS,
    }
)
IDENTITY = ("Accept-Encoding", "identity")  # plain bytes from upstreams: see forwardAcceptEncoding
TOP_LEVEL_FIELDS = frozenset(
    {"channels", "upstream", "circuitBreaker", "sessionAffinity", "prices", *TIMEOUT_FIELDS, *ROUTING_FIELDS}
)

# Fields of CCX's own config.json that this gateway does not use: one warning each, never an
# error (a CCX file loads as it is).  Any other unknown field is an error when it is close to
# one of ours (a typo such as "stauts" must not silently leave a channel active) and a warning
# otherwise.  A name starting with "_" ("_comment") is a comment: ignored without a word.
CCX_CHANNEL_FIELDS = frozenset({"id", "description", "website"})
CCX_TOP_LEVEL_FIELDS = frozenset({"currentUpstream", "loadBalance"})
_TYPO_CUTOFF = 0.75


def _unknown_field(name: str, known: frozenset[str], ccx: frozenset[str]) -> str | None:
    """The field ``name`` is probably a typo of, or None to ignore it with a warning."""
    if name in ccx:
        return None
    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=_TYPO_CUTOFF)
    if not close:
        lowered = {k.lower(): k for k in known}
        close = [lowered[name.lower()]] if name.lower() in lowered else []
    return close[0] if close else None


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")


class ConfigError(Exception):
    """A configuration that cannot be used; ``problems`` has one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class Channel:
    name: str
    base_url: str
    api_keys: tuple[str, ...] = field(repr=False)  # resolved: never logged or returned
    key_refs: tuple[str, ...]  # as written, e.g. "${DEEPSEEK_API_KEY}"
    service_type: ServiceType = "claude"
    auth_header: AuthHeader = "auto"
    model_mapping: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    supported_models: tuple[str, ...] = ()
    # The ids GET /v1/models advertises for this channel ("models"); each one it serves.
    advertised_models: tuple[str, ...] = ()
    priority: int = 0
    status: Status = "active"
    custom_headers: tuple[tuple[str, str], ...] = field(default=(), repr=False)
    base_urls: tuple[str, ...] = ()  # extra URLs, tried after base_url
    timeouts: Timeouts = field(default_factory=Timeouts)
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    proxy_url: str = field(default="", repr=False)  # as written (proxyUrl); may hold a password
    # The egress proxy per base URL (base_url, then base_urls): proxyUrl, else the environment's.
    proxies: tuple[Proxy | None, ...] = ()
    insecure_skip_verify: bool = False
    forward_accept_encoding: bool = False
    thinking: ThinkingOptions = OFF  # thinkingSignatures, thinkingPassback, stripBillingBlock
    prices: PriceTable = field(default=EMPTY_PRICES, repr=False)  # over the top-level table
    # Compiled once, from the fields above:
    models: ModelTable = field(init=False, repr=False, compare=False)
    allowlist: Allowlist = field(init=False, repr=False, compare=False)
    urls: Endpoints = field(init=False, repr=False, compare=False)
    all_urls: tuple[Endpoints, ...] = field(init=False, repr=False, compare=False)
    credentials: tuple[tuple[str, str], ...] = field(init=False, repr=False, compare=False)
    # Per key: the upstream request's channel header lines (key + customHeaders), as bytes.
    header_lines: tuple[bytes, ...] = field(init=False, repr=False, compare=False)
    custom_names: frozenset[bytes] = field(init=False, repr=False, compare=False)
    # What must never reach a client or a log: keys and customHeaders values (masked in error
    # answers' bodies, headers and reason, and in log lines: see redact.py).
    secrets: tuple[str, ...] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        bases = dict.fromkeys((self.base_url, *self.base_urls))
        proxies = self.proxies
        verify = not self.insecure_skip_verify
        all_urls = tuple(
            endpoints(b, proxies[i] if i < len(proxies) else None, verify) for i, b in enumerate(bases)
        )
        credentials = tuple(credential_header(self.auth_header, k) for k in self.api_keys)
        own = self.custom_headers
        if not self.forward_accept_encoding and all(n.lower() != "accept-encoding" for n, _ in own):
            own = (*own, IDENTITY)
        compiled = {
            "header_lines": tuple(channel_lines(c, own) for c in credentials),
            "custom_names": frozenset(name.lower().encode() for name, _ in own),
            "models": ModelTable(self.model_mapping),
            "allowlist": Allowlist(self.supported_models),
            "urls": all_urls[0],
            "all_urls": all_urls,
            "credentials": credentials,
            "secrets": (*self.api_keys, *(v for _, v in self.custom_headers if len(v) >= 6)),
        }
        for name, value in compiled.items():
            object.__setattr__(self, name, value)

    @property
    def active(self) -> bool:
        return self.status == "active"

    def serves(self, model: str, mapped: str) -> bool:
        return self.allowlist.admits(model) or self.allowlist.admits(mapped)

    def summary(self) -> str:
        """One line for humans and logs: no secret in it."""
        keys = ", ".join(_mask_ref(ref) for ref in self.key_refs)
        mapping = ", ".join(f"{k}->{v}" for k, v in self.model_mapping.items()) or "none"
        allow = ", ".join(self.supported_models) or "all"
        proxies = {p.display for p in self.proxies if p is not None}
        egress = f" proxy={','.join(sorted(proxies))}" if proxies else ""
        insecure = " TLS-UNVERIFIED" if self.insecure_skip_verify else ""
        thinking = self.thinking.describe()
        insecure += f" thinking={thinking}" if thinking else ""
        return (
            f"{self.name} [{self.status}] priority={self.priority} {self.service_type} "
            f"{self.base_url} auth={self.auth_header} keys=[{keys}] "
            f"mapping={{{mapping}}} allow=[{allow}]{egress}{insecure}"
        )


@dataclass(frozen=True, slots=True)
class GatewayConfig:
    channels: tuple[Channel, ...]
    warnings: tuple[str, ...] = ()
    source: str | None = None
    routing: RoutingPolicy = field(default_factory=RoutingPolicy)
    affinity: AffinityPolicy = field(default_factory=AffinityPolicy)
    timeouts: Timeouts = field(default_factory=Timeouts)  # defaults for channels
    breaker: BreakerPolicy = field(default_factory=BreakerPolicy)
    prices: PriceTable = field(default=EMPTY_PRICES, repr=False)  # "prices", top level

    @property
    def active(self) -> tuple[Channel, ...]:
        """Active channels, lowest ``priority`` first (file order breaks ties)."""
        return tuple(sorted((c for c in self.channels if c.active), key=lambda c: c.priority))


def _mask_ref(ref: str) -> str:
    if _ENV_REF.fullmatch(ref):
        return ref  # names a variable, not a secret
    return mask_secret(ref)


def load_config(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> GatewayConfig:
    p = Path(path)
    try:
        raw = p.read_bytes()
    except FileNotFoundError:
        raise ConfigError([f"{p}: file not found (set --config or CHANNELS_FILE)"]) from None
    except OSError as exc:
        raise ConfigError([f"{p}: cannot read: {exc.strerror}"]) from None
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise ConfigError([f"{p}: not valid JSON: {exc}"]) from None
    return parse_config(data, os.environ if env is None else env, source=str(p))


def parse_config(data: Any, env: Mapping[str, str], source: str | None = None) -> GatewayConfig:
    problems: list[str] = []
    warnings: list[str] = []
    if not isinstance(data, dict):
        raise ConfigError(['top level: must be a JSON object with a "channels" array'])
    if "channels" in data:
        key = "channels"
    elif "upstream" in data:
        key = "upstream"  # a CCX config.json: its Messages channels
    else:
        raise ConfigError(['top level: missing "channels" array'])
    # A field whose name starts with "_" is a comment (JSON has none): ignored, no warning.
    unknown_top = sorted(n for n in set(data) - TOP_LEVEL_FIELDS if not n.startswith("_"))
    for name in unknown_top:
        typo_of = _unknown_field(name, TOP_LEVEL_FIELDS, CCX_TOP_LEVEL_FIELDS)
        if typo_of is not None:
            problems.append(f"{name}: unknown top-level field -- did you mean {typo_of!r}?")
        else:
            warnings.append(f"ignoring unknown top-level field {name!r}")
    items = data[key]
    if not isinstance(items, list):
        raise ConfigError([f"{key}: must be an array of channel objects"])
    top = {k: v for k, v in data.items() if k in ROUTING_FIELDS or k in TIMEOUT_FIELDS}
    routing: RoutingPolicy = parse_section(
        RoutingPolicy, {k: v for k, v in top.items() if k in ROUTING_FIELDS}, "", problems
    )
    timeouts = _timeouts({k: v for k, v in top.items() if k in TIMEOUT_FIELDS}, "", problems)
    breaker: BreakerPolicy = parse_section(
        BreakerPolicy, data.get("circuitBreaker"), "circuitBreaker", problems
    )
    affinity: AffinityPolicy = parse_section(
        AffinityPolicy, data.get("sessionAffinity"), "sessionAffinity", problems
    )
    prices = parse_prices(data.get("prices"), "prices", problems)

    channels: list[Channel] = []
    unknown_fields: dict[str, list[str]] = {}
    seen_names: dict[str, int] = {}
    for index, item in enumerate(items):
        where = f"{key}[{index}]"
        if not isinstance(item, dict):
            problems.append(f"{where}: must be an object")
            continue
        for name in item:
            if name in CHANNEL_FIELDS or name.startswith("_"):
                continue
            typo_of = _unknown_field(name, CHANNEL_FIELDS, CCX_CHANNEL_FIELDS)
            if typo_of is not None:
                problems.append(f"{where}.{name}: unknown channel field -- did you mean {typo_of!r}?")
            else:
                unknown_fields.setdefault(name, []).append(where)
        raw_name = item.get("name")
        if isinstance(raw_name, str) and raw_name.strip():
            name = raw_name.strip()
            if name in seen_names:
                problems.append(
                    f"{where}.name: duplicate channel name {name!r} (also {key}[{seen_names[name]}])"
                )
            seen_names.setdefault(name, index)
        channel = _parse_channel(item, where, index, env, problems, warnings, timeouts, breaker)
        if channel is not None:
            channels.append(channel)
    for name, places in unknown_fields.items():
        warnings.append(f"ignoring unknown channel field {name!r} ({', '.join(places)})")
    if problems:
        raise ConfigError(problems)
    return GatewayConfig(
        channels=tuple(channels),
        warnings=tuple(warnings),
        source=source,
        routing=routing,
        affinity=affinity,
        timeouts=timeouts,
        breaker=breaker,
        prices=prices,
    )


def _timeouts(raw: dict[str, Any], where: str, problems: list[str], base: Timeouts | None = None) -> Timeouts:
    before = len(problems)
    result: Timeouts = parse_section(Timeouts, raw, where, problems, base)
    for name in (
        "connectTimeoutMs",
        "responseHeaderTimeoutMs",
        "nonStreamTimeoutMs",
        "streamInactivityTimeoutMs",
    ):
        if name in raw and raw[name] == 0 and len(problems) == before:
            path = f"{where}.{name}" if where else name
            problems.append(f"{path}: must be at least 1 (there is no 'no timeout')")
    return result


class _Fields:
    """Typed reads of one channel object, collecting problems instead of raising."""

    def __init__(self, item: dict[str, Any], where: str, problems: list[str]) -> None:
        self.item = item
        self.where = where
        self.problems = problems

    def problem(self, name: str, message: str) -> None:
        self.problems.append(f"{self.where}.{name}: {message}")

    def string(self, name: str, default: str | None = None) -> str | None:
        value = self.item.get(name, default)
        if value is None:
            self.problem(name, "is required")
            return None
        if not isinstance(value, str) or not value.strip():
            self.problem(name, "must be a non-empty string")
            return None
        return value.strip()

    def choice(self, name: str, choices: tuple[str, ...], default: str) -> str | None:
        value = self.item.get(name, default)
        if value not in choices:
            self.problem(name, f"must be one of {', '.join(choices)} (got {value!r})")
            return None
        return cast(str, value)

    def string_map(self, name: str) -> dict[str, str] | None:
        value = self.item.get(name, {})
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.problem(name, "must be an object of string -> string")
            return None
        ok = True
        for k, v in value.items():
            if not k:
                self.problem(name, "keys must be non-empty")
                ok = False
            if not isinstance(v, str) or not v:
                self.problem(f"{name}.{k}", "must be a non-empty string")
                ok = False
        return value if ok else None

    def each(self, name: str, values: list[str] | None, check: Callable[[str], str | None]) -> None:
        """Report ``check``'s problem, if any, for every item of a list field."""
        for i, value in enumerate(values or ()):
            problem = check(value)
            if problem:
                self.problem(f"{name}[{i}]", problem)

    def flag(self, name: str) -> bool:
        value = self.item.get(name, False)
        if not isinstance(value, bool):
            self.problem(name, f"must be true or false (got {value!r})")
            return False
        return value

    def string_list(self, name: str) -> list[str] | None:
        value = self.item.get(name, [])
        if value is None:
            return []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            self.problem(name, "must be an array of strings")
            return None
        return value


# The gateway's own secrets: a channel can never name them (see _expand).
GATEWAY_SECRETS = ("PROXY_ACCESS_KEY", "EXTRA_PROXY_ACCESS_KEYS", "ADMIN_ACCESS_KEY")


def _expand(value: str, env: Mapping[str, str]) -> tuple[str, list[str], list[str]]:
    """``value`` with its ``${VAR}`` references resolved; the variables that are not set; and
    why references were refused, for handing the gateway's own secrets to an upstream.

    A refused reference is never resolved, so no later message can quote its value: one of
    GATEWAY_SECRETS, or a variable whose value holds one of their keys (an alias)."""
    missing: list[str] = []
    refused: list[str] = []

    def sub(m: re.Match[str]) -> str:
        var = m.group(1)
        if var in GATEWAY_SECRETS:
            refused.append(f"${{{var}}} is the gateway's own secret")
            return m.group(0)
        if var not in env or env[var] == "":
            missing.append(var)
            return m.group(0)
        owner = _owner(env[var], env)
        if owner is not None:
            refused.append(f"${{{var}}} holds the value of the gateway's own {owner}")
            return m.group(0)
        return env[var]

    return _ENV_REF.sub(sub, value), missing, refused


def _owner(value: str, env: Mapping[str, str]) -> str | None:
    """Which of the gateway's own secrets ``value`` holds, if any (a key of 8 characters or
    more anywhere in it, a shorter one as the whole value)."""
    for name in GATEWAY_SECRETS:
        raw = env.get(name, "")
        for key in raw.split(",") if name.startswith("EXTRA_") else (raw,):
            key = key.strip()
            if key and (key in value if len(key) >= 8 else key == value.strip()):
                return name
    return None


def unset_message(missing: list[str], channel: object) -> str:
    """Why an active channel cannot load: its ``${VAR}`` references are unset, and the fix."""
    names = list(dict.fromkeys(missing))
    exports = " ".join(f"{var}=..." for var in names)
    which = f"channel {channel!r}" if isinstance(channel, str) and channel else "the channel"
    return (
        f"environment variable {', '.join(names)} {'is' if len(names) == 1 else 'are'} not set "
        f"({which} is active) -- export {exports} before starting ccx-proxy, "
        'or set the channel\'s "status" to "disabled"'
    )


def unset_variables(refs: tuple[str, ...], env: Mapping[str, str]) -> list[str]:
    """The variables that ``refs`` (values as written) name and ``env`` leaves unset or empty."""
    found = (m.group(1) for ref in refs for m in _ENV_REF.finditer(ref))
    return [var for var in dict.fromkeys(found) if not env.get(var)]


def _refusal(refused: list[str]) -> str:
    return (
        f"{'; '.join(refused)}: a channel may not use PROXY_ACCESS_KEY, EXTRA_PROXY_ACCESS_KEYS "
        "or ADMIN_ACCESS_KEY (its values are sent to the channel's upstream, which anyone who can "
        "edit channels chooses) -- give the channel the upstream's own key"
    )


def _parse_channel(
    item: dict[str, Any],
    where: str,
    index: int,
    env: Mapping[str, str],
    problems: list[str],
    warnings: list[str],
    default_timeouts: Timeouts,
    default_breaker: BreakerPolicy,
) -> Channel | None:
    before = len(problems)
    f = _Fields(item, where, problems)
    name = f.string("name")
    if name is not None and (len(name) > 100 or "/" in name or not name.isprintable() or name in (".", "..")):
        f.problem("name", "must be printable, at most 100 characters, without '/', and not '.' or '..'")
    status = f.choice("status", STATUSES, "active")
    active = status == "active"

    service_type = item.get("serviceType", "claude")
    if service_type not in SERVICE_TYPES:
        message = (
            f'{service_type!r} is not supported; only "claude" (an Anthropic-compatible Messages endpoint) is'
        )
        if active:
            f.problem("serviceType", message + ' -- set status to "disabled" to keep it in the file')
        else:
            warnings.append(f"{where}.serviceType: {message}; the channel cannot be activated")
        service_type = "claude"

    base_url = f.string("baseUrl")
    if base_url is not None:
        problem = _base_url_problem(base_url)
        if problem:
            f.problem("baseUrl", problem)

    base_urls = f.string_list("baseUrls")
    f.each("baseUrls", base_urls, _base_url_problem)

    auth_header = f.choice("authHeader", AUTH_HEADERS, "auto")

    key_refs: list[str] = []
    api_keys: list[str] = []
    raw_keys = f.string_list("apiKeys")
    if raw_keys is not None:
        for i, ref in enumerate(raw_keys):
            if not ref.strip():
                f.problem(f"apiKeys[{i}]", "must be a non-empty string")
                continue
            key_refs.append(ref.strip())
            resolved, missing, refused = _expand(ref.strip(), env)
            if refused:
                f.problem(f"apiKeys[{i}]", _refusal(refused))
                continue
            if missing:
                if active:
                    f.problem(f"apiKeys[{i}]", unset_message(missing, name))
                continue
            if any(c.isspace() or not c.isprintable() for c in resolved) or not resolved.isascii():
                f.problem(f"apiKeys[{i}]", "must be printable ASCII without whitespace")
                continue
            api_keys.append(resolved)
        if active and not raw_keys:
            f.problem("apiKeys", "an active channel needs at least one key")

    mapping = f.string_map("modelMapping")
    supported = f.string_list("supportedModels")
    f.each("supportedModels", supported, pattern_problem)
    advertised = f.string_list("models")
    if advertised is not None and supported is not None:
        advertised = _advertised(f, advertised, ModelTable(mapping or {}), Allowlist(supported), warnings)

    priority = item.get("priority", index + 1)
    if not isinstance(priority, int) or isinstance(priority, bool):
        f.problem("priority", f"must be an integer (got {priority!r})")
        priority = 0

    custom = f.string_map("customHeaders")
    custom_headers: list[tuple[str, str]] = []
    if custom is not None:
        for hname, hvalue in custom.items():
            if not _HEADER_NAME.match(hname):
                f.problem(f"customHeaders.{hname}", "is not a valid header name")
            elif hname.lower() in RESERVED_CUSTOM:
                f.problem(f"customHeaders.{hname}", "is managed by the gateway and cannot be set")
            else:
                value, missing, refused = _expand(hvalue, env)
                if refused:
                    f.problem(f"customHeaders.{hname}", _refusal(refused))
                elif missing and active:
                    f.problem(f"customHeaders.{hname}", unset_message(missing, name))
                elif any(c != "\t" and not c.isprintable() for c in value):
                    f.problem(f"customHeaders.{hname}", "must not contain line breaks or control characters")
                else:
                    custom_headers.append((hname, value))

    proxy_url, proxies = _egress(f, item, env, active, base_url, base_urls, warnings)
    insecure = f.flag("insecureSkipVerify")
    if insecure:
        warnings.append(
            f"{where}.insecureSkipVerify: TLS certificates of channel {name!r} are NOT verified; "
            "anyone on the path can read its keys and traffic"
        )
    forward_encoding = f.flag("forwardAcceptEncoding")
    thinking = parse_thinking(item, where, problems, base_url)
    prices = parse_prices(item.get("prices"), f"{where}.prices", problems)

    timeouts = _timeouts(
        {k: v for k, v in item.items() if k in TIMEOUT_FIELDS}, where, problems, default_timeouts
    )
    breaker: BreakerPolicy = parse_section(
        BreakerPolicy, item.get("circuitBreaker"), f"{where}.circuitBreaker", problems, default_breaker
    )

    if len(problems) > before:
        return None
    assert name is not None and base_url is not None and status is not None
    assert base_urls is not None
    assert auth_header is not None and mapping is not None and supported is not None
    assert advertised is not None
    return Channel(
        name=name,
        service_type=cast(ServiceType, service_type),
        base_url=base_url,
        api_keys=tuple(api_keys),
        key_refs=tuple(key_refs),
        auth_header=cast(AuthHeader, auth_header),
        model_mapping=MappingProxyType(dict(mapping)),
        supported_models=tuple(supported),
        advertised_models=tuple(advertised),
        priority=priority,
        status=cast(Status, status),
        custom_headers=tuple(custom_headers),
        base_urls=tuple(u.strip() for u in base_urls),
        timeouts=timeouts,
        breaker=breaker,
        proxy_url=proxy_url,
        proxies=proxies,
        insecure_skip_verify=insecure,
        forward_accept_encoding=forward_encoding,
        thinking=thinking,
        prices=prices,
    )


_MODEL_ID_LONGEST = 256


def _advertised(
    f: _Fields, ids: list[str], table: ModelTable, allow: Allowlist, warnings: list[str]
) -> list[str] | None:
    """The channel's ``models`` (the ids GET /v1/models lists for it): exact ids it serves."""
    ok = True
    seen: set[str] = set()
    for i, model in enumerate(ids):
        problem = None
        if not model or len(model) > _MODEL_ID_LONGEST:
            problem = f"must be a model id of 1 to {_MODEL_ID_LONGEST} characters"
        elif "*" in model or model.startswith("!") or any(c.isspace() or not c.isprintable() for c in model):
            problem = f"{model!r}: an exact model id (no '*', '!', spaces or control characters)"
        elif model in seen:
            problem = f"{model!r} is listed twice"
        elif not (allow.admits(model) or allow.admits(table.lookup(model))):
            problem = f"{model!r} is refused by this channel's supportedModels; it cannot be advertised"
        if problem:
            f.problem(f"models[{i}]", problem)
            ok = False
            continue
        seen.add(model)
        if not model.lower().startswith(("claude", "anthropic")):
            warnings.append(
                f"{f.where}.models[{i}]: Claude Code's model picker shows only ids starting with "
                f"'claude' or 'anthropic'; {model!r} is listed but hidden there"
            )
    return ids if ok else None


def _egress(
    f: _Fields,
    item: dict[str, Any],
    env: Mapping[str, str],
    active: bool,
    base_url: str | None,
    base_urls: list[str] | None,
    warnings: list[str],
) -> tuple[str, tuple[Proxy | None, ...]]:
    """The channel's proxyUrl as written, and the proxy each base URL goes through."""
    raw = item.get("proxyUrl", "")
    if raw is None:
        raw = ""
    if not isinstance(raw, str):
        f.problem("proxyUrl", "must be a string: http://[user:password@]host:port")
        return "", ()
    # The same list, in the same order, as Channel builds its endpoints from.
    bases = list(dict.fromkeys(u.strip() for u in (base_url or "", *(base_urls or ())) if u))
    if raw.strip():
        value, missing, refused = _expand(raw.strip(), env)
        if refused:
            f.problem("proxyUrl", _refusal(refused))
            return raw, ()
        if missing:
            if active:
                f.problem("proxyUrl", unset_message(missing, f.item.get("name")))
            return raw, ()
        try:
            proxy = parse_proxy(value)
        except WireError as exc:
            f.problem("proxyUrl", str(exc))
            return raw, ()
        return raw, tuple(proxy for _ in bases)
    found: list[Proxy | None] = []
    for base in bases:
        from_env = environment_proxy(base, env) if not _base_url_problem(base) else None
        if from_env is None:
            found.append(None)
            continue
        try:
            found.append(parse_proxy(from_env))
        except WireError as exc:
            # A shell-wide setting (often socks5://) must not stop the gateway from starting;
            # say loudly that this channel goes direct instead.
            warnings.append(
                f"{f.where}: ignoring the environment's proxy for {base} ({exc}); the channel "
                "connects directly -- set proxyUrl, or NO_PROXY to silence this"
            )
            found.append(None)
    return "", tuple(found)


def _base_url_problem(base_url: str) -> str | None:
    try:
        url = URL(base_url.removesuffix("#"))
    except ValueError as exc:
        return f"not a valid URL: {exc}"
    if url.scheme not in ("http", "https") or not url.host:
        return f"not an http(s) URL: {base_url!r}"
    if url.user or url.password:
        return "must not contain credentials; put keys in apiKeys"
    if url.query_string or url.fragment:
        return "must not contain a query string or fragment (a single trailing '#' is allowed)"
    if any(c.isspace() or not c.isprintable() for c in base_url):
        return "must not contain spaces or control characters"
    try:
        endpoints(base_url)
    except (WireError, ValueError, UnicodeError) as exc:
        return f"not usable as an upstream URL: {exc}"
    return None
