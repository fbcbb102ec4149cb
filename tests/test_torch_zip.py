"""The torch-free reader of torch.save files: every dtype and view kind round-trips exactly against
torch.load; bf16 rounding equals torch's; placeholders for DeepSpeed objects; clear errors."""

import zipfile
from collections import OrderedDict

import numpy as np
import pytest
import torch

from eva_train.runtime import torch_zip


def as_numpy(t: torch.Tensor) -> np.ndarray:
    return t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy()


def test_tensors_round_trip_exactly(tmp_path):
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10) / 7
    state = OrderedDict(
        f32=base,
        f64=base.double(),
        f16=base.half(),
        bf16=base.bfloat16(),
        i64=torch.arange(5),
        i32=torch.arange(4, dtype=torch.int32),
        u8=torch.arange(3, dtype=torch.uint8),
        flag=torch.tensor([True, False]),
        transposed=base.t(),
        strided=base[::2, 1::3],
        offset_view=base.reshape(-1)[7:19],
        scalar=torch.tensor(3.5),
        empty=torch.zeros(0, 4),
        param=torch.nn.Parameter(base[:2].clone()),
        nested={"shape": torch.Size([2, 3]), "list": [base[0], 7, "x"], "np": np.arange(3)},
    )
    path = tmp_path / "state.pt"
    torch.save(state, path)
    got = torch_zip.load(path)
    for name, tensor in state.items():
        if name == "nested":
            continue
        array = got[name]
        assert array.shape == tuple(tensor.shape), name
        if tensor.dtype == torch.bfloat16:
            assert isinstance(array, torch_zip.BF16Array)
            assert np.array_equal(np.asarray(array).view(np.int16), as_numpy(tensor.detach()))
            assert np.array_equal(torch_zip.to_float32(array), tensor.float().numpy())
        else:
            assert np.array_equal(array, tensor.detach().numpy()), name
    assert got["nested"]["shape"] == (2, 3) and got["nested"]["list"][1:] == [7, "x"]
    assert np.array_equal(got["nested"]["list"][0], base[0].numpy()) and np.array_equal(
        got["nested"]["np"], np.arange(3)
    )
    assert not got["f32"].flags.writeable  # a read-only view of the mapped file
    assert torch_zip.is_float(got["bf16"]) and torch_zip.is_float(got["f16"]) and not torch_zip.is_float(got["i64"])


def test_bf16_rounding_equals_torch():
    rng = np.random.default_rng(0)
    values = np.concatenate(
        [
            rng.standard_normal(10_000).astype(np.float32) * 10.0 ** rng.integers(-30, 30, 10_000),
            np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 1e-45, 3.4e38, -3.4e38], np.float32),
            (np.arange(1, 200, dtype=np.uint32) << 15 | 0x3F800000).view(np.float32),
        ]
    )  # ties
    ours = np.asarray(torch_zip.float32_to_bf16(values)).view(np.int16)
    theirs = torch.from_numpy(values).bfloat16().view(torch.int16).numpy()
    finite = np.isfinite(values)
    assert np.array_equal(ours[finite], theirs[finite])
    assert np.isnan(torch_zip.to_float32(torch_zip.float32_to_bf16(values))[~finite & np.isnan(values)]).all()


def test_deepspeed_objects_become_placeholders(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum

    torch.save(
        {
            "zero_stage": ZeroStageEnum.weights,
            "loss_scaler": LossScaler(1.0),
            "optimizer": torch.optim.SGD([torch.nn.Parameter(torch.ones(2))], lr=0.1).state_dict(),
        },
        tmp_path / "o.pt",
    )
    got = torch_zip.load(tmp_path / "o.pt")
    assert isinstance(got["zero_stage"], torch_zip.DeepSpeedPlaceholder) and int(got["zero_stage"]) == 3
    assert type(got["loss_scaler"]).__name__ == "LossScaler"
    assert got["optimizer"]["param_groups"][0]["lr"] == 0.1


def test_bad_files_are_clear_errors(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a zip at all")
    with pytest.raises(torch_zip.TorchZipError, match="not a torch.save zip"):
        torch_zip.load(tmp_path / "junk.pt")
    torch.save({"w": torch.ones(100_000)}, tmp_path / "big.pt")
    data = (tmp_path / "big.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(torch_zip.TorchZipError, match="not a torch.save zip"):
        torch_zip.load(tmp_path / "cut.pt")
    with zipfile.ZipFile(tmp_path / "other.zip", "w") as archive:
        archive.writestr("x/readme.txt", "hello")
    with pytest.raises(torch_zip.TorchZipError, match="no data.pkl"):
        torch_zip.load(tmp_path / "other.zip")
