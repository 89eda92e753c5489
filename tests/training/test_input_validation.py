"""Bad input is refused up front with one line naming the file or key (issue 15): config files and
their JSON types, config values, devices, damaged or foreign checkpoints, crafted tensors that
would make the loader allocate, corrupt images and frame folders."""
import json
import os

import numpy as np
import pytest
from memory_limits import address_space_headroom
import torch
from PIL import Image

from training import checkpoint
from training.checkpoint import CheckpointError, check_against, load_checkpoint, save_checkpoint
from training.config import (PRESETS, Config, check_device_available, coerce, make_config, parse_overrides,
                             read_config_file)
from training.constraints import apply_constraint
from training.data import FrameFolder, ImageError, Vimeo90kSeptuplets
from training.models import build_model

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


# ---------------------------------------------------------------- checkpoints
def _model_and_optimizer(method="srnc"):
    torch.manual_seed(0)
    params = dict(input_size=SIZE) if method == "srnc" else {}
    model = apply_constraint(build_model("vresnet-feat", width=WIDTH), method, **params)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.rand(1, 2, 3, SIZE, SIZE)).square().mean().backward()
    opt.step()
    return model, opt


def _state(net, opt, **changes):
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    state = {"model": net.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
             "step": 1, "method": "srnc", "config": {"width": WIDTH}}
    state.update(changes)
    return state


def test_a_good_checkpoint_loads_and_fits(tmp_path):
    model, opt = _model_and_optimizer()
    path = save_checkpoint(tmp_path / "good.pt", _state(model, opt, log=[{"step": 1, "loss": 0.5}]))
    saved = load_checkpoint(path)
    check_against(saved, model, opt, path)
    check_against(saved, model, None, path)
    fresh, fresh_opt = _model_and_optimizer()
    check_against(saved, fresh, fresh_opt, path)
    fresh.load_state_dict(saved["model"])
    fresh_opt.load_state_dict(saved["optimizer"])


def _error(path, **kwargs):
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(path, **kwargs)
    message = _one_line(err)
    assert message.startswith(f"checkpoint {path}")
    return message


def test_missing_directory_and_empty_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError) as err:  # also a CheckpointError
        load_checkpoint(tmp_path / "none.pt")
    assert isinstance(err.value, CheckpointError) and _one_line(err) == f"checkpoint {tmp_path / 'none.pt'} does not exist"
    assert "is a directory" in _error(tmp_path)
    (tmp_path / "empty.pt").write_bytes(b"")
    assert "is empty (0 bytes)" in _error(tmp_path / "empty.pt")


