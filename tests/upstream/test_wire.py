import pytest
from yarl import URL

from ccx_proxy.upstream.wire import endpoints


@pytest.mark.parametrize(
    "base, messages, count_tokens",
    [
        pytest.param(
            "https://api.anthropic.com",
            "https://api.anthropic.com/v1/messages",
            "https://api.anthropic.com/v1/messages/count_tokens",
            id="anthropic-root",
        ),
        pytest.param(
            "https://api.anthropic.com/",
            "https://api.anthropic.com/v1/messages",
            "https://api.anthropic.com/v1/messages/count_tokens",
            id="root-trailing-slash",
        ),
        pytest.param(
            "https://api.deepseek.com/anthropic",
            "https://api.deepseek.com/anthropic/v1/messages",
            "https://api.deepseek.com/anthropic/v1/messages/count_tokens",
            id="deepseek-prefix",
        ),
        pytest.param(
            "https://api.kimi.com/coding/",
            "https://api.kimi.com/coding/v1/messages",
            "https://api.kimi.com/coding/v1/messages/count_tokens",
            id="kimi-prefix-trailing-slash",
        ),
        pytest.param(
            "https://open.bigmodel.cn/api/anthropic",
            "https://open.bigmodel.cn/api/anthropic/v1/messages",
            "https://open.bigmodel.cn/api/anthropic/v1/messages/count_tokens",
            id="glm-deep-prefix",
        ),
        pytest.param(
            "http://127.0.0.1:3001",
            "http://127.0.0.1:3001/v1/messages",
            "http://127.0.0.1:3001/v1/messages/count_tokens",
            id="host-port",
        ),
        pytest.param(
            "https://gw.example/v1",
            "https://gw.example/v1/messages",
            "https://gw.example/v1/messages/count_tokens",
            id="already-versioned",
        ),
        pytest.param(
            "https://gw.example/api/v2/",
            "https://gw.example/api/v2/messages",
            "https://gw.example/api/v2/messages/count_tokens",
            id="versioned-trailing-slash",
        ),
        pytest.param(
            "https://gw.example/custom/path#",
            "https://gw.example/custom/path/messages",
            "https://gw.example/custom/path/messages/count_tokens",
            id="hash-verbatim",
        ),
        pytest.param(
            "https://gw.example/custom/#",
            "https://gw.example/custom/messages",
            "https://gw.example/custom/messages/count_tokens",
            id="hash-verbatim-trailing-slash",
        ),
    ],
)
def test_endpoint_joining(base: str, messages: str, count_tokens: str) -> None:
    urls = endpoints(base)
    assert urls.messages.url == messages
    assert urls.count_tokens.url == count_tokens
    # The request line and Host header are built once, from the same URL.
    url = URL(messages)
    head = urls.messages.head(b"?beta=true", b"x-api-key: k\r\n", 12)
    assert (
        head
        == (
            f"POST {url.raw_path}?beta=true HTTP/1.1\r\nHost: {url.host_port_subcomponent}\r\n"
            "x-api-key: k\r\nContent-Length: 12\r\n\r\n"
        ).encode()
    )
