import argparse

from server.cli import build_parser
from server.settings import ServerSettings, from_args


def test_flags_override_environment_which_overrides_defaults():
    args = build_parser().parse_args(["serve", "--port", "9001", "--allow-private-image-urls"])
    env = {"VLMAMBA_PORT": "7000", "VLMAMBA_MAX_NUM_SEQS": "4", "VLMAMBA_STATE_CACHE_GB": "0.5",
           "VLMAMBA_PROTECT_HEALTH": "true", "VLMAMBA_API_KEY": "a, b"}
    s = from_args(args, env)
    assert s.port == 9001 and s.max_num_seqs == 4 and s.state_cache_gb == 0.5
    assert s.allow_private_image_urls is True and s.protect_health is True and s.api_keys == ["a", "b"]
    assert from_args(argparse.Namespace(), {}) == ServerSettings()


def test_every_setting_has_a_flag_with_help():
    help_text = build_parser()._subparsers._group_actions[0].choices["serve"].format_help()
    for name in ServerSettings.__dataclass_fields__:
        assert "--" + name.replace("_", "-") in help_text and f"VLMAMBA_{name.upper()}" in help_text


def test_chat_page_can_be_turned_off():
    from server.app import create_app

    paths = lambda s: {getattr(r, "path", None) for r in create_app(s).routes}
    assert "/" in paths(ServerSettings()) and "/" not in paths(ServerSettings(no_webui=True))