def test_truncated_and_foreign_files(tmp_path):
    model, opt = _model_and_optimizer()
    whole = save_checkpoint(tmp_path / "whole.pt", _state(model, opt)).read_bytes()
    for size in (10, len(whole) // 2, len(whole) - 30):
        (tmp_path / "cut.pt").write_bytes(whole[:size])
        assert "is truncated or corrupt" in _error(tmp_path / "cut.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint at all")
    assert "is not a PyTorch checkpoint" in _error(tmp_path / "text.pt")


def test_a_list_and_other_non_checkpoints(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    assert "holds a list, not a training checkpoint" in _error(tmp_path / "list.pt")
    assert load_checkpoint(tmp_path / "list.pt", training=False) == [1, 2, 3]
    model, opt = _model_and_optimizer()
    for changes, message in (({"step": -1}, "step must be an integer >= 0, got -1"),
                             ({"step": True}, "step must be an integer >= 0, got a bool"),
                             ({"step": 2.0}, "step must be an integer >= 0, got a float"),
                             ({"method": None}, "method must be a string, got None"),
                             ({"model": {"weight": [1.0]}}, "model must be a dict of tensors, got a list at 'weight'"),
                             ({"optimizer": {"lr": 1}}, "optimizer must be an optimizer state_dict"),
                             ({"log": {"step": 1}}, "log must be a list of dicts, got a dict"),
                             ({"log": [{"step": 1}, 3]}, "log must be a list of dicts, got a int at log[1]")):
        torch.save(_state(model, opt, **changes), tmp_path / "bad.pt")
        assert message in _error(tmp_path / "bad.pt")
    state = _state(model, opt)
    del state["scheduler"]
    torch.save(state, tmp_path / "partial.pt")
    assert "lacks the key 'scheduler'" in _error(tmp_path / "partial.pt")


def _touch(path):
    open(path, "w").close()
    return path


class _Payload:
    """A pickle whose loading runs code: creates the marker file."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (_touch, (self.marker,))


def test_a_pickle_with_code_is_refused_as_unsafe_and_not_executed(tmp_path):
    marker = tmp_path / "executed"
    path = tmp_path / "evil.pt"
    torch.save({"model": _Payload(str(marker))}, path)
    message = _error(path)
    assert "was refused as unsafe: it pickles GLOBAL " in message and "_touch" in message and "nothing in it was executed" in message
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the control: loading it unsafely does run the payload
    assert marker.exists()


def test_wrong_shapes_missing_and_unexpected_keys_are_named(tmp_path):
    model, opt = _model_and_optimizer()
    path = tmp_path / "c.pt"
    key = next(k for k, v in model.state_dict().items() if v.dim() == 4)
    cases = []
    wide = _state(model, opt)
    wide["model"] = dict(wide["model"], **{key: torch.zeros(3, 3, 3, 3)})
    cases.append((wide, f"{key!r} has shape (3, 3, 3, 3) there, {tuple(model.state_dict()[key].shape)} in the model"))
    missing = _state(model, opt)
    missing["model"] = {k: v for k, v in missing["model"].items() if k != key}
    cases.append((missing, f"lacks the model key {key!r}"))
    extra = _state(model, opt)
    extra["model"] = dict(extra["model"], extra=torch.zeros(1))
    cases.append((extra, "unexpected model key 'extra'"))
    ints = _state(model, opt)
    ints["model"] = dict(ints["model"], **{key: ints["model"][key].long()})
    cases.append((ints, f"{key!r} is integer (torch.int64) there, floating point (torch.float32) in the model"))
    groups = _state(model, opt)
    groups["optimizer"] = {"state": {}, "param_groups": groups["optimizer"]["param_groups"] * 2}
    cases.append((groups, "2 param group(s) there, 1 here"))
    moments = _state(model, opt)
    index = next(iter(moments["optimizer"]["state"]))
    moments["optimizer"]["state"][index] = dict(moments["optimizer"]["state"][index], exp_avg=torch.zeros(2, 2))
    cases.append((moments, f"state 'exp_avg' of param {index} has shape (2, 2) there"))
    for state, message in cases:
        torch.save(state, path)
        saved = load_checkpoint(path)
        with pytest.raises(CheckpointError) as err:
            check_against(saved, model, opt, path)
        assert _one_line(err).startswith(f"checkpoint {path}") and message in str(err.value), str(err.value)


def test_a_stride_0_tensor_claiming_a_huge_shape_is_refused_without_allocating(tmp_path):
    """The crafted-checkpoint attack of issue 15: a tiny file whose vectors claim a huge input size."""
    model, opt = _model_and_optimizer()
    layer_key = next(k for k in model.state_dict() if k.endswith(".v"))
    huge = torch.zeros(1).expand(1, WIDTH, 100_000, 100_000)  # 4e10 elements (160 GB) in a 4-byte storage
    path = tmp_path / "crafted.pt"
    torch.save(_state(model, opt, model=dict(model.state_dict(), **{layer_key: huge})), path)
    assert path.stat().st_size < 1_000_000
    with address_space_headroom(), pytest.raises(CheckpointError) as err:
        check_against(load_checkpoint(path), model, opt, path)
    assert layer_key in _one_line(err) and "(1, 4, 100000, 100000)" in str(err.value)
    # the right shape, but not dense: refused too (a crafted file, whatever its shape)
    right = torch.zeros(1).expand(*model.state_dict()[layer_key].shape)
    torch.save(_state(model, opt, model=dict(model.state_dict(), **{layer_key: right})), path)
    with address_space_headroom(), pytest.raises(CheckpointError) as err:
        check_against(load_checkpoint(path), model, opt, path)
    assert f"model key {layer_key!r} is refused: its storage holds 1 element(s)" in _one_line(err)
    # and the same in the optimizer state
    state = _state(model, opt)
    index = next(iter(state["optimizer"]["state"]))
    shape = state["optimizer"]["state"][index]["exp_avg"].shape
    state["optimizer"]["state"][index]["exp_avg"] = torch.zeros(1).expand(*shape)
    torch.save(state, path)
    if len(shape) and torch.Size(shape).numel() > 1:
        with pytest.raises(CheckpointError, match=f"optimizer state 'exp_avg' of param {index} is refused"):
            check_against(load_checkpoint(path), model, opt, path)


def test_without_check_against_the_layer_itself_refuses_the_crafted_vectors(tmp_path):
    """Every vector and constant crafted consistently (what the shape checks alone would accept):
    ``load_state_dict`` refuses the first one, naming it, within 1 GB of address space."""
    model, opt = _model_and_optimizer()
    prefix = next(k for k in model.state_dict() if k.endswith(".v"))[:-1]
    layer = model.get_submodule(prefix[:-1])
    assert layer.stride == (1, 1) and 2 * layer.padding[0] == layer.kernel_size[0] - 1  # "same" maps: u as v
    crafted = dict(model.state_dict())
    for name, channels in (("u", layer.out_channels), ("v", layer.in_channels), ("u_out", layer.out_channels),
                           ("v_out", layer.in_channels)):
        crafted[prefix + name] = torch.zeros(1).expand(1, channels, 100_000, 100_000)
    path = tmp_path / "crafted.pt"
    torch.save(_state(model, opt, model=crafted), path)
    saved = load_checkpoint(path)
    with address_space_headroom(), pytest.raises(RuntimeError) as err:
        model.load_state_dict(saved["model"])
    assert f"{prefix}u: refused, shape (1, {layer.out_channels}, 100000, 100000)" in str(err.value)


def test_save_stays_loadable_without_the_training_keys(tmp_path):
    path = save_checkpoint(tmp_path / "c.pt", {"step": 1})
    assert load_checkpoint(path, training=False) == {"step": 1}
    assert "lacks the keys" in _error(path)
    assert checkpoint.TRAINING_KEYS.keys() == {"model", "optimizer", "scheduler", "step", "method", "config"}


def test_a_file_that_cannot_be_opened_is_one_line_even_as_root(tmp_path, monkeypatch):
    """The permission error of an unreadable file (chmod 000 does not stop root), simulated."""
    import training.checkpoint as checkpoint_module
    import training.config as config_module

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    path = _config_file(tmp_path, {"steps": 3})
    monkeypatch.setattr(config_module, "open", refuse, raising=False)
    with pytest.raises(ValueError) as err:
        read_config_file(path)
    assert _one_line(err) == f"config file {path} cannot be read: permission denied"
    torch.save([1], tmp_path / "c.pt")
    monkeypatch.setattr(checkpoint_module, "open", refuse, raising=False)
    assert _error(tmp_path / "c.pt") == f"checkpoint {tmp_path / 'c.pt'} cannot be read: permission denied"


# ---------------------------------------------------------------- images and frame folders
def _png(path, h=8, w=8, seed=0):
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def test_a_corrupt_first_frame_is_refused_when_the_folder_is_made(tmp_path):
    png = _png(tmp_path / "0001.png").read_bytes()
    (tmp_path / "0001.png").write_bytes(png[:len(png) // 2])  # truncated PNG
    _png(tmp_path / "0002.png")
    with pytest.raises(ValueError) as err:
        FrameFolder(str(tmp_path))
    assert isinstance(err.value, ImageError) and _one_line(err).startswith(f"cannot read image file {tmp_path / '0001.png'}: ")


def test_a_corrupt_later_frame_names_the_file_when_read(tmp_path):
    _png(tmp_path / "1.png")
    (tmp_path / "2.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    folder = FrameFolder(str(tmp_path))
    with pytest.raises(ValueError) as err:
        list(folder)
    assert _one_line(err).startswith(f"cannot read image file {tmp_path / '2.png'}: ")


def test_frame_folders_that_hold_no_frames(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no frames here")
    with pytest.raises(FileNotFoundError) as err:
        FrameFolder(str(tmp_path / "empty"))
    assert str(tmp_path / "empty") in _one_line(err) and ".png" in str(err.value)
    a_file = _png(tmp_path / "frame.png")
    with pytest.raises(FileNotFoundError) as err:
        FrameFolder(str(a_file))
    assert _one_line(err) == f"frame folder {a_file} is a file, not a directory of frames"
    with pytest.raises(FileNotFoundError, match="missing"):
        FrameFolder(str(tmp_path / "missing"))
    assert FrameFolder(str(tmp_path), channels=1).size == (8, 8)


def test_vimeo_corrupt_images_are_value_errors_naming_the_file(tmp_path):
    root = tmp_path / "vimeo"
    d = root / "sequences" / "00001" / "0001"
    d.mkdir(parents=True)
    for k in range(1, 8):
        _png(d / f"im{k}.png", h=16, w=24, seed=k)
    (root / "sep_trainlist.txt").write_text("00001/0001\n")
    dataset = Vimeo90kSeptuplets(str(root), "train", crop=8)
    (d / "im4.png").write_bytes(b"garbage")
    with pytest.raises(ValueError) as err:
        dataset[0]
    assert _one_line(err).startswith(f"cannot read image file {d / 'im4.png'}: ")
    (d / "im1.png").write_bytes(b"garbage")  # the first image is decoded at construction
    with pytest.raises(ValueError, match="im1.png"):
        Vimeo90kSeptuplets(str(root), "train", crop=8)
    _png(d / "im1.png", h=16, w=24)
    with pytest.raises(ValueError, match=r"crop 32 larger than the frames .* \(16x24\)"):
        Vimeo90kSeptuplets(str(root), "train", crop=32)
    (root / "sep_trainlist.txt").write_bytes(b"\xff\xfe0")
    with pytest.raises(ValueError, match="is not UTF-8"):
        Vimeo90kSeptuplets(str(root), "train", crop=8)
