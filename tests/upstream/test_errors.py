"""The one mapping from upstream failures to gateway errors."""

import pytest

from ccx_proxy.errors import GatewayError, InvalidRequest, UpstreamTimeout, UpstreamUnreachable
from ccx_proxy.upstream.errors import (
    BadResponse,
    ConnectFailed,
    ConnectTimeout,
    DeadlineReached,
    Disconnected,
    NothingReceived,
    ProxyFailed,
    ReadTimeout,
    to_gateway_error,
    upstream_errors,
)


@pytest.mark.parametrize(
    "exc, kind, message",
    [
        pytest.param(
            DeadlineReached("x"),
            UpstreamTimeout,
            "upstream channel 'c': failover deadline reached (x)",
            id="deadline",
        ),
        pytest.param(
            ConnectTimeout("after 1 s"),
            UpstreamTimeout,
            "upstream channel 'c' timed out: after 1 s",
            id="connect-timeout",
        ),
        pytest.param(
            ReadTimeout("no data"),
            UpstreamTimeout,
            "upstream channel 'c' timed out: no data",
            id="read-timeout",
        ),
        pytest.param(
            BadResponse("bad"),
            UpstreamUnreachable,
            "upstream channel 'c' sent an invalid HTTP response: bad",
            id="bad-response",
        ),
        pytest.param(
            ConnectFailed("refused"),
            UpstreamUnreachable,
            "upstream channel 'c' is unreachable: refused",
            id="connect-failed",
        ),
        pytest.param(
            ProxyFailed("407"),
            UpstreamUnreachable,
            "upstream channel 'c' is unreachable: 407",
            id="proxy-failed",
        ),
        pytest.param(
            Disconnected("cut"), UpstreamUnreachable, "upstream channel 'c' failed: cut", id="disconnected"
        ),
        pytest.param(
            NothingReceived("idle"),
            UpstreamUnreachable,
            "upstream channel 'c' failed: idle",
            id="nothing-received",
        ),
        pytest.param(TimeoutError(), UpstreamTimeout, "upstream channel 'c' timed out", id="plain-timeout"),
        pytest.param(
            ConnectionResetError(104, "Connection reset by peer"),
            UpstreamUnreachable,
            "upstream channel 'c' failed: Connection reset by peer",
            id="os-error",
        ),
        pytest.param(
            OSError(), UpstreamUnreachable, "upstream channel 'c' failed: OSError", id="os-error-no-text"
        ),
    ],
)
def test_each_failure_maps_to_one_gateway_error(exc: BaseException, kind: type, message: str) -> None:
    error = to_gateway_error(exc, "c")
    assert type(error) is kind and error is not None and error.message == message


def test_gateway_errors_pass_and_others_are_not_upstream_failures() -> None:
    own = InvalidRequest("x")
    assert to_gateway_error(own, "c") is own
    assert to_gateway_error(ValueError("x"), "c") is None


def test_upstream_errors_reraises_mapped_and_keeps_the_rest() -> None:
    with pytest.raises(UpstreamTimeout) as caught:
        with upstream_errors("c"):
            raise ReadTimeout("slow")
    assert isinstance(caught.value.__cause__, ReadTimeout)
    with pytest.raises(ValueError):
        with upstream_errors("c"):
            raise ValueError("not ours")
    with pytest.raises(GatewayError):
        with upstream_errors("c"):
            raise InvalidRequest("ours already")
