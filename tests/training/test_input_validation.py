"""Bad input is refused up front with one line naming the file or key (issue 15): config files and
their JSON types, config values, devices, damaged or foreign checkpoints, crafted tensors that
would make the loader allocate, corrupt images and frame folders."""
import json
import os

import pytest
import torch

from training.config import PRESETS, Config, check_device_available, coerce, make_config, parse_overrides

WIDTH, SIZE = 4, 8


def _one_line(err):
    message = str(err.value)
    assert "\n" not in message and "Traceback" not in message
    return message


# ---------------------------------------------------------------- config files and JSON types
def _config_file(tmp_path, body, name="cfg.json"):
    path = tmp_path / name
    path.write_text(body if isinstance(body, str) else json.dumps(body))
    return path


@pytest.mark.parametrize("body,key,got", [
    ({"steps": "10"}, "steps", '"10" (a string)'),
    ({"crop": 16.5}, "crop", "16.5 (a number)"),
    ({"crop": 16.0}, "crop", "16.0 (a number)"),  # strict: an int key takes JSON integers only
    ({"batch": True}, "batch", "true (a boolean)"),
    ({"alpha": True}, "alpha", "true (a boolean)"),
    ({"lr": "1e-3"}, "lr", '"1e-3" (a string)'),
    ({"amp": 1}, "amp", "1 (an integer)"),
    ({"model": 3}, "model", "3 (an integer)"),
    ({"methods": "none"}, "methods", '"none" (a string)'),
    ({"methods": ["none", 2]}, "methods", '["none", 2] (a list)'),
    ({"steps": None}, "steps", "null"),
])
def test_config_file_json_types_name_the_file_key_allowed_type_and_value(tmp_path, body, key, got):
    path = _config_file(tmp_path, body)
    with pytest.raises(ValueError) as err:
        make_config("smoke", str(path))
    message = _one_line(err)
    assert message.startswith(f"config file {path}: {key} must be ") and message.endswith(f"got {got}")


def test_config_file_values_of_the_right_types_are_accepted_and_typed(tmp_path):
    path = _config_file(tmp_path, {"alpha": 2, "grad_clip": None, "depth": None, "methods": ["none", "sn-1"],
                                   "deterministic": True, "long_video": None, "steps": 4})
    config = make_config("smoke", str(path))
    assert config.alpha == 2.0 and isinstance(config.alpha, float)
    assert config.grad_clip is None and config.methods == ["none", "sn-1"] and config.deterministic
    assert config.steps == 4 and make_config("smoke", str(path), ["steps=5"]).steps == 5  # --set wins


def test_unknown_key_in_config_file(tmp_path):
    path = _config_file(tmp_path, {"steps": 3, "widht": 3})
    with pytest.raises(ValueError) as err:
        make_config("smoke", str(path))
    assert str(path) in _one_line(err) and "'widht'" in str(err.value) and "valid keys" in str(err.value)


def test_invalid_json_names_line_and_column(tmp_path):
    path = _config_file(tmp_path, '{\n  "steps": 3,\n}\n')
    with pytest.raises(ValueError) as err:
        make_config("smoke", str(path))
    assert _one_line(err).startswith(f"config file {path} is not valid JSON") and "line 3 column 1" in str(err.value)


@pytest.mark.parametrize("body,match", [("[1, 2]", "must hold a JSON object"), ('"steps"', "must hold a JSON object"),
                                        ('{"steps": 3, "steps": 4}', "gives the key 'steps' twice")])
def test_config_file_that_is_not_one_object(tmp_path, body, match):
    path = _config_file(tmp_path, body)
    with pytest.raises(ValueError, match=match) as err:
        make_config("smoke", str(path))
    assert str(path) in _one_line(err)


