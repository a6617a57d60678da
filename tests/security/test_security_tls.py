"""``wss://`` verifies TLS by default; trusting the emulator's certificate is an explicit choice.

The emulator serves TLS with a fresh local CA (not in any trust store). A Voice with the default ``ssl=True``
must refuse its voice server (the join ends with an error naming the certificate); with an ``SSLContext``
that trusts the emulator's CA it joins; with a context the application deliberately made unverified (the
explicit opt-out) it joins too. The main gateway client verifies by default in the same way.
"""

from __future__ import annotations

import ssl

import pytest

from cordvoice import Voice
from cordvoice.emulator import Emulator
from cordvoice.errors import GatewayError, VoiceError
from cordvoice.gateway import Client
from cordvoice.reconnect import ReconnectConfig
from cordvoice.voicegateway.connection import VoiceGatewayConnection

QUICK_GIVE_UP = ReconnectConfig(max_rejoins=1, backoff_base=0.01, backoff_cap=0.05, rejoin_timeout=2.0)


@pytest.fixture(autouse=True)
def no_extra_trust(monkeypatch: pytest.MonkeyPatch) -> None:
    """The system trust store only: no environment variable may point it at the emulator's CA."""
    monkeypatch.delenv("SSL_CERT_FILE", raising=False)
    monkeypatch.delenv("SSL_CERT_DIR", raising=False)


async def test_voice_gateway_verifies_tls_by_default() -> None:
    async with Emulator(rate_limit=None, tls=True) as emu:
        bot = emu.create_bot("tls-bot")
        guild = emu.create_guild("g", members=[bot.user_id])
        channel = emu.create_voice_channel(guild.id, "General")
        endpoint = emu.voice_server().endpoint
        # The connection itself: refused without the CA, accepted with it or with an explicit opt-out.
        with pytest.raises(VoiceError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            await VoiceGatewayConnection.open(endpoint, open_timeout=5.0)
        trusted = await VoiceGatewayConnection.open(endpoint, ssl=emu.client_ssl_context(), open_timeout=5.0)
        await trusted.aclose_quietly()
        unverified = ssl.create_default_context()
        unverified.check_hostname = False
        unverified.verify_mode = ssl.CERT_NONE
        opted_out = await VoiceGatewayConnection.open(endpoint, ssl=unverified, open_timeout=5.0)
        await opted_out.aclose_quietly()

        # A whole join, as an application does it.
        client = Client(
            bot.token, gateway_url=emu.gateway_url, api_base=emu.api_base, ssl=emu.client_ssl_context()
        )
        async with client:
            voice = Voice(client, reconnect=QUICK_GIVE_UP, join_timeout=10.0)  # ssl=True: the default
            try:
                with pytest.raises(VoiceError) as refused:
                    await voice.join_channel(guild.id, channel.id)
                assert "certificate" in str(refused.value).lower() or "CERTIFICATE" in repr(refused.value)
                assert voice.sessions == {}
            finally:
                await voice.close()
            voice = Voice(client, ssl=emu.client_ssl_context(), join_timeout=10.0)
            try:
                session = await voice.join_channel(guild.id, channel.id)
                assert session.endpoint is not None
            finally:
                await voice.close()


async def test_main_gateway_verifies_tls_by_default() -> None:
    async with Emulator(rate_limit=None, tls=True) as emu:
        bot = emu.create_bot("tls-bot")
        with pytest.raises(GatewayError, match=r"CERTIFICATE_VERIFY_FAILED|certificate verify failed"):
            async with Client(bot.token, gateway_url=emu.gateway_url, api_base=emu.api_base):
                pass
        async with Client(
            bot.token, gateway_url=emu.gateway_url, api_base=emu.api_base, ssl=emu.client_ssl_context()
        ) as client:
            assert client.is_ready
