"""A bad setting stops a command with one line per problem, naming the variable once."""

from __future__ import annotations

from server.settings import settings_from


def test_an_invalid_setting_names_its_variable_once(monkeypatch, capsys):
    monkeypatch.setenv("SOFTPROMPT_SCHEDULING", "bogus")
    monkeypatch.setenv("SOFTPROMPT_LLAMACPP_KV_TOKENS", "10")
    assert settings_from("serve", {"engine": "bogus"}) is None
    lines = capsys.readouterr().err.splitlines()
    assert "softprompt serve: SOFTPROMPT_ENGINE: use torch or llamacpp, got 'bogus'" in lines
    assert "softprompt serve: SOFTPROMPT_SCHEDULING: use fair or fifo, got 'bogus'" in lines
    assert "softprompt serve: SOFTPROMPT_LLAMACPP_KV_TOKENS: Input should be greater than or equal to 256" in lines
    assert len(lines) == 3