def test_directory_missing_and_non_utf8_config_files(tmp_path):
    with pytest.raises(ValueError) as err:
        make_config("smoke", str(tmp_path))
    assert _one_line(err) == f"config file {tmp_path} is a directory, not a JSON file"
    with pytest.raises(FileNotFoundError) as err:
        make_config("smoke", str(tmp_path / "nope.json"))
    assert _one_line(err) == f"config file {tmp_path / 'nope.json'} does not exist"
    latin = tmp_path / "latin.json"
    latin.write_bytes('{"model": "vresnet-feat\xe9"}'.encode("latin-1"))
    with pytest.raises(ValueError) as err:
        make_config("smoke", str(latin))
    assert _one_line(err).startswith(f"config file {latin} is not UTF-8 text")


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_config_file(tmp_path):
    path = _config_file(tmp_path, {"steps": 3})
    path.chmod(0)
    try:
        with pytest.raises(ValueError) as err:
            make_config("smoke", str(path))
        assert _one_line(err) == f"config file {path} cannot be read: permission denied"
    finally:
        path.chmod(0o600)


def test_set_text_is_typed_by_the_type_hints():
    assert parse_overrides(["steps=7", "alpha=2", "grad_clip=none", "depth=null", "methods=none, sn-1",
                            "amp=1", "deterministic=False", "list_file=none", "model=vdncnn-feat"]) == {
        "steps": 7, "alpha": 2.0, "grad_clip": None, "depth": None, "methods": ["none", "sn-1"], "amp": True,
        "deterministic": False, "list_file": None, "model": "vdncnn-feat"}
    assert coerce("data", "none") == "none"  # a str key that is not Optional keeps the text
    for item, message in (("steps=10.5", "--set: steps must be an integer, got '10.5'"),
                          ("crop=abc", "--set: crop must be an integer, got 'abc'"),
                          ("lr=fast", "--set: lr must be a number, got 'fast'"),
                          ("amp=yes", "--set: amp must be true or false (or 1/0), got 'yes'"),
                          ("steps=none", "--set: steps must be an integer, got 'none'")):
        with pytest.raises(ValueError) as err:
            parse_overrides([item])
        assert _one_line(err) == message
    with pytest.raises(ValueError, match=r"^--set: unknown config key 'widht'; valid keys"):
        parse_overrides(["widht=3"])


def test_config_values_are_checked_with_the_key_and_the_allowed_values():
    for override, message in (
            ("seed=-1", "seed must be in [0, 2**44), got -1"),
            (f"seed={2**63}", f"seed must be in [0, 2**44), got {2**63}"),
            ("crop_border=8", "crop_border must be < crop / 2 = 8 (PSNR is measured on crop - 2 * crop_border = 0 "
                              "pixels of a 16-pixel crop), got 8"),
            ("crop_border=20", "crop_border must be < crop / 2 = 8"),
            ("device=gpu", "device must be a torch device like 'cpu', 'cuda' or 'cuda:0', got 'gpu'"),
            ("device=cuda:x", "device must be a torch device like 'cpu', 'cuda' or 'cuda:0', got 'cuda:x'")):
        with pytest.raises(ValueError) as err:
            make_config("smoke", None, [override])
        assert _one_line(err).startswith(message)
    assert make_config("smoke", None, ["crop_border=7", f"seed={2**44 - 1}"]).crop_border == 7
    with pytest.raises(ValueError, match=r"^batch must be an integer, got True \(a bool\)$"):
        Config(batch=True).validate()  # a Config built in code is type-checked too


def test_devices_are_parsed_by_validate_and_checked_for_presence_separately():
    assert make_config("paper").device == "cuda"  # valid on a machine without CUDA: only parsed
    check_device_available("cpu")
    with pytest.raises(ValueError, match=r"^device 'cuda:99'"):
        check_device_available("cuda:99")  # no machine has 100 GPUs (or CUDA is not there at all)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError) as err:
            check_device_available("cuda")
        assert _one_line(err).startswith("device 'cuda': CUDA is not available on this machine")
    for device in ("meta", "gpu"):
        with pytest.raises(ValueError, match="device"):
            check_device_available(device)


def test_every_preset_is_valid():
    for preset in PRESETS:
        make_config(preset)
