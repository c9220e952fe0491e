import pytest

from offload.config import OffloadConfig, env_overrides, load_yaml, parse_bytes, parse_tokens
from offload.errors import ConfigError


@pytest.mark.parametrize("text,value", [("128K", 131072), ("1M", 1048576), ("8192", 8192), (4096, 4096),
                                        ("1.5K", 1536), ("2k", 2048)])
def test_parse_tokens(text, value):
    assert parse_tokens(text) == value


@pytest.mark.parametrize("text,value", [("20GiB", 20 * 2**30), ("20GB", 20 * 10**9), ("512MiB", 512 * 2**20),
                                        ("1.5GiB", int(1.5 * 2**30)), ("100", 100), (7, 7)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("bad", ["12X", "", "K", "-5", "1.0001K", "lots", True])
def test_bad_token_counts_are_refused(bad):
    with pytest.raises(ConfigError, match="token count"):
        parse_tokens(bad)


@pytest.mark.parametrize("bad", ["20GX", "GiB", "-1GB", "twenty", "1QB"])
def test_bad_memory_sizes_are_refused(bad):
    with pytest.raises(ConfigError, match="memory size"):
        parse_bytes(bad)


@pytest.mark.parametrize("ctx", [0, "0", "0K"])
def test_ctx_must_be_positive(ctx):
    with pytest.raises(ConfigError, match="--ctx must be positive"):
        OffloadConfig(ctx=ctx)


@pytest.mark.parametrize("name", ["chunk_tokens", "prefill_chunk", "stream_chunk"])
def test_chunk_sizes_must_be_positive(name):
    with pytest.raises(ConfigError, match=f"{name} must be positive"):
        OffloadConfig(**{name: 0})


def test_config_normalises_sizes_and_validates_choices():
    c = OffloadConfig(ctx="128K", gpu_mem="6GiB", host_mem="48GB")
    assert (c.ctx, c.gpu_mem, c.host_mem) == (131072, 6 * 2**30, 48 * 10**9)
    with pytest.raises(ConfigError, match="--attention"):
        OffloadConfig(attention="fast")
    with pytest.raises(ConfigError, match="--top-p"):
        OffloadConfig(top_p=0)
    with pytest.raises(AttributeError):
        c.ctx = 5  # frozen


def test_yaml_and_env_layers(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("ctx: 32K\ngpu-mem: 2GiB\ntemperature: 0.5\n")
    values = load_yaml(y)
    assert values == {"ctx": "32K", "gpu_mem": "2GiB", "temperature": 0.5}
    env = env_overrides({"OFFLOAD_CTX": "64K", "OFFLOAD_TEMPERATURE": "0.7", "OFFLOAD_UNRELATED": "x"})
    assert env == {"ctx": "64K", "temperature": 0.7}
    assert OffloadConfig(**{**values, **env}).ctx == 65536


def test_yaml_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_yaml(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("ctx: [1\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_yaml(bad)
    unk = tmp_path / "unk.yaml"
    unk.write_text("contxt: 5\n")
    with pytest.raises(ConfigError, match="unknown keys contxt"):
        load_yaml(unk)
