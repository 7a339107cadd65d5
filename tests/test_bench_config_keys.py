"""A bench config file may use the command-line flag spellings (issue 23 item 12b); any other
unknown key is refused with the valid keys listed."""

from __future__ import annotations

import pytest

from bench.matrix import Config, ConfigError


def write(tmp_path, text, name="run.toml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_flag_spellings_are_accepted(tmp_path):
    cfg = Config.from_file(write(tmp_path, 'no_faithfulness = true\nno-figures = true\nig-steps = 3\nquiet = true\n'
                                            'address = "auto"\nworkers = 2\nmodels = ["toy-gpt2-2l"]\n'))
    assert (cfg.faithfulness, cfg.figures, cfg.ig_steps, cfg.progress) == (False, False, 3, False)
    assert (cfg.ray_address, cfg.ray_workers, cfg.models) == ("auto", 2, ["toy-gpt2-2l"])
    assert Config.from_file(write(tmp_path, "no_faithfulness = false\n")).faithfulness is True
    assert Config.from_file(write(tmp_path, '{"no_faithfulness": true}', "run.json")).faithfulness is False


def test_unknown_keys_list_the_valid_ones(tmp_path):
    with pytest.raises(ConfigError, match="unknown config key 'no_faithfulnes'; valid keys: .*faithfulness.*"
                                          "ig_steps.*no_faithfulness"):
        Config.from_file(write(tmp_path, "no_faithfulnes = true\n"))
    with pytest.raises(ConfigError, match="is a flag: true or false"):
        Config.from_file(write(tmp_path, 'no_figures = "yes"\n'))
    with pytest.raises(ConfigError, match="a second time"):
        Config.from_file(write(tmp_path, "figures = true\nno_figures = true\n"))
